#!/usr/bin/env python3
"""Decode speed of our ONNX backend against onnxruntime-genai, interleaved in time.

    python benchmarks/head_to_head.py --genai-python PATH [--rounds 10] [--threads 2] [--baseline-python PATH]

compare_engines.py runs each engine in its own process one after the other, so on a shared
machine an engine can land in a slow minute and another in a fast one (docs/experiments.md has
how far one engine's speed moved between sittings). This script keeps one process per engine too,
but starts them all, then asks each in turn for one 128-token greedy generation, round after
round: drift hits every engine alike, and the per-round ratio to onnxruntime-genai is the figure
to trust. Our workers also run the rank-16 all-projection adapter after each base run, for the
with-adapter / base ratio; the "--slots none" worker (a base without adapter slots, as --merge
exports) shows what is left of the slots' cost in calls without an adapter (they run the graph's
slot-free branch). Uses the bench bundles and genai build that compare_engines.py made
in --work (run it first). Writes benchmarks/results/head_to_head.{md,json}.

--baseline-python PATH runs each of our workers a second time under another Python (a venv with
an earlier edgepeft installed, e.g. main before a change), in the same rounds: the before/after
of a change in one sitting, as the per-round ratio of each worker to its baseline twin.

--bundle LABEL=DIR (repeatable) adds a worker on any other bundle, e.g. int4 recipes
(`--int4-target-kl`); --name NAME writes benchmarks/results/NAME.{md,json} instead of head_to_head.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from engines import PROMPT, RESULTS  # noqa: E402

BASELINE = " (baseline)"  # suffix of the workers run under --baseline-python

OURS = """
import json, sys
from edgepeft.runtime import Engine
engine = Engine.open({bundle!r}, backend="onnx", threads={threads})
prompt = [{{"role": "user", "content": {prompt!r}}}]
adapters = [a for a in ("r16-all7",) if a in engine.adapters]
def rate(adapter):
    t = engine.complete(prompt, adapter=adapter, max_new_tokens={n}, ignore_eos=True, chat=True).timings
    return t["decode_tokens_per_s"] if isinstance(t, dict) else t.decode_tokens_per_s  # a baseline's timings: a dict
for a in [None, *adapters]: rate(a)  # warm-up
print("ready", flush=True)
for line in sys.stdin:
    print(json.dumps({{"base": rate(None), **{{a: rate(a) for a in adapters}}}}), flush=True)
"""

GENAI = """
import json, sys, time
import onnxruntime_genai as og
model = og.Model({model!r})
tok = og.Tokenizer(model)
ids = tok.encode(tok.apply_chat_template(json.dumps([{{"role": "user", "content": {prompt!r}}}]), add_generation_prompt=True))
def rate():
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + {n}, min_length=len(ids) + {n}, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    gen.generate_next_token()
    t1 = time.perf_counter(); count = 1
    while not gen.is_done():
        gen.generate_next_token(); count += 1
    return (count - 1) / (time.perf_counter() - t1)
rate()  # warm-up
print("ready", flush=True)
for line in sys.stdin:
    print(json.dumps({{"base": rate()}}), flush=True)
