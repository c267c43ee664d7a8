#!/usr/bin/env python3
"""The builtin SmolLM2 bundle exported, verified and benched under two Python environments
(e.g. transformers 4.57 and 5.x), in one sitting: does the stack change what we ship?

    python benchmarks/stack_compare.py --env old=/venv4/bin/python --env new=/venv5/bin/python \\
        [--out DIR] [--rounds 5] [--new-tokens 64]

Each environment runs this checkout (its editable install, or PYTHONPATH). Steps, one line each:
1. `edgepeft export builtin:smollm2-135m` with the shipped adapters (the demo's int4 + Q4_K_M),
   one environment after the other, timed;
2. every bundle file's sha256 side by side (the manifest's own record);
3. `edgepeft verify --json` of each bundle, each in its own environment;
4. decode speed of both bundles, both backends, base and one adapter, in fresh processes of the
   first environment's runtime (the runtime does not import transformers), interleaved by round.
Writes benchmarks/results/NAME.{md,json} (--name, default stack_compare).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PROMPT = "Write a short story about a robot who learns to paint, in three paragraphs."
ADAPTER = "json"

CHILD = """
import json, statistics
from edgepeft.runtime import Engine
engine = Engine.open({bundle!r}, backend={backend!r})
out = {{}}
for adapter in (None, {adapter!r}):
    engine.complete({prompt!r}, adapter=adapter, max_new_tokens=8, ignore_eos=True, chat=True)  # warm-up
    runs = [engine.complete({prompt!r}, adapter=adapter, max_new_tokens={n}, ignore_eos=True, chat=True).timings
            for _ in range(3)]
    out[adapter or "base"] = statistics.median(r.decode_tokens_per_s for r in runs)
print(json.dumps(out))
"""


def step(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(python: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([python, *args], capture_output=True, text=True)


def export(python: str, out: Path) -> float:
    """Export the demo bundle with `python`'s environment; wall seconds."""
    code = ("import sys; from edgepeft.cli import main; from edgepeft.demo.shipped import shipped_adapters; "
            "a = [x for n, p in shipped_adapters().items() for x in ('--adapter', f'{n}={p}')]; "
            f"sys.exit(main(['export', 'builtin:smollm2-135m', '--out', {str(out)!r}, *a, '--format', 'onnx,gguf', "
            "'--onnx-quant', 'int4', '--gguf-quant', 'Q4_K_M', '--quiet']))")
    start = time.perf_counter()
    p = run(python, "-c", code)
    if p.returncode:
        sys.exit(f"stack_compare: export with {python} failed: {p.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - start


def file_hashes(bundle: Path) -> dict[str, str]:
    manifest = json.loads((bundle / "edgepeft.json").read_text())
    return {name: entry["sha256"] for name, entry in manifest["files"].items()}


def verify(python: str, bundle: Path) -> list[dict]:
    p = run(python, "-m", "edgepeft", "verify", str(bundle), "--reference", "builtin:smollm2-135m", "--json")
    try:
        checks = json.loads(p.stdout)["checks"]
    except (ValueError, KeyError):
        sys.exit(f"stack_compare: verify with {python} gave no result: {p.stderr.strip().splitlines()[-1:]}")
    keep = ("backend", "adapter", "kl", "top1", "max_abs", "task_accuracy", "ok")
    return [{k: c.get(k) for k in keep} for c in checks]


def decode(python: str, bundle: Path, backend: str, new_tokens: int) -> dict:
    code = CHILD.format(bundle=str(bundle), backend=backend, adapter=ADAPTER, prompt=PROMPT, n=new_tokens)
    p = run(python, "-c", code)
    if p.returncode:
        sys.exit(f"stack_compare: decode on {bundle} ({backend}) failed: {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def speed(python: str, bundles: dict[str, Path], rounds: int, new_tokens: int) -> dict:
    """{backend: {label: {base|adapter: [tok/s per round]}}}, order alternating by round."""
    out: dict = {}
    labels = list(bundles)
    for r in range(rounds):
        order = labels if r % 2 == 0 else labels[::-1]
        for backend in ("onnx", "gguf"):
            for label in order:
                got = decode(python, bundles[label], backend, new_tokens)
                for key, value in got.items():
                    out.setdefault(backend, {}).setdefault(label, {}).setdefault(key, []).append(value)
        step(f"speed round {r + 1}/{rounds} done")
    return out


def report(envs: dict, times: dict, hashes: dict, checks: dict, rates: dict) -> str:
    a, b = list(envs)
    lines = [f"# Stack comparison: {a} vs {b}", "", "Environments: " + ", ".join(f"{k} = `{v}`" for k, v in envs.items()),
             "", "| step | " + " | ".join(envs) + " |", "|---|---|---|",
             "| export wall (s) | " + " | ".join(f"{times[k]:.0f}" for k in envs) + " |", ""]
    same = [f for f in hashes[a] if hashes[a][f] == hashes[b].get(f)]
    diff = sorted(set(hashes[a]) ^ set(hashes[b]) | {f for f in hashes[a] if f in hashes[b]} - set(same))
    lines += [f"Bundle files identical: {len(same)} of {len(hashes[a])}" + (f"; differing: {', '.join(diff)}" if diff else ""), ""]
    lines += ["| backend | adapter | " + " | ".join(f"{k} KL / top-1 / task" for k in envs) + " |", "|---|---|---|---|"]
    for ca, cb in zip(checks[a], checks[b]):
        cell = [f"{c['kl']:.4f} / {c['top1']:.3f} / {'-' if c['task_accuracy'] is None else format(c['task_accuracy'], '.3f')}"
                for c in (ca, cb)]
        lines.append(f"| {ca['backend']} | {ca['adapter'] or 'base'} | " + " | ".join(cell) + " |")
    lines += ["", "Decode tok/s, medians over rounds (ratio: median of per-round b/a):", "",
              f"| backend | call | {a} | {b} | {b}/{a} |", "|---|---|---|---|---|"]
    for backend, by in rates.items():
        for key in by[a]:
            ra, rb = by[a][key], by[b][key]
            ratio = statistics.median(y / x for x, y in zip(ra, rb))
            lines.append(f"| {backend} | {key} | {statistics.median(ra):.1f} | {statistics.median(rb):.1f} | {ratio:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--env", action="append", required=True, metavar="LABEL=PYTHON", help="exactly two")
    ap.add_argument("--out", type=Path, default=Path("/tmp/stack_compare"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--name", default="stack_compare")
    args = ap.parse_args(argv)
    envs = dict(e.split("=", 1) for e in args.env if "=" in e)
    if len(envs) != 2 or len(args.env) != 2:
        ap.error("--env LABEL=PYTHON twice, with two different labels")
    if args.rounds < 1 or args.new_tokens < 1:
        ap.error("--rounds and --new-tokens must be at least 1")
    bundles = {k: args.out / k for k in envs}
    times = {}
    for label, python in envs.items():
        step(f"export with {label}")
        times[label] = export(python, bundles[label])
    hashes = {k: file_hashes(b) for k, b in bundles.items()}
    checks = {}
    for label, python in envs.items():
        step(f"verify with {label}")
        checks[label] = verify(python, bundles[label])
    rates = speed(next(iter(envs.values())), bundles, args.rounds, args.new_tokens)
    text = report(envs, times, hashes, checks, rates)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(text)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(
        {"envs": envs, "export_s": times, "hashes": hashes, "verify": checks, "decode": rates}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
