#!/usr/bin/env python3
"""The int4 block search's cost: on weights shaped like Llama-3.2-1B's, and within a whole export.

    python benchmarks/int4_search.py matrices [--before REV] [--runs 3] [--symmetric]
    python benchmarks/int4_search.py export [--base builtin:smollm2-135m] [--before REV] [--out DIR]

matrices: times `int4_blocks` (exporters/int4_search.py) on random bf16-valued weights of the
shapes of Llama-3.2-1B's projections (q/o 2048x2048, k/v 512x2048, gate/up 8192x2048, down
2048x8192, as [out, in]), with zero points (what `--onnx-quant int4` searches) unless
--symmetric. With --before REV, also the int4_blocks of git revision REV (its
exporters/int4_search.py), run alternately with the current one in the same sitting, and the
current one's weighted error (what the search minimises, over the whole weight) as a ratio to
REV's. Prints the median process CPU time (what one core spends; the
export runs one search per core) and the median wall time over --runs, and the peak memory of
one more run's allocations (tracemalloc, which sees numpy's; the output's own arrays included).

export: one `export_bundle(BASE, --format onnx, --onnx-quant int4)` into a temporary directory
(or --out DIR, kept: two exports' model files can then be compared),
timed per step of the exporter's progress (the exporter shows steps but not their times, so
this wraps them), with the calibration step split into the calibration pass and the block
search. --before REV runs the export with REV's int4_blocks instead.

benchmarks/results/int4_search.md holds a sitting's figures.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# Llama-3.2-1B's projections as [out, in]; an ONNX MatMul weight is [in, out].
LLAMA_1B = {"q_proj/o_proj": (2048, 2048), "k_proj/v_proj": (512, 2048), "gate/up_proj": (8192, 2048),
            "down_proj": (2048, 8192)}


def _int4_blocks_at(rev: str):
    """int4_blocks as git revision `rev` defined it (its exporters/int4_search.py, or before that
    file its exporters/onnx_quant.py, run as a module of the current package so that its imports
    resolve)."""
    for path in ("exporters/int4_search.py", "exporters/onnx_quant.py"):
        try:
            src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"],
                                 capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            continue
        module = types.ModuleType("edgepeft.exporters._int4_before")
        module.__package__ = "edgepeft.exporters"
        exec(compile(src, f"{rev}:{path}", "exec"), module.__dict__)
        return module.int4_blocks
    raise SystemExit(f"int4_search.py: no exporters/int4_search.py or onnx_quant.py at git revision {rev!r}")


def _weights(out_features: int, in_features: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """A random bf16-valued weight [in, out] (as a random bf16 checkpoint has) and activation
    statistics per input channel (log-normal: a few channels carry most)."""
    w = (rng.normal(size=(in_features, out_features)) * 0.02).astype(np.float32)
    w = (w.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)  # bf16's 8-bit mantissa
    return w, rng.lognormal(0.0, 1.5, in_features)


def _weighted_error(w: np.ndarray, imp: np.ndarray, blocks) -> float:
    """sum c (w - dequantized)^2 over the weight, with int4_blocks' c = importance * sqrt(sigma2 + w^2)."""
    from edgepeft.exporters.onnx_quant import dequantize_int4

    w64 = w.astype(np.float64)
    c = imp[:, None] * np.sqrt((w64 ** 2).mean(0, keepdims=True) + w64 ** 2)
    return float((c * (w64 - dequantize_int4(*blocks, w.shape[0])) ** 2).sum())


def _peak_mib(fn, w, imp, zero_points: bool) -> float:
    """The most memory fn's allocations (numpy's included) held at once, in MiB: one traced run."""
    tracemalloc.start()
    try:
        fn(w, imp, 32, zero_points)
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def matrices(args) -> None:
    from edgepeft.exporters.int4_search import int4_blocks

    impls = {"current": int4_blocks}
    if args.before:
        impls = {f"before ({args.before})": _int4_blocks_at(args.before), **impls}
    rng = np.random.default_rng(0)
    print(f"zero points: {not args.symmetric}; median of {args.runs} runs; CPU = process time\n")
    print("| projection [out, in] | " + " | ".join(f"{n} CPU s | {n} wall s | {n} peak MiB" for n in impls)
          + (" | speed-up (CPU) | weighted error vs before |" if len(impls) > 1 else " |"))
    print("|---|" + "---|---|---|" * len(impls) + ("---|---|" if len(impls) > 1 else ""))
    for name, (out_f, in_f) in LLAMA_1B.items():
        w, imp = _weights(out_f, in_f, rng)
        cpu = {n: [] for n in impls}
        wall = {n: [] for n in impls}
        outs = {}
        for _ in range(args.runs):
            for n, fn in impls.items():  # alternately, so drift in the machine's load hits both
                c, t = time.process_time(), time.perf_counter()
                outs[n] = fn(w, imp, 32, not args.symmetric)
                cpu[n].append(time.process_time() - c)
                wall[n].append(time.perf_counter() - t)
        med = {n: (statistics.median(cpu[n]), statistics.median(wall[n]), _peak_mib(fn, w, imp, not args.symmetric))
               for n, fn in impls.items()}
        row = f"| {name} {out_f}x{in_f} | " + " | ".join(f"{c:.2f} | {t:.2f} | {m:.0f}" for c, t, m in med.values())
        if len(impls) > 1:
            before = next(iter(med.values()))[0]
            errs = [_weighted_error(w, imp, o) for o in outs.values()]
            row += f" | {before / med['current'][0]:.1f}x | {errs[-1] / errs[0]:.4f}"
        print(row + " |", flush=True)