"""


def start(python: str, code: str) -> subprocess.Popen:
    p = subprocess.Popen([python, "-c", textwrap.dedent(code)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = p.stdout.readline().strip()
    if line != "ready":
        p.kill()
        raise SystemExit(f"head_to_head: a worker failed to start ({python}); run compare_engines.py first")
    return p


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--genai-python", default=os.environ.get("GENAI_PYTHON"), required=not os.environ.get("GENAI_PYTHON"))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "edgepeft" / "bench"))
    ap.add_argument("--baseline-python", default=None, metavar="PATH",
                    help="also run our workers under this Python (an earlier edgepeft), for a before/after")
    ap.add_argument("--bundle", action="append", default=[], metavar="LABEL=DIR",
                    help="one more of our workers, on this bundle (repeatable): e.g. other int4 recipes")
    ap.add_argument("--name", default="head_to_head", help="results file name in benchmarks/results (default head_to_head)")
    return ap.parse_args()


def start_workers(args) -> dict:
    """Every worker started and warm: ours (and their baseline twins), then onnxruntime-genai."""
    work = Path(args.work)
    common = {"threads": args.threads, "prompt": PROMPT, "n": args.new_tokens}
    ours = {"edgepeft onnx int4": "smollm2-135m-bench-int4",
            "edgepeft onnx int4-pure": "smollm2-135m-bench-int4-pure",
            "edgepeft onnx int4-pure, --slots none": "smollm2-135m-bench-int4-pure-noslots"}
    for spec in args.bundle:
        label, sep, folder = spec.partition("=")
        if not sep or not label or not Path(folder).is_dir():
            raise SystemExit(f"head_to_head: --bundle {spec!r}: expected LABEL=DIR with a bundle directory")
        ours[f"edgepeft onnx {label}"] = str(Path(folder).resolve())  # an absolute path: work / it is itself
    pythons = {"": sys.executable, **({BASELINE: args.baseline_python} if args.baseline_python else {})}
    workers = {name + tag: start(python, OURS.format(bundle=str(work / folder), **common))
               for name, folder in ours.items() for tag, python in pythons.items()}
    workers["onnxruntime-genai int4"] = start(args.genai_python, GENAI.format(model=str(work / "genai-int4"), **common))
    return workers


def run_rounds(workers: dict, rounds: int) -> list[dict]:
    """Each round asks every worker in turn for one generation; who goes first rotates."""
    out, names = [], list(workers)
    for r in range(rounds):
        got = {}
        for name in names[r % len(names):] + names[: r % len(names)]:
            workers[name].stdin.write("go\n")
            workers[name].stdin.flush()
            got[name] = json.loads(workers[name].stdout.readline())
        out.append(got)
    for p in workers.values():
        p.stdin.close()
        p.wait()
    return out


def summarize(rounds: list[dict]) -> dict:
    genai = [g["onnxruntime-genai int4"]["base"] for g in rounds]
    summary = {}
    for name in rounds[0]:
        base = [g[name]["base"] for g in rounds]
        row = {"base_median": statistics.median(base),
               "vs_genai_median": statistics.median(b / x for b, x in zip(base, genai))}
        if name + BASELINE in rounds[0]:
            row["vs_baseline_median"] = statistics.median(g[name]["base"] / g[name + BASELINE]["base"] for g in rounds)
        if "r16-all7" in rounds[0][name]:
            ad = [g[name]["r16-all7"] for g in rounds]
            row.update(r16_median=statistics.median(ad),
                       r16_over_base_median=statistics.median(a / b for a, b in zip(ad, base)))
        summary[name] = row
    return summary


def report(args, results: dict) -> list[str]:
    lines = [
        "# ONNX backend against onnxruntime-genai, interleaved",
        "",
        f"- when: {results['when']}; machine: {results['machine']}, {results['cpus']} CPUs",
        f"- command: `{results['command']}`",
        f"- one process per engine, all started first; then {args.rounds} rounds, each asking every engine in "
        f"turn for one {args.new_tokens}-token greedy generation (EOS ignored), {args.threads} threads; our "
        "workers run the rank-16 all-projection adapter right after each base run",
        "- ratios are taken within a round, then the median over rounds",
        "",
        "| engine | decode tok/s, base (median) | base / onnxruntime-genai (median of per-round ratios) "
        "| with r16-all7 adapter (median) | adapter / base (median of per-round ratios) |",
        "|---|---|---|---|---|",
    ]
    for name, row in results["summary"].items():
        r16 = (f"{row['r16_median']:.1f} | {row['r16_over_base_median']:.2f}" if "r16_median" in row else "– | –")
        lines.append(f"| {name} | {row['base_median']:.1f} | {row['vs_genai_median']:.2f} | {r16} |")
    twins = [(name, row["vs_baseline_median"]) for name, row in results["summary"].items() if "vs_baseline_median" in row]
    if twins:
        lines += ["", "| worker | base decode / its baseline twin's (median of per-round ratios) |", "|---|---|"]
        lines += [f"| {name} | {ratio:.3f} |" for name, ratio in twins]
    return lines


def main() -> None:
    args = parse_args()
    rounds = run_rounds(start_workers(args), args.rounds)
    command = " ".join(["python", "benchmarks/head_to_head.py", *sys.argv[1:]]).replace(
        args.genai_python, "GENAI_VENV/bin/python")
    if args.baseline_python:
        command = command.replace(args.baseline_python, "BASELINE_VENV/bin/python")
    results = {"command": command,
               "when": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.platform(), "cpus": os.cpu_count(),
               "threads": args.threads, "new_tokens": args.new_tokens, "rounds": rounds, "summary": summarize(rounds)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=2))
    lines = report(args, results)
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
