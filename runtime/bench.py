"""`edgepeft bench`: what a bundle costs on this machine, per backend and adapter.

Speeds are medians of several greedy runs of exactly N new tokens (EOS ignored, as llama-bench
does); an adapter's speed relative to the base is the median ratio of adapter runs to base runs
made right before them. Memory is measured in fresh child processes (peak RSS with 0, 1 and all
adapters loaded and used), so one measurement's allocations never inflate another's. "Reload" is what hot-swap
replaces: opening the base again for each task.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from edgepeft import __version__

from .engine import Engine
from .generate import Timings
from .memory import peak_rss_bytes, rss_bytes

PROMPT = "Write a short story about a robot who learns to paint, in three paragraphs."


def _median(xs):
    return statistics.median(xs) if xs else None


def _p95(xs):
    return sorted(xs)[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))] if xs else None


def machine() -> dict:
    import numpy

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "edgepeft": __version__, "numpy": numpy.__version__}
    for mod in ("onnxruntime", "llama_cpp"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return info


def _timings(engine: Engine, adapter: str | None, new_tokens: int) -> Timings:
    return engine.complete(PROMPT, adapter=adapter, max_new_tokens=new_tokens, chat=True, ignore_eos=True).timings


def _summary(rows: list[Timings]) -> dict:
    return {
        "ttft_ms": round(_median([r.prefill_s for r in rows]) * 1e3, 2),
        "prefill_tokens_per_s": round(_median([r.prefill_tokens_per_s for r in rows]), 1),
        "decode_tokens_per_s": round(_median([r.decode_tokens_per_s for r in rows]), 1),
    }


def _speed(engine: Engine, adapter: str | None, runs: int, new_tokens: int) -> dict:
    rows = [_timings(engine, adapter, new_tokens) for _ in range(runs + 1)][1:]  # the first run warms caches
    return _summary(rows)


def _speed_against_base(engine: Engine, adapter: str, runs: int, new_tokens: int) -> dict:
    """The adapter's speed, with each run paired with a base run right before it: on a shared
    machine speed drifts over seconds, and the ratio of runs next to each other (their median is
    decode_vs_base) cancels that drift where a ratio of two separate medians does not. Each
    pair's ratio is of median decode steps, so that one preempted step does not make the pair."""
    _timings(engine, adapter, new_tokens)  # warm-up
    rows, ratios = [], []
    for _ in range(runs):
        base = _timings(engine, None, new_tokens)
        rows.append(_timings(engine, adapter, new_tokens))
        ratios.append(base.decode_step_s / rows[-1].decode_step_s)
    return {**_summary(rows), "decode_vs_base": round(_median(ratios), 3)}