class _StepTimes:
    """Stands in for bundle_export's Progress: records each step's wall and CPU time (the
    process's, all threads; Progress keeps wall time only)."""

    times: dict[str, list[float]] = {}

    def __init__(self, total: int, quiet: bool):
        self.desc = None

    def step(self, desc: str):
        self.desc, self.start = desc, (time.perf_counter(), time.process_time())

    def done(self):
        if self.desc is not None:
            _add(self.times, self.desc, self.start)
        self.desc = None

    def items(self, iterable, total=None, unit=""):
        return iterable

    def close(self, summary=False):
        pass


def _add(times: dict, key: str, start: tuple[float, float]):
    wall, cpu = times.setdefault(key, [0.0, 0.0])
    times[key] = [wall + time.perf_counter() - start[0], cpu + time.process_time() - start[1]]


def _timed(fn, key: str, times: dict):
    def wrapper(*a, **k):
        start = (time.perf_counter(), time.process_time())
        try:
            return fn(*a, **k)
        finally:
            _add(times, key, start)
    return wrapper


def export(args) -> None:
    from edgepeft.errors import EdgepeftError
    from edgepeft.exporters import bundle_export, onnx_export, onnx_quant

    inner: dict[str, list[float]] = {}
    bundle_export.Progress = _StepTimes
    onnx_export.activation_importance = _timed(onnx_export.activation_importance, "calibration pass", inner)
    # the search runs in the graph build's worker threads: this row sums their calls
    onnx_quant.int4_blocks = _timed(_int4_blocks_at(args.before) if args.before else onnx_quant.int4_blocks,
                                    "4-bit block search (summed over threads)", inner)
    with tempfile.TemporaryDirectory() as tmp:
        start = (time.perf_counter(), time.process_time())
        try:
            bundle_export.export_bundle(args.base, args.out or Path(tmp) / "bundle", formats="onnx", onnx_quant="int4",
                                        quiet=True)
        except EdgepeftError as e:
            raise SystemExit(f"int4_search.py: {e}")
        total = [time.perf_counter() - start[0], time.process_time() - start[1]]
    print(f"export {args.base} --format onnx --onnx-quant int4"
          + (f", int4_blocks of {args.before}" if args.before else "") + f": {total[0]:.1f} s wall, {total[1]:.1f} s CPU\n")
    print("| step | wall s | share of wall | CPU s |\n|---|---|---|---|")
    steps = _StepTimes.times
    for desc, (wall, cpu) in steps.items():
        print(f"| {desc} | {wall:.1f} | {wall / total[0]:.0%} | {cpu:.1f} |")
    for key, (w, c) in inner.items():  # inside the steps above
        print(f"| - {key} | {w:.1f} | {w / total[0]:.0%} | {c:.1f} |")
    rest = [t - sum(v[i] for v in steps.values()) for i, t in enumerate(total)]
    print(f"| outside the steps (reading the request, tokenizer, manifest, rename) | {rest[0]:.1f} | "
          f"{rest[0] / total[0]:.0%} | {rest[1]:.1f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    m = sub.add_parser("matrices", help="int4_blocks on Llama-3.2-1B-shaped weights")
    m.add_argument("--before", metavar="REV", help="also time (and compare with) the int4_blocks of this git revision")
    m.add_argument("--runs", type=int, default=3)
    m.add_argument("--symmetric", action="store_true", help="no zero points (what int4-pure searches)")
    e = sub.add_parser("export", help="an int4 ONNX export's time per step")
    e.add_argument("--base", default="builtin:smollm2-135m")
    e.add_argument("--before", metavar="REV", help="export with the int4_blocks of this git revision")
    e.add_argument("--out", type=Path, help="keep the bundle here (default: a temporary directory, removed)")
    args = ap.parse_args()
    if args.what == "matrices" and args.runs < 1:
        ap.exit(2, "int4_search.py: --runs must be at least 1\n")
    (matrices if args.what == "matrices" else export)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
