"""The whole job on the embedded default model: export builtin:smollm2-135m (int4 ONNX and
Q4_K_M GGUF) with the shipped task adapters into a bundle (reused when present), open each
backend once, run the same prompts with no adapter and with each adapter, and report switch
time, speed, memory and task accuracy on the exported model next to PyTorch's."""

from __future__ import annotations

import argparse
import statistics
import textwrap
import time
from pathlib import Path

from edgepeft.byte_sizes import format_bytes
from edgepeft.demo import BASE, QUANTS, demo_bundle
from edgepeft.demo.tasks import TASK_MARGIN, TASK_PROMPTS

from .verify import prompt_count

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, metavar="DIR",
                   help="bundle directory (default: $EDGEPEFT_CACHE/demo/smollm2-135m)")
    p.add_argument("--backend", default="all", choices=["all", "onnx", "gguf"],
                   help="backends to show (default all: onnx and gguf)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--held-out", type=prompt_count, default=TASK_PROMPTS, metavar="N",
                   help=f"held-out prompts per task for the accuracy table (default and most {TASK_PROMPTS}: "
                        "the prompts PyTorch was scored on)")
    p.add_argument("--quiet", action="store_true", help="no progress bar while exporting")


DECODE_TOKENS = 32  # fixed-length runs for the decode line (a task's answer can be one token)


def _show(engine, adapters, tasks) -> dict:
    """Side-by-side outputs, switch time and decode speed for one backend; returns speeds."""
    columns = [None, *adapters]
    speeds: dict = {c: [] for c in columns}
    for task_name, task in tasks.items():
        example = task.examples(1, held_out=True, seed=1)[0]
        print(f"  prompt ({task_name} task): {example.prompt}")
        for col in columns:
            r = engine.complete(example.prompt, adapter=col, max_new_tokens=task.max_new_tokens, chat=True)
            # decode speed from fixed-length runs (EOS ignored, as llama-bench does), not from
            # answers a token or two long
            fixed = engine.complete(example.prompt, adapter=col, max_new_tokens=DECODE_TOKENS, chat=True,
                                    ignore_eos=True)
            speeds[col].append(fixed.timings.decode_tokens_per_s)
            lines = textwrap.wrap(" ".join(r.text.split()), 86) or [""]
            print(f"    {col or 'base':<10} | {lines[0]}" + "".join(f"\n    {'':<10} | {l}" for l in lines[1:3]))
    switch = {n: statistics.median(engine.switch_seconds(n)) * 1e3 for n in adapters}
    print("  switch  " + ", ".join(f"{n} {ms:.3f} ms" for n, ms in switch.items())
          + "  (median of 200, from the plain base; no base weights move)")
    print("  decode  " + ", ".join(f"{c or 'base'} {statistics.median(v):.0f} tok/s" for c, v in speeds.items())
          + f"  (median of {len(tasks)} runs of {DECODE_TOKENS} tokens)")
    return speeds


def run(args) -> int:
    from edgepeft.cache import cache_dir
    from edgepeft.runtime import Engine
    from edgepeft.runtime.memory import peak_rss_bytes, reset_peak, rss_bytes
    from edgepeft.demo.shipped import shipped_adapters, shipped_metrics
    from edgepeft.demo.tasks import TASKS, compare_to_reference

    adapters = shipped_adapters()
    tasks = {n: TASKS[n] for n in adapters}
    backends = list(QUANTS) if args.backend == "all" else [args.backend]
    out = Path(args.out) if args.out else cache_dir() / "demo" / "smollm2-135m"
    bundle, export_s = demo_bundle(out, backends, args.quiet)
    print(f"edgepeft demo: {BASE} with {len(adapters)} shipped LoRA adapters ({', '.join(adapters)})")
    print(f"bundle  {bundle.root}  ({'exported in %.1f s' % export_s if export_s else 'reused'})")
    # Measure the runtime's peak apart from the export's; memory the export still holds in this
    # process stays counted, so a reused run (the second one) shows the runtime alone.
    reset = reset_peak()
    peak_scope = ("runtime only" if reset and not export_s else
                  "after this run's export, which still holds memory; rerun for the runtime alone" if reset
                  else "including the export")

    accuracy: dict = {}
    for backend in backends:
        rss0, t0 = rss_bytes(), time.perf_counter()
        engine = Engine.open(bundle, backend=backend, threads=args.threads, load_adapters=False)
        base_s, rss_base = time.perf_counter() - t0, rss_bytes()
        load_ms = {}
        for name in adapters:
            t = time.perf_counter()
            engine.load_adapter(name)
            load_ms[name] = (time.perf_counter() - t) * 1e3
        print(f"\n[{backend} {QUANTS[backend]}, {engine.backend.providers[0]}] base loaded once in {base_s:.2f} s "
              f"(+{format_bytes(rss_base - rss0, 'MiB', 0)} RSS); adapters in "
              + ", ".join(f"{n} {ms:.1f} ms" for n, ms in load_ms.items())
              + f" (+{format_bytes(rss_bytes() - rss_base, 'MiB', 0)} RSS)")
        _show(engine, adapters, tasks)
        for name, task in tasks.items():
            accuracy[(backend, name)] = task.outcomes(engine, name, args.held_out)
        del engine

    metrics = shipped_metrics()
    header = "".join(f"{b + ' ' + QUANTS[b]:>22}" for b in backends)
    print(f"\ntask accuracy with the adapter on {args.held_out} held-out prompts, PyTorch's on the same prompts "
          f"(base: without it, PyTorch, on {TASK_PROMPTS}); lost/gained: prompts the export answers wrong/right "
          f"where PyTorch did not; the check fails on a loss beyond chance (sign test) or {TASK_MARGIN:.0%} net")
    print(f"  {'task':<10} {'base':>6} {'PyTorch fp32':>13}{header}")
    for name in adapters:
        m = metrics.get(name, {})
        ref = m.get("pytorch_correct", "")
        torch_pct = f"{ref[:args.held_out].count('1') / args.held_out:.1%}" if ref else "n/a"
        base_pct = f"{m['base_accuracy']:.0%}" if "base_accuracy" in m else "n/a"
        cells = ""
        for b in backends:
            got = accuracy[(b, name)]
            if ref:
                c = compare_to_reference(ref, got)
                cell = f"{c['accuracy']:.1%} -{c['lost']}/+{c['gained']} {'ok' if c['ok'] else 'LOW'}"
            else:
                cell = f"{sum(got) / len(got):.1%}"
            cells += f"{cell:>22}"
        print(f"  {name:<10} {base_pct:>6} {torch_pct:>13}{cells}")
    print(f"\npeak RSS {format_bytes(peak_rss_bytes(), 'MiB', 0)} (demo process, {peak_scope}, "
          "both backends loaded in turn)")
    return 0
