#!/usr/bin/env python3
"""The same bundle decoded by two versions of the runtime, interleaved round by round in one
sitting: is a change free for the calls it does not target?

    python benchmarks/before_after.py --before PATH [--bundle DIR] [--backend onnx,gguf] [--rounds 6]

PATH is a checkout of the earlier version (e.g. `git worktree add /tmp/before <commit>`). Each
round runs, in fresh processes and in alternating order, the earlier and the current runtime on
the bundle (default: the demo's), each measuring exactly --new-tokens greedy tokens (EOS ignored)
with no adapter and with --adapter, median of --runs. The table gives each side's median and the
median of the per-round ratios current / earlier. Writes benchmarks/results/NAME.{md,json} (--name, default before_after).
--before-bundle gives the earlier side its own bundle (exported by the earlier version), for
changes to the exported graph.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PROMPT = "Write a short story about a robot who learns to paint, in three paragraphs."

CHILD = """
import json, statistics, sys
if {earlier}:  # the earlier version is first on sys.path; an editable install's finder would win over it
    sys.meta_path[:] = [f for f in sys.meta_path if not str(getattr(f, "__module__", "")).startswith("__editable__")]
from edgepeft.runtime import Engine
engine = Engine.open({bundle!r}, backend={backend!r}, threads={threads})
out = {{}}
for adapter in (None, {adapter!r}):
    engine.complete({prompt!r}, adapter=adapter, max_new_tokens=8, ignore_eos=True, chat=True)  # warm-up
    runs = [engine.complete({prompt!r}, adapter=adapter, max_new_tokens={n}, ignore_eos=True, chat=True).timings
            for _ in range({runs})]
    runs = [r if isinstance(r, dict) else r.to_json() for r in runs]  # an earlier runtime's timings: a dict
    out[adapter or "base"] = {{"decode": statistics.median(r["decode_tokens_per_s"] for r in runs),
                              "prefill_s": statistics.median(r["prefill_s"] for r in runs)}}
import edgepeft.runtime.engine as e
out["source"] = e.__file__
print(json.dumps(out))
"""


def shim(before: Path, into: Path) -> Path:
    """The earlier checkout on sys.path as it imports: itself when it maps its own layout
    (edgepeft/__init__.py's _map_checkout_layout), else copied into the installed layout
    (pyproject's package-dir), for checkouts from before that."""
    if "_map_checkout_layout" in (before / "edgepeft" / "__init__.py").read_text():
        return before
    pkg = into / "edgepeft"
    shutil.copytree(before / "edgepeft", pkg)
    for sub in ("runtime", "exporters"):
        if (before / sub).is_dir():
            shutil.copytree(before / sub, pkg / sub)
    return into


def child(path: str | None, **kw) -> dict:
    env = dict(os.environ)
    if path:
        env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
    code = textwrap.dedent(CHILD.format(prompt=PROMPT, earlier=bool(path), **kw))
    out = subprocess.run([sys.executable, "-P", "-c", code],  # -P: not the working directory first
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "child failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="checkout of the earlier version")
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--before-bundle", default=None,
                    help="the bundle the earlier side runs (default: --bundle), e.g. exported by the earlier version "
                         "when the change is in the exported graph")
    ap.add_argument("--name", default="before_after", help="results file name in benchmarks/results (no suffix)")
    ap.add_argument("--backend", default="onnx,gguf")
    ap.add_argument("--adapter", default="json")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--label", default=None, help="what changed (for the table)")
    args = ap.parse_args()
    if args.bundle:
        bundle = Path(args.bundle)
    else:
        from edgepeft.cache import cache_dir
        from edgepeft.demo import demo_bundle

        bundle = demo_bundle(cache_dir() / "demo" / "smollm2-135m")[0].root
    before = Path(args.before).resolve()
    before_bundle = Path(args.before_bundle) if args.before_bundle else bundle
    commit = subprocess.run(["git", "-C", str(before), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "?"
    now = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip() or "?"
    backends = args.backend.split(",")
    started = time.strftime("%Y-%m-%d %H:%M")
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        old = str(shim(before, Path(tmp)))
        for i in range(args.rounds):
            row = {}
            for backend in backends:
                kw = dict(backend=backend, threads=args.threads, adapter=args.adapter, n=args.new_tokens, runs=args.runs)
                sides = [("before", old, before_bundle), ("after", None, bundle)]
                for side, path, side_bundle in (sides if i % 2 == 0 else sides[::-1]):
                    row[f"{backend}/{side}"] = child(path, bundle=str(side_bundle), **kw)
            rounds.append(row)
            print(f"round {i + 1}/{args.rounds}: " + ", ".join(
                f"{k} {v['base']['decode']:.1f}/{v[args.adapter]['decode']:.1f}" for k, v in row.items()), flush=True)
    assert all(str(before) in r[f"{b}/before"]["source"] or tmp in r[f"{b}/before"]["source"]
               for r in rounds for b in backends)
    summary = {}
    for backend in backends:
        for call in ("base", args.adapter):
            b = [r[f"{backend}/before"][call]["decode"] for r in rounds]
            a = [r[f"{backend}/after"][call]["decode"] for r in rounds]
            summary[f"{backend} {call}"] = {"before": round(statistics.median(b), 1), "after": round(statistics.median(a), 1),
                                            "ratio": round(statistics.median(x / y for x, y in zip(a, b)), 3)}
    result = {"when": started, "before": commit, "after": now, "bundle": str(bundle),
              "before_bundle": str(before_bundle), "threads": args.threads,
              "new_tokens": args.new_tokens, "rounds": rounds, "summary": summary, "label": args.label,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Decode speed before/after{': ' + args.label if args.label else ''}", "",
             f"- when: {started}; machine: {result['machine']['platform']}, {result['machine']['cpus']} CPUs",
             f"- before: {commit} on {before_bundle.name}, after: {now} on {bundle.name}; {args.new_tokens} greedy tokens (EOS ignored), "
             f"{args.threads} threads, median of {args.runs} runs per process; {args.rounds} rounds, sides alternated",
             f"- command: `python benchmarks/before_after.py --before CHECKOUT_OF_{commit} --rounds {args.rounds}"
             + (" --before-bundle BUNDLE_EXPORTED_BY_IT" if args.before_bundle else "") + f" --adapter {args.adapter}`", "",
             "| backend, call | before tok/s (median) | after tok/s (median) | after / before (median of per-round ratios) |",
             "|---|---|---|---|"]
    for k, v in summary.items():
        lines.append(f"| {k} | {v['before']} | {v['after']} | {v['ratio']} |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