def _memory_probe(bundle: str, backend: str, threads: int | None, names: list[str], device: str = "auto") -> dict:
    """Peak RSS of a fresh process that opens the base, runs it, loads `names` and runs each once.
    'peak' counts from after the first base call where the peak mark can be reset (Linux), so
    that a transient of opening the session (onnxruntime's graph setup) cannot hide what the
    adapters add; 'process_peak' is the whole process's."""
    code = (
        "import json,sys\n"
        "from edgepeft.runtime import Engine\n"
        "from edgepeft.runtime.memory import peak_rss_bytes, reset_peak, rss_bytes\n"
        f"e = Engine.open({bundle!r}, backend={backend!r}, threads={threads!r}, load_adapters=False, device={device!r})\n"
        "e.complete('Hello', max_new_tokens=8, ignore_eos=True)\n"
        "process_peak = peak_rss_bytes()\n"
        "reset = reset_peak()\n"
        "e.complete('Hello', max_new_tokens=8, ignore_eos=True)\n"
        "base = rss_bytes()\n"
        f"for n in {names!r}:\n"
        "    e.load_adapter(n); e.complete('Hello', adapter=n, max_new_tokens=8, ignore_eos=True)\n"
        "print(json.dumps({'rss_base': base, 'rss': rss_bytes(), 'peak': peak_rss_bytes(), 'reset': reset,\n"
        "                  'process_peak': max(process_peak, peak_rss_bytes())}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_bench(bundle: str | Path, backend: str = "onnx", threads: int | None = None, runs: int = 3,
              new_tokens: int = 128, switch_repeats: int = 200, memory: bool = True, device: str = "auto") -> dict:
    bundle = str(bundle)
    t0 = time.perf_counter()
    engine = Engine.open(bundle, backend=backend, threads=threads, load_adapters=False, device=device)
    load_s = time.perf_counter() - t0
    names = [n for n, a in engine.bundle.adapters.items() if backend in a.get("files", {})]
    result: dict = {
        "bundle": bundle, "backend": backend, "provider": engine.backend.providers[0], "machine": machine(),
        "device": engine.backend.device, "device_note": engine.device_note,
        "threads": threads, "runs": runs, "new_tokens": new_tokens,
        "quant": engine.bundle.backends[backend].get("quant"),
        "base": {"load_s": round(load_s, 3), **_speed(engine, None, runs, new_tokens)},
        "adapters": {},
    }
    # The weight bytes a decode step reads (written at export; None for older bundles), and the
    # bandwidth the base's decode speed implies: at 1B-4B on a CPU, the figure that bounds speed.
    decode_bytes = engine.bundle.backends[backend].get("decode_bytes")
    result["base"]["decode_bytes"] = decode_bytes
    result["base"]["decode_gb_per_s"] = (round(decode_bytes * result["base"]["decode_tokens_per_s"] / 1e9, 2)
                                         if isinstance(decode_bytes, int) else None)
    # Reload per task (what hot-swap replaces): open the base again, plus the adapter load.
    reloads = []
    for _ in range(3):
        t = time.perf_counter()
        Engine.open(bundle, backend=backend, threads=threads, load_adapters=False, device=device)
        reloads.append(time.perf_counter() - t)
    result["base"]["reload_s"] = round(_median(reloads), 3)
    for name in names:
        loads = []
        for _ in range(5):
            t = time.perf_counter()
            engine.load_adapter(name)
            loads.append(time.perf_counter() - t)
            engine.unload_adapter(name)
        engine.load_adapter(name)
        switch = engine.switch_seconds(name, switch_repeats)
        size = engine.bundle.manifest["files"][engine.bundle.adapters[name]["files"][backend]]["size"]
        result["adapters"][name] = {
            "file_bytes": size,
            "load_ms": round(_median(loads) * 1e3, 3),
            "switch_ms_median": round(_median(switch) * 1e3, 4),
            "switch_ms_p95": round(_p95(switch) * 1e3, 4),
            "switch_vs_reload": round(result["base"]["reload_s"] / _median(switch)),
            **_speed_against_base(engine, name, runs, new_tokens),
        }
    if memory:
        m0 = _memory_probe(bundle, backend, threads, [], device)
        m1 = _memory_probe(bundle, backend, threads, names[:1], device) if names else m0
        mall = _memory_probe(bundle, backend, threads, names, device) if names else m0
        files = sum(a["file_bytes"] for a in result["adapters"].values())
        result["memory"] = {
            "peak_rss_0_adapters": m0["peak"], "peak_rss_1_adapter": m1["peak"],
            "peak_rss_all_adapters": mall["peak"], "peaks_from": "first call" if mall["reset"] else "process start",
            "process_peak_rss": mall["process_peak"], "adapter_files_bytes": files,
            "added_by_all_adapters": mall["peak"] - m0["peak"],
            "added_per_file_byte": round((mall["peak"] - m0["peak"]) / files, 3) if files else None,
        }
    result["this_process_peak_rss"] = peak_rss_bytes()
    result["this_process_rss"] = rss_bytes()
    return result


# ---- concurrency: streams that overlap in time (continuous batching, runtime/scheduler.py) -------
STREAM_PROMPTS = [
    PROMPT,
    "Explain in simple words why the sky is blue.",
    "List five fruits and say one thing about each.",
    "Write a haiku about autumn rain, then explain it.",
    "Describe how a bicycle works to a child.",
    "What are three good habits for learning a language?",
    "Summarize the plot of a detective story you invent.",
    "Give a recipe for a simple tomato soup.",
]


def _streams(engine: Engine, adapters: list, new_tokens: int) -> dict:
    """len(adapters) calls started together, stream i on adapters[i] with its own prompt; the
    aggregate and per-stream figures of that one round."""
    import threading

    n = len(adapters)
    start, out = threading.Barrier(n + 1), [None] * n

    def go(i):
        start.wait()
        t = time.perf_counter()
        c = engine.complete(STREAM_PROMPTS[i % len(STREAM_PROMPTS)], adapter=adapters[i], max_new_tokens=new_tokens,
                            chat=True, ignore_eos=True)
        out[i] = (t, t + c.timings.prefill_s, time.perf_counter(), c)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    for t in threads:
        t.join()
    began = min(o[0] for o in out)
    first, ended = min(o[1] for o in out), max(o[2] for o in out)
    generated = sum(len(o[3].tokens) for o in out)
    return {
        "aggregate_tokens_per_s": generated / (ended - began),  # prefill included
        # tokens after each stream's first, over the time from the first first token to the last end
        "aggregate_decode_tokens_per_s": sum(len(o[3].tokens) - 1 for o in out) / (ended - first),
        "per_stream_decode_tokens_per_s": _median([o[3].timings.decode_tokens_per_s for o in out]),
        "ttft_ms_median": _median([(o[1] - o[0]) * 1e3 for o in out]),
        "ttft_ms_max": max((o[1] - o[0]) * 1e3 for o in out),
    }


