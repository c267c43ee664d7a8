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


def _timings(engine: Engine, adapter: str | None, new_tokens: int) -> dict:
    return engine.complete(PROMPT, adapter=adapter, max_new_tokens=new_tokens, chat=True, ignore_eos=True).timings


def _summary(rows: list[dict]) -> dict:
    return {
        "ttft_ms": round(_median([r["prefill_s"] for r in rows]) * 1e3, 2),
        "prefill_tokens_per_s": round(_median([r["prefill_tokens_per_s"] for r in rows]), 1),
        "decode_tokens_per_s": round(_median([r["decode_tokens_per_s"] for r in rows]), 1),
    }


def _speed(engine: Engine, adapter: str | None, runs: int, new_tokens: int) -> dict:
    rows = [_timings(engine, adapter, new_tokens) for _ in range(runs + 1)][1:]  # the first run warms caches
    return _summary(rows)


def _speed_against_base(engine: Engine, adapter: str, runs: int, new_tokens: int) -> dict:
    """The adapter's speed, with each run paired with a base run right before it: on a shared
    machine speed drifts over seconds, and the ratio of runs next to each other (their median is
    decode_vs_base) cancels that drift where a ratio of two separate medians does not."""
    _timings(engine, adapter, new_tokens)  # warm-up
    rows, ratios = [], []
    for _ in range(runs):
        base = _timings(engine, None, new_tokens)
        rows.append(_timings(engine, adapter, new_tokens))
        ratios.append(rows[-1]["decode_tokens_per_s"] / base["decode_tokens_per_s"])
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
