"""The machine, the versions and the Markdown report of benchmarks/export_scale.py."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version

from edgepeft.byte_sizes import format_bytes
from scale_hybrids import LIKE as HYBRIDS

LIKE = {"tiny": "a tiny Llama (llama3 rope scaling)", "tiny-qwen3": "a tiny Qwen3", "llama-1b": "Llama-3.2-1B",
        "qwen3-4b": "Qwen3-4B", **HYBRIDS}
PACKAGES = ("edgepeft", "onnxruntime", "onnxruntime-genai", "llama_cpp_python", "transformers", "peft", "torch",
            "numpy", "gguf", "safetensors")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    try:
        import psutil

        ram = psutil.virtual_memory().total
    except ImportError:
        ram = None
    return {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(), "ram_bytes": ram,
            "load_average": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version()}


def versions(genai: str | None) -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    if genai:  # as the decode child reported it (it may run under another Python)
        out["onnxruntime-genai"] = genai
    return out


def _gib(n) -> str:
    return format_bytes(n, "GiB", 2) if n else ""


def _commands(results: dict, args) -> list[str]:
    flags = f"--shape {args.shape} --rounds {args.rounds} --threads {args.threads}"
    flags += (" --skip-genai" if args.skip_genai else f" --genai-python {args.genai_python}") + (f" --new-tokens {args.new_tokens}"
                                                             if args.new_tokens != 64 else "")
    lines = ["Commands (WORK is --work/SHAPE, default /tmp/export_scale/SHAPE):", "",
             f"- `python benchmarks/export_scale.py {flags}` (all of what follows, in one sitting)",
             "- our export: `python -m edgepeft export WORK/base --out WORK/bundle --adapter a=WORK/lora "
             "--format onnx,gguf`"]
    if "onnxruntime-genai" in results["exports"]:
        lines.append("- genai's build: `python -m onnxruntime_genai.models.builder -i WORK/base -o WORK/genai-int4 "
                     "-p int4 -e cpu -c WORK/genai-cache`, then `intra_op_num_threads` set to --threads in its "
                     "genai_config.json")
    return lines + [""]


def _export_table(results: dict) -> list[str]:
    rows = ["## Export", "", "| tool | output | wall | peak RSS, largest process | peak RSS, process tree "
            "(sampled every 0.2 s) | output files |", "|---|---|---|---|---|---|"]
    what = {"edgepeft": "ONNX int4 + GGUF Q4_K_M + the adapter for each", "onnxruntime-genai": "ONNX int4"}
    for tool, r in results["exports"].items():
        if "error" in r:
            rows.append(f"| {tool} | failed: {r['error']} | {r['wall_s']:.1f} s | | | |")
            continue
        rows.append(f"| {tool} | {what[tool]} | {r['wall_s']:.1f} s | {_gib(r['peak_rss'])} | "
                    f"{_gib(r['tree_rss_sampled'])} | {_gib(r.get('output_bytes'))} |")
    ours = results["exports"]["edgepeft"]
    rows += ["", "Our export by step (its own log lines):", "", "| step | s | share of wall |", "|---|---|---|"]
    for step, s in ours["steps"].items():
        rows.append(f"| {step} | {s:.1f} | {s / ours['wall_s']:.0%} |")
    rest = ours["wall_s"] - sum(ours["steps"].values())
    rows.append(f"| outside the steps (Python start and imports, work between steps) | {rest:.1f} | "
                f"{rest / ours['wall_s']:.0%} |")
    return rows + [""]


def _decode_table(results: dict) -> list[str]:
    summary = results["summary"]
    refs = [n for n in summary if n.startswith(("llama-cpp-python", "onnxruntime-genai"))]
    n = len(results["rounds"])
    rows = ["## Decode", "", f"{n} round{'s' if n != 1 else ''}; in each, every engine in a fresh process (order "
            f"rotated by round), {results['threads']} threads, {results['new_tokens']} greedy tokens after the "
            "chat prompt (EOS ignored) after a warm-up generation. Medians over rounds; ratios are medians of "
            "per-round ratios of decode speed; GB/s = weights read per token x median tok/s.", "",
            "| engine | model file | weights read per token | load | TTFT | decode tok/s | GB/s | "
            + " | ".join(f"/ {r.split(' ')[0]}" for r in refs) + " | / its base | peak RSS |",
            "|---|---|---|---|---|---|---|" + "---|" * len(refs) + "---|---|"]
    for name, s in summary.items():
        if "error" in s:
            rows.append(f"| {name} | failed: {s['error']} |" + " |" * (8 + len(refs)))
            continue
        ratios = " | ".join("" if s["vs"].get(r) is None else f"{s['vs'][r]:.2f}" for r in refs)
        own = s["vs"].get("its base")
        size = format_bytes(s.get("file_bytes"), "MiB", 0) + (
            f" + {format_bytes(s['adapter_bytes'], 'MiB', 1)} adapter" if s.get("adapter_bytes") else "")
        rows.append(f"| {name} | {size} | {format_bytes(s.get('decode_bytes'), 'MiB', 0)} | {s['load_s']:.2f} s | "
                    f"{s['ttft_ms']:.0f} ms | {s['decode_tokens_per_s']:.1f} | {s.get('implied_gb_per_s', '')} | "
                    f"{ratios} | {'' if own is None else f'{own:.2f}'} | {_gib(s['peak_rss_median'])} |")
    return rows + ["", "Peak RSS: the process's own peak (load, warm-up and the measured generation), median over "
                   "rounds. KV caches differ: our ONNX backend and genai size theirs for the call, our GGUF "
                   "backend and llama-cpp-python allocate min(context length, 4096) cells at load.", ""]


def _shape(cfg: dict) -> str:
    """The text model's dimensions, and its layer kinds where it mixes them."""
    t = cfg.get("text_config", cfg)
    kinds = t.get("layer_types") or []
    mix = ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds)) if len(set(kinds)) > 1 else ""
    hd = t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]
    return (f"hidden {t['hidden_size']}, {t['num_hidden_layers']} layers{f' ({mix})' if mix else ''}, "
            f"{t['num_attention_heads']}/{t['num_key_value_heads']} heads, head_dim {hd}, intermediate "
            f"{t['intermediate_size']}, vocabulary {t['vocab_size']}")


def markdown(results: dict, args) -> str:
    cfg, m, base = results["config"], results["machine"], results["base"]
    targets = ", ".join(base.get("targets") or ["all seven projections"])
    head = [f"# Export and decode at real sizes: {results['shape']}", "",
            f"A random bf16 base shaped like {LIKE[results['shape']]} ({_shape(cfg)}, tied embeddings; "
            f"{_gib(base['weight_bytes'])} of weights, N(0, 0.02), norms 1) with the "
            f"builtin SmolLM2 tokenizer, and a random rank-16 LoRA on every linear layer of the text model "
            f"({targets}; {format_bytes(base['adapter_bytes'], 'MiB', 1)} fp32). Random weights: speed and "
            "memory only, no quality figures.", "",
            f"- when: {results['when']}; machine: {m['platform']}, {m['cpu']}, {m['cpus']} CPUs, "
            f"{_gib(m['ram_bytes'])} RAM, load average at the start {m['load_average']}"
            + (f", at the end {results['load_average_end']}" if results.get("load_average_end") else ""),
            "- versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()), ""]
    return "\n".join(head + _commands(results, args) + _export_table(results) + _decode_table(results))