def _streams_memory(bundle: str, backend: str, threads: int | None, adapters: list, new_tokens: int,
                    device: str) -> int:
    """Peak RSS of a fresh process that runs len(adapters) streams together once."""
    code = (
        "import json\n"
        "from edgepeft.runtime import Engine\n"
        "from edgepeft.runtime.bench import _streams\n"
        "from edgepeft.runtime.memory import peak_rss_bytes\n"
        f"e = Engine.open({bundle!r}, backend={backend!r}, threads={threads!r}, device={device!r}, "
        f"parallel={max(1, len(adapters))})\n"
        f"_streams(e, {adapters!r}, {new_tokens})\n"
        "print(json.dumps({'peak': peak_rss_bytes()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def run_concurrency(bundle: str | Path, levels: list[int], backend: str = "onnx", threads: int | None = None,
                    runs: int = 3, new_tokens: int = 128, memory: bool = True, device: str = "auto",
                    batching: bool = True) -> dict:
    """For each number of streams in `levels`: all streams on the base, and each stream on a
    different adapter (the bundle's adapters in turn). Rounds are interleaved (every level and
    mode once, `runs` times over) and the figures are medians; `vs_one` divides by one stream's
    aggregate in the same mode. batching=False runs the same requests one after another instead
    (what an engine that does not batch them does)."""
    bundle = str(bundle)
    engine = Engine.open(bundle, backend=backend, threads=threads, device=device, parallel=max(levels),
                         batching=batching)
    names = [n for n, a in engine.bundle.adapters.items() if backend in a.get("files", {})]
    modes = {"base": lambda c: [None] * c}
    if names:
        modes["adapters"] = lambda c: [names[i % len(names)] for i in range(c)]
    rounds: dict = {(m, c): [] for m in modes for c in levels}

    def one(mode, c):
        if batching:
            return _streams(engine, modes[mode](c), new_tokens)
        t, tokens, firsts = time.perf_counter(), 0, []  # the same requests, one after another
        for i, adapter in enumerate(modes[mode](c)):
            s = time.perf_counter()
            r = engine.complete(STREAM_PROMPTS[i % len(STREAM_PROMPTS)], adapter=adapter, max_new_tokens=new_tokens,
                                chat=True, ignore_eos=True)
            tokens += len(r.tokens)
            firsts.append((s - t + r.timings.prefill_s) * 1e3)
        rate = tokens / (time.perf_counter() - t)
        return {"aggregate_tokens_per_s": rate, "aggregate_decode_tokens_per_s": rate,
                "per_stream_decode_tokens_per_s": rate, "ttft_ms_median": _median(firsts), "ttft_ms_max": max(firsts)}

    for mode in modes:  # warm-up: every shape of batch once
        one(mode, max(levels))
    for _ in range(runs):
        for c in levels:
            for mode in modes:
                rounds[(mode, c)].append(one(mode, c))
    result: dict = {"bundle": bundle, "backend": backend, "quant": engine.bundle.backends[backend].get("quant"),
                    "provider": engine.backend.providers[0], "machine": machine(), "threads": threads, "runs": runs,
                    "new_tokens": new_tokens, "batching": batching, "adapters": names, "levels": {}}
    for mode in modes:
        one_stream = _median([r["aggregate_tokens_per_s"] for r in rounds[(mode, min(levels))]])
        for c in levels:
            rs = rounds[(mode, c)]
            row = {k: round(_median([r[k] for r in rs]), 2) for k in rs[0]}
            row["vs_one"] = round(row["aggregate_tokens_per_s"] / one_stream, 3)
            row["adapters"] = modes[mode](c)
            result["levels"].setdefault(mode, {})[str(c)] = row
    if memory:
        for c in levels:
            for mode in modes:
                result["levels"][mode][str(c)]["peak_rss"] = _streams_memory(bundle, backend, threads, modes[mode](c),
                                                                             new_tokens, device)
    return result
