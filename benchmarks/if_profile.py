#!/usr/bin/env python3
"""Where the slot-free base path's cost goes, from onnxruntime's own profiler.

    python benchmarks/if_profile.py IF_BUNDLE FLAT_BUNDLE [--rounds 10] [--tokens 64] [--threads 2]

IF_BUNDLE is a bundle with adapter slots (its calls without an adapter run the If's else-branch,
onnx_base_path.py); FLAT_BUNDLE the same base exported with `--slots none`. Export both with the
same --onnx-quant, e.g. int4-pure. Both engines are opened in this process with
`SessionOptions.enable_profiling` and run the same greedy generation in alternate order, round
after round, so drift hits both alike. From the profiles, over the decode steps (the prompt's
step excluded), medians of:

- the whole session.run, and the kernels' time summed (every operator but the If itself);
- for the If graph, the If's time before its subgraph's executor starts ("If before") and after
  it ends ("If after"): work of onnxruntime's If kernel that no operator of ours accounts for.

The profiler itself slows every run (about 2x here), so read the split, not the speeds; the
unprofiled ratio is what head_to_head.py measures. Prints its figures; benchmarks/results/
if_profile.txt and docs/experiments.md ("The base path's cost, located") hold a sitting's.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import statistics
import sys
import tempfile

PROMPT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


def _profiled_engine(bundle: str, prefix: str, threads: int):
    """An Engine whose onnxruntime session profiles itself (the runtime has no option for that:
    a benchmark-only subclass of SessionOptions, swapped in while the session is created)."""
    import onnxruntime as ort

    from edgepeft.runtime import Engine

    real = ort.SessionOptions

    class Profiling(real):
        def __init__(self):
            super().__init__()
            self.enable_profiling = True
            self.profile_file_prefix = prefix

    ort.SessionOptions = Profiling
    try:
        return Engine.open(bundle, backend="onnx", threads=threads)
    finally:
        ort.SessionOptions = real


def _split(events: list[dict], tokens: int) -> dict:
    """Medians over the decode runs of one profile (see the module docstring)."""
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    starts = [r["ts"] for r in runs]
    kernels = [0.0] * len(runs)
    ifs, execs = [], []
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            if e["args"]["op_name"] == "If":
                ifs.append(e)
            else:
                kernels[bisect.bisect_right(starts, e["ts"]) - 1] += e["dur"]
        elif e.get("name") == "SequentialExecutor::Execute":
            execs.append(e)
    decode = [i for i in range(len(runs)) if i % tokens != 0]  # each generation's first run is its prompt
    out = {"run_us": statistics.median(runs[i]["dur"] for i in decode),
           "kernels_us": statistics.median(kernels[i] for i in decode)}
    if ifs:
        ifs.sort(key=lambda e: e["ts"])
        execs.sort(key=lambda e: e["ts"])
        exec_starts = [e["ts"] for e in execs]
        before, after = [], []
        for k, e in enumerate(ifs):
            if k % tokens == 0:
                continue
            j = bisect.bisect_left(exec_starts, e["ts"])  # the subgraph's executor starts inside the If
            if j < len(execs) and execs[j]["ts"] + execs[j]["dur"] <= e["ts"] + e["dur"]:
                before.append(execs[j]["ts"] - e["ts"])
                after.append(e["ts"] + e["dur"] - execs[j]["ts"] - execs[j]["dur"])
        out.update(if_before_us=statistics.median(before), if_after_us=statistics.median(after))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("if_bundle")
    p.add_argument("flat_bundle")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--tokens", type=int, default=64, help="greedy tokens per generation (default 64)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    for name in ("rounds", "tokens", "threads"):
        if getattr(a, name) < 1:
            p.exit(2, f"if_profile.py: --{name} must be at least 1\n")
    from edgepeft.bundle import Bundle
    from edgepeft.errors import BundleError

    try:
        shapes = {path: Bundle.open(path).backends.get("onnx") or {} for path in (a.if_bundle, a.flat_bundle)}
    except BundleError as e:
        p.exit(2, f"if_profile.py: {e}\n")
    if not shapes[a.if_bundle].get("base_path"):
        p.exit(2, f"if_profile.py: {a.if_bundle}: its ONNX base has no slot-free base path (no If)\n")
    if shapes[a.flat_bundle].get("slot_set") != "none":
        p.exit(2, f"if_profile.py: {a.flat_bundle}: not exported with --slots none\n")

    tmp = tempfile.mkdtemp(prefix="if_profile_")
    engines = {label: _profiled_engine(path, os.path.join(tmp, label), a.threads)
               for label, path in (("if", a.if_bundle), ("flat", a.flat_bundle))}
    for e in engines.values():  # warm-up, not profiled apart: the first generation is dropped below
        e.complete(PROMPT, max_new_tokens=a.tokens, ignore_eos=True, chat=True)
    rates = {label: [] for label in engines}
    for r in range(a.rounds):
        for label in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
            c = engines[label].complete(PROMPT, max_new_tokens=a.tokens, ignore_eos=True, chat=True)
            rates[label].append(c.timings.decode_tokens_per_s)
    split = {}
    for label, e in engines.items():
        with open(e.backend.session.end_profiling()) as f:
            events = json.load(f)
        # drop the warm-up generation: its runs come first
        first = sorted(x["ts"] for x in events if x.get("name") == "model_run")[a.tokens:]
        events = [x for x in events if x.get("ts", 0) >= first[0]]
        split[label] = _split(events, a.tokens)
    print(f"# python benchmarks/if_profile.py ({a.threads} threads, {a.rounds} interleaved rounds of {a.tokens} tokens, profiled)")
    for label, s in split.items():
        line = (f"{label}: {statistics.median(rates[label]):.1f} tok/s profiled; decode run {s['run_us']:.0f} us, "
                f"kernels {s['kernels_us']:.0f} us, rest {s['run_us'] - s['kernels_us']:.0f} us")
        if "if_before_us" in s:
            line += f"; If before its subgraph {s['if_before_us']:.0f} us, after {s['if_after_us']:.0f} us"
        print(line)
    d_run = split["if"]["run_us"] - split["flat"]["run_us"]
    d_kern = split["if"]["kernels_us"] - split["flat"]["kernels_us"]
    print(f"if - flat: run {d_run:+.0f} us, kernels {d_kern:+.0f} us, rest {d_run - d_kern:+.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
