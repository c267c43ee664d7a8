#!/usr/bin/env python3
"""ONNX int4 recipes at real sizes: decode speed against the bytes a decode step reads, in one
sitting, beside onnxruntime-genai's int4 build and llama-cpp-python on the same base.

    python benchmarks/int4_recipes.py --bundle int4=B1 --bundle int4-pure=B2 [--genai DIR]
        [--genai-python PY] [--rounds 5] [--threads N] [--name NAME]

Each --bundle is an exported bundle of the same base (for example
`edgepeft export BASE --out B2 --format onnx --onnx-quant int4-pure`); the first one's GGUF, if
it has one, also runs under llama-cpp-python. Every round starts one fresh process per engine
(export_scale.py's children: an 8-token warm-up, then 64 greedy tokens, EOS ignored), the order
rotated by round; medians over rounds, ratios as medians of per-round ratios. decode_bytes is
the manifest's (weight bytes one decoded token reads); for genai's graph it is counted the same
way. Writes benchmarks/results/NAME.{md,json} (default int4_recipes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import export_scale  # noqa: E402
import scale_report  # noqa: E402
from compare_engines import PROMPT, RESULTS  # noqa: E402

from edgepeft.byte_sizes import format_bytes  # noqa: E402


def runners(bundles: dict, genai: Path | None, genai_python: str, threads: int, n: int,
            chat: bool) -> tuple[dict, dict]:
    """({label: (python, child code, n)}, {label: decode bytes}) for every engine."""
    from edgepeft.bundle import Bundle

    common = {"prompt": PROMPT, "threads": threads, "warm": export_scale.WARMUP_TOKENS, "n": n, "chat": chat}
    out, reads = {}, {}
    for i, (label, path) in enumerate(bundles.items()):
        b = Bundle.open(path)
        out[f"edgepeft onnx {label}"] = (sys.executable, export_scale.OURS.format(
            bundle=str(b.root), backend="onnx", adapter=None, **common), n)
        reads[f"edgepeft onnx {label}"] = b.backends["onnx"].get("decode_bytes")
        if i == 0 and "gguf" in b.backends:
            q = b.backends["gguf"]["quant"]
            out[f"edgepeft gguf {q}"] = (sys.executable, export_scale.OURS.format(
                bundle=str(b.root), backend="gguf", adapter=None, **common), n)
            out[f"llama-cpp-python {q}"] = (sys.executable, export_scale.LLAMA.format(bundle=str(b.root), **common), n)
            reads[f"edgepeft gguf {q}"] = reads[f"llama-cpp-python {q}"] = b.backends["gguf"].get("decode_bytes")
    if genai is not None:
        import onnx

        from edgepeft.exporters.decode_bytes import onnx_decode_bytes

        out["onnxruntime-genai int4"] = (genai_python, export_scale.GENAI.format(model=str(genai), **common), n)
        reads["onnxruntime-genai int4"] = onnx_decode_bytes(onnx.load(str(genai / "model.onnx"),
                                                                      load_external_data=False))
    return out, reads


def report(results: dict) -> str:
    s = results["summary"]
    lines = [f"# ONNX int4 recipes at real sizes: {results['name']}", "",
             f"- when: {results['when']}; machine: {results['machine']['cpu']}, {results['machine']['cpus']} CPUs, "
             f"load average at the end {results['machine']['load_average']}",
             f"- command: `python benchmarks/int4_recipes.py {' '.join(results['argv'])}`",
             f"- {results['rounds_n']} rounds, {results['threads']} threads, 64 greedy tokens after an 8-token warm-up;"
             " medians; ratios are medians of per-round ratios", "",
             "| engine | decode tok/s | weight bytes / token | implied GB/s | TTFT ms | load s | peak RSS | vs genai |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in s.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:80]} | | | | | | |")
            continue
        vs = r["vs"].get("onnxruntime-genai int4")
        lines.append(f"| {name} | {r['decode_tokens_per_s']:.1f} | "
                     f"{format_bytes(r['decode_bytes'], 'MiB', 0) if r.get('decode_bytes') else ''} | "
                     f"{r.get('implied_gb_per_s', '')} | {r['ttft_ms']:.0f} | {r['load_s']:.2f} | "
                     f"{format_bytes(r['peak_rss_median'], 'GiB', 2)} | {f'{vs:.2f}x' if vs else ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", action="append", required=True, metavar="LABEL=DIR")
    ap.add_argument("--genai", type=Path, help="onnxruntime-genai's int4 build of the same base")
    ap.add_argument("--genai-python", default=os.environ.get("GENAI_PYTHON", sys.executable))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--name", default="int4_recipes")
    ap.add_argument("--no-chat", action="store_true", help="the prompt as plain text (a base without a chat template)")
    args = ap.parse_args(argv)
    bundles = dict(b.split("=", 1) for b in args.bundle if "=" in b)
    if len(bundles) != len(args.bundle):
        ap.error("--bundle takes LABEL=DIR")
    started = time.strftime("%Y-%m-%d %H:%M")
    engines, reads = runners(bundles, args.genai, args.genai_python, args.threads, 64, not args.no_chat)
    rounds = export_scale.decode_rounds(engines, args.rounds)
    summary = export_scale.summarize(rounds, {k: {"decode_bytes": v} for k, v in reads.items()})
    results = {"name": args.name, "when": started, "argv": sys.argv[1:], "threads": args.threads,
               "rounds_n": args.rounds, "rounds": rounds, "summary": summary, "machine": scale_report.machine(),
               "versions": scale_report.versions(None)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=1) + "\n")
    text = report(results)
    (RESULTS / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
