#!/usr/bin/env python3
"""Decode speed of one base (no adapters) on our two backends, beside llama-cpp-python on the same
GGUF and onnxruntime-genai's own int4 build of the same model, in one sitting.

    python benchmarks/base_speed.py builtin:gemma3-270m [--genai-python PATH] [--threads 2] [--rounds 3]

The bundle is int4 ONNX + Q4_K_M GGUF exported by edgepeft; the engines run in their own
processes, in rounds that visit every engine once (so drift hits them alike), each with the same
chat prompt, threads and exactly --new-tokens greedy tokens (EOS ignored); the table gives each
engine's median and its per-round ratio to llama-cpp-python. Writes
benchmarks/results/<name>.{md,json}. compare_engines.py does the same, with adapters, PyTorch and
quality scores, for the demo model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from engines import RESULTS, genai, genai_build, llama_cpp_direct, ours  # noqa: E402

REFERENCE = "llama-cpp-python Q4_K_M"


def runners(args, work: Path) -> dict:
    """{engine: a function running it once}, on the bundle edgepeft exports (made once)."""
    from edgepeft.exporters.hf_base import resolve_base_dir
    from edgepeft.exporters.reuse import export_or_reuse

    bundle = export_or_reuse(args.base, work / "bundle", {}, "onnx,gguf", "int4", "Q4_K_M")[0]
    n = (args.threads, 1, args.new_tokens)
    out = {
        "edgepeft onnx int4": lambda: ours(bundle.root, "onnx", *n),
        "edgepeft gguf Q4_K_M": lambda: ours(bundle.root, "gguf", *n),
        REFERENCE: lambda: llama_cpp_direct(bundle.root, *n),
    }
    if args.genai_python:
        model_dir = genai_build(args.genai_python, resolve_base_dir(args.base), work / "genai-int4", work / "genai-cache",
                                args.threads, builder=[str(HERE / "genai_builder.py")])
        out["onnxruntime-genai int4"] = lambda: genai(args.genai_python, model_dir, *n)
    return out


def summarize(rounds: list[dict]) -> dict:
    """Each engine's median decode rate, its median per-round ratio to llama-cpp-python, its TTFT."""
    summary = {}
    for engine in rounds[0]:
        rates = [r[engine].get("decode_tokens_per_s") for r in rounds]
        if any(x is None for x in rates):
            summary[engine] = {"error": next(r[engine].get("error") for r in rounds if "error" in r[engine])}
            continue
        ratios = [r[engine]["decode_tokens_per_s"] / r[REFERENCE]["decode_tokens_per_s"] for r in rounds
                  if "decode_tokens_per_s" in r.get(REFERENCE, {})]
        summary[engine] = {"decode_median": round(statistics.median(rates), 1),
                           "vs_llama_cpp_median": round(statistics.median(ratios), 2) if ratios else None,
                           "ttft_ms_median": round(statistics.median(r[engine].get("ttft_ms", 0) for r in rounds), 1)}
    return summary


def report(args, result: dict) -> list[str]:
    lines = [f"# Decode speed: {args.base} (no adapter)", "",
             f"- when: {result['when']}; machine: {result['machine']['platform']}, {result['machine']['cpus']} CPUs",
             f"- command: `python benchmarks/base_speed.py {args.base} --threads {args.threads} --rounds {args.rounds}"
             f" --new-tokens {args.new_tokens}{' --genai-python GENAI_VENV/bin/python' if args.genai_python else ''}`",
             f"- {args.new_tokens} greedy tokens (EOS ignored) after the chat prompt, {args.threads} threads; "
             f"{args.rounds} rounds, each engine once per round in its own process", "",
             "| engine | decode tok/s (median) | / llama-cpp-python (median of per-round ratios) | TTFT (median) |",
             "|---|---|---|---|"]
    for engine, s in result["summary"].items():
        if "error" in s:
            lines.append(f"| {engine} | failed: {s['error']} | | |")
        else:
            lines.append(f"| {engine} | {s['decode_median']} | {s['vs_llama_cpp_median']} | {s['ttft_ms_median']} ms |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", help="builtin:NAME or a Hugging Face directory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--genai-python", default=os.environ.get("GENAI_PYTHON"),
                    help="python with onnxruntime-genai (and its builder) installed")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "edgepeft" / "bench"))
    args = ap.parse_args()
    name = args.base.split(":", 1)[-1] if args.base.startswith("builtin:") else Path(args.base).name
    work = Path(args.work) / name
    work.mkdir(parents=True, exist_ok=True)
    engines = runners(args, work)
    started = time.strftime("%Y-%m-%d %H:%M")
    rounds = []
    for _ in range(args.rounds):
        rounds.append({engine: (r := run()).get("base", r) for engine, run in engines.items()})
    result = {"base": args.base, "when": started, "threads": args.threads, "new_tokens": args.new_tokens,
              "rounds": rounds, "summary": summarize(rounds),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = report(args, result)
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
