#!/usr/bin/env python3
"""Concurrent streams, batched: the curve for 1/2/4/8 streams on both backends, beside the same
requests run one after another on llama.cpp (what llama.cpp does with requests on different
adapters: its server batches only requests with the same LoRA settings).

    python benchmarks/batching.py [--bundle DIR] [--levels 1,2,4,8] [--runs 3] [--new-tokens 128]

Each backend runs `edgepeft bench --concurrency` (runtime/bench.run_concurrency: every level and
mode once per round, rounds interleaved, medians), all streams on the base and each stream on a
different adapter; then the GGUF engine with batching off runs the same requests sequentially.
Writes benchmarks/results/batching.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, r, mode, style in (
            ("edgepeft ONNX int4, base", result["onnx"], "base", "-o"),
            ("edgepeft ONNX int4, a different adapter per stream", result["onnx"], "adapters", "-s"),
            ("edgepeft GGUF Q4_K_M, base", result["gguf"], "base", "--o"),
            ("edgepeft GGUF Q4_K_M, a different adapter per stream", result["gguf"], "adapters", "--s"),
            ("llama.cpp, the same requests one after another", result["sequential"], "adapters", ":^")):
        rows = r["levels"][mode]
        xs = [int(c) for c in rows]
        ax.plot(xs, [rows[str(c)]["aggregate_tokens_per_s"] for c in xs], style, label=label)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate tokens/s (prefill included)")
    ax.set_xticks([int(c) for c in result["onnx"]["levels"]["base"]])
    ax.set_title(f"SmolLM2-135M, {result['threads']} threads, {result['new_tokens']} new tokens per stream")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True, help="a bundle with ONNX and GGUF bases and several adapters")
    ap.add_argument("--levels", default="1,2,4,8")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from edgepeft.byte_sizes import format_bytes
    from edgepeft.runtime.bench import run_concurrency

    levels = [int(x) for x in args.levels.split(",")]
    kw = dict(threads=args.threads, runs=args.runs, new_tokens=args.new_tokens)
    result = {"when": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads, "new_tokens": args.new_tokens,
              "runs": args.runs, "bundle": args.bundle}
    for backend in ("onnx", "gguf"):
        result[backend] = run_concurrency(args.bundle, levels, backend=backend, **kw)
        print(backend, "done", flush=True)
    result["sequential"] = run_concurrency(args.bundle, levels, backend="gguf", batching=False, memory=False, **kw)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "batching.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, RESULTS / "batching.png")
    m = result["onnx"]["machine"]
    lines = ["# Concurrent streams: continuous batching with mixed adapters", "",
             f"- when: {result['when']}; machine: {m['platform']}, {m['cpus']} CPUs; onnxruntime "
             f"{m.get('onnxruntime')}, llama-cpp-python {m.get('llama_cpp')}",
             f"- {args.new_tokens} greedy tokens per stream (EOS ignored), {args.threads} threads, streams started "
             f"together, median of {args.runs} interleaved rounds; adapters per stream in turn: "
             + ", ".join(result["onnx"]["adapters"]),
             f"- command: `python benchmarks/batching.py --bundle BUNDLE --levels {args.levels} --runs {args.runs}`",
             "- aggregate: all streams' tokens over the wall time from start to the last stream's end (prefill "
             "included); per stream: each stream's decode tok/s (median); TTFT: start to first token; peak RSS: "
             "a fresh process running that many streams once", "",
             "| engine | streams on | streams | aggregate tok/s | vs 1 stream | per stream tok/s | TTFT median / max | peak RSS |",
             "|---|---|---|---|---|---|---|---|"]
    for label, key in (("edgepeft ONNX " + str(result["onnx"]["quant"]), "onnx"),
                       ("edgepeft GGUF " + str(result["gguf"]["quant"]), "gguf"),
                       ("llama.cpp, one after another", "sequential")):
        for mode, rows in result[key]["levels"].items():
            for c, row in rows.items():
                rss = format_bytes(row["peak_rss"]) if "peak_rss" in row else "—"
                lines.append(f"| {label} | {'base' if mode == 'base' else 'different adapters'} | {c} | "
                             f"{row['aggregate_tokens_per_s']:.1f} | {row['vs_one']:.2f}x | "
                             f"{row['per_stream_decode_tokens_per_s']:.1f} | {row['ttft_ms_median']:.0f} / "
                             f"{row['ttft_ms_max']:.0f} ms | {rss} |")
    (RESULTS / "batching.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
