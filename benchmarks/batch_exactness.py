#!/usr/bin/env python3
"""Do batched calls give what the same calls give alone, on a quantized bundle?

    python benchmarks/batch_exactness.py [--bundle DIR] [--backend onnx,gguf] [--held-out 40] [--streams 4]

For each backend: the demo's held-out prompts of every shipped task, each with its task's adapter,
run once alone (batching=False) and once as `--streams` concurrent calls whose adapters differ
(the tasks' prompts interleaved, so a batch mixes json, sentiment and upper rows at different
lengths). Reports the share of prompts whose greedy outputs are identical, and each task's
accuracy both ways. Writes benchmarks/results/batch_exactness.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def run_concurrently(engine, jobs: list[dict], streams: int) -> list[str]:
    """`jobs` through `streams` worker threads, each taking the next job when it finishes one."""
    out, lock, it = [None] * len(jobs), threading.Lock(), iter(range(len(jobs)))

    def worker():
        while True:
            with lock:
                i = next(it, None)
            if i is None:
                return
            out[i] = engine.generate(**jobs[i])

    threads = [threading.Thread(target=worker) for _ in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=None, help="default: the demo's bundle")
    ap.add_argument("--backend", default="onnx,gguf")
    ap.add_argument("--held-out", type=int, default=40)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from edgepeft.runtime import Engine
    from edgepeft.demo.shipped import shipped_adapters
    from edgepeft.demo.tasks import TASKS

    if args.bundle:
        bundle = Path(args.bundle)
    else:
        from edgepeft.cache import cache_dir
        from edgepeft.demo import demo_bundle

        bundle = demo_bundle(cache_dir() / "demo" / "smollm2-135m")[0].root
    tasks = {n: TASKS[n] for n in shipped_adapters()}
    examples = {n: t.examples(args.held_out, held_out=True) for n, t in tasks.items()}
    # Interleaved: job i is task i % 3's next prompt, so concurrent jobs are on different adapters.
    jobs, owners = [], []
    for k in range(args.held_out):
        for name, task in tasks.items():
            jobs.append(dict(prompt=examples[name][k].prompt, adapter=name, max_new_tokens=task.max_new_tokens,
                             chat=True))
            owners.append((name, k))
    result = {"when": time.strftime("%Y-%m-%d %H:%M"), "bundle": str(bundle), "streams": args.streams,
              "held_out": args.held_out, "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "backends": {}}
    for backend in args.backend.split(","):
        alone_engine = Engine.open(bundle, backend=backend, threads=args.threads, batching=False)
        alone = [alone_engine.generate(**j) for j in jobs]
        del alone_engine
        engine = Engine.open(bundle, backend=backend, threads=args.threads, parallel=args.streams)
        t = time.perf_counter()
        batched = run_concurrently(engine, jobs, args.streams)
        wall = time.perf_counter() - t
        same = sum(a == b for a, b in zip(alone, batched))
        per_task = {}
        for name, task in tasks.items():
            idx = [i for i, (n, _) in enumerate(owners) if n == name]
            per_task[name] = {
                "alone": round(task.accuracy(examples[name], [alone[i] for i in idx]), 4),
                "batched": round(task.accuracy(examples[name], [batched[i] for i in idx]), 4),
                "identical": round(sum(alone[i] == batched[i] for i in idx) / len(idx), 4),
            }
        result["backends"][backend] = {"quant": engine.bundle.backends[backend].get("quant"), "prompts": len(jobs),
                                       "identical": same, "identical_share": round(same / len(jobs), 4),
                                       "tasks": per_task, "batched_wall_s": round(wall, 1),
                                       "differing": [{"task": owners[i][0], "prompt": jobs[i]["prompt"],
                                                      "alone": alone[i], "batched": batched[i]}
                                                     for i in range(len(jobs)) if alone[i] != batched[i]][:10]}
        print(backend, json.dumps({k: v for k, v in result["backends"][backend].items() if k != "differing"}), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "batch_exactness.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Batched calls against the same calls alone (greedy, quantized bundle)", "",
             f"- when: {result['when']}; machine: {result['machine']['platform']}, {result['machine']['cpus']} CPUs",
             f"- {args.held_out} held-out prompts per shipped task, each with its task's adapter, interleaved across "
             f"tasks; batched: {args.streams} concurrent calls (rows on different adapters and lengths)",
             f"- command: `python benchmarks/batch_exactness.py --streams {args.streams} --held-out {args.held_out}`", "",
             "| backend | prompts | identical outputs | task: accuracy alone / batched (identical) |", "|---|---|---|---|"]
    for backend, r in result["backends"].items():
        tasks_txt = "; ".join(f"{n} {v['alone']:.0%} / {v['batched']:.0%} ({v['identical']:.0%})"
                              for n, v in r["tasks"].items())
        lines.append(f"| {backend} {r['quant']} | {r['prompts']} | {r['identical']} ({r['identical_share']:.1%}) | "
                     f"{tasks_txt} |")
    (RESULTS / "batch_exactness.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
