#!/usr/bin/env python3
"""Our runtime against the engines a user would otherwise pick, in one sitting, on the demo model.

    python benchmarks/compare_engines.py [--genai-python PATH] [--threads 2] [--new-tokens 128]

Each engine runs in its own process, one after the other, with the same prompt, the same number
of threads and exactly --new-tokens greedy tokens (EOS ignored):
  edgepeft onnx   int4 ONNX bundle (builtin:smollm2-135m + shipped adapters; qkv, down_proj
                  and lm_head at 8 bits), int4-pure (every MatMul at 4 bits, like genai's int4),
                  and int4-pure with --slots none (no adapter slots, as a --merge export has)
  edgepeft gguf   Q4_K_M GGUF from the same bundle
  llama-cpp-python  the same GGUF files through llama_cpp.Llama (adapter = reload with lora_path)
  onnxruntime-genai its own int4 build of the same base (python -m onnxruntime_genai.models.builder),
                  run with a Python that has onnxruntime-genai (--genai-python; its builder needs a
                  newer transformers than our exporter, so it lives in its own venv)
  pytorch+peft    fp32 eager transformers + PEFT (adapter switch = PeftModel.set_adapter)
After the speed runs, each quantized build's base model is scored against PyTorch fp32 on
`edgepeft verify`'s prompts (KL, top-1), so speed is read next to what the quantization costs.
Writes benchmarks/results/{README.md,results.json,speed.png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from edgepeft.byte_sizes import format_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engines import PROMPT, RESULTS, genai, genai_build, llama_cpp_direct, ours, pytorch  # noqa: E402


def r16_all_adapter(base_dir: Path, out: Path) -> Path:
    """A rank-16 LoRA on all seven projections with random non-zero B: for speed only (issue 5's
    'rank-16 adapter on all seven linear projections' case)."""
    if (out / "adapter_model.safetensors").is_file():
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


def bench_bundle(work: Path, base_dir: Path, adapters: dict[str, Path], onnx_quant: str, formats: str,
                 slots: str | None = None):
    """The demo bundle's content plus the rank-16 all-projection adapter, at `onnx_quant`; with
    slots="none", the base alone without adapter slots (what --merge exports)."""
    from edgepeft.demo import BASE, QUANTS
    from edgepeft.exporters.reuse import export_or_reuse

    adapters = {} if slots == "none" else {**adapters, "r16-all7": r16_all_adapter(base_dir, work / "r16-all7")}
    out = work / f"smollm2-135m-bench-{onnx_quant}{'-noslots' if slots == 'none' else ''}"
    return export_or_reuse(BASE, out, adapters, formats, onnx_quant, QUANTS["gguf"], slots=slots)[0]


def onnx_size(bundle) -> str:
    """The ONNX base's files (graph and external data) of `bundle`, in MiB."""
    total = sum(bundle.file(r).stat().st_size for r in bundle.manifest["files"] if r.startswith("onnx/"))
    return format_bytes(total, "MiB", 0)


def quality(base_dir: Path, bundles: dict, genai_dir: Path | None) -> dict:
    """Base-model logits against PyTorch fp32 as `edgepeft verify` scores them (its prompts, each
    followed by PyTorch's greedy answer; mean KL, top-1 agreement), so that each engine's speed
    is read next to what its quantization costs.
    onnxruntime-genai's model runs through plain onnxruntime here (its graph uses only
    onnxruntime operators), with an empty KV cache, as verify scores ours."""
    import numpy as np
    import onnxruntime as ort
    import torch
    import transformers

    from edgepeft.exporters.verify import PROMPTS, agreement, reference_sequences, shared_prefix
    from edgepeft.runtime import Engine

    engines = {name: Engine.open(root, backend=backend, threads=2) for name, (root, backend) in bundles.items()}
    tok = next(iter(engines.values())).tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    seqs, refs = reference_sequences(model, prompts, tok.stop_ids(chat=True))
    shared = shared_prefix(seqs)
    scorers = {name: engine.score for name, engine in engines.items()}
    if genai_dir is not None:
        session = ort.InferenceSession(str(genai_dir / "model.onnx"), providers=["CPUExecutionProvider"])
        past = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]
        decoder = json.loads((genai_dir / "genai_config.json").read_text())["model"]["decoder"]
        empty = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), np.float32)

        def genai_score(ids):
            feed = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
            feed.update({name: empty for name in past})
            return session.run(["logits"], feed)[0][0]

        scorers["onnxruntime-genai int4"] = genai_score
    out = {}
    for name, score in scorers.items():
        a = agreement(refs, [score(seq) for seq in seqs], shared)
        out[name] = {"kl": round(a["kl"], 3), "top1": round(a["top1"], 3)}
    return out


def versions(results: dict) -> str:
    e = results["engines"]
    m = e.get("edgepeft onnx int4", {}).get("machine", {})
    out = {"edgepeft": m.get("edgepeft"), "onnxruntime": m.get("onnxruntime"), "llama-cpp-python": m.get("llama_cpp"),
           "onnxruntime-genai": e.get("onnxruntime-genai int4", {}).get("version"),
           **e.get("pytorch+peft fp32", {}).get("versions", {})}
    return ", ".join(f"{k} {v}" for k, v in out.items() if v)


def table(results: dict) -> list[str]:
    rows = ["| engine | model file | decode tok/s, base | decode tok/s, with adapter (median over adapters) | adapter switch, median | TTFT, base | base vs PyTorch: KL / top-1 |",
            "|---|---|---|---|---|---|---|"]
    for name, r in results["engines"].items():
        if "error" in r:
            rows.append(f"| {name} | | failed: {r['error']} | | | | |")
            continue
        base = r.get("base", r)
        ads = r.get("adapters", {})
        ad_rates = sorted(a["decode_tokens_per_s"] for a in ads.values())
        ad_rate = f"{ad_rates[len(ad_rates) // 2]:.1f}" if ad_rates else r.get("no_adapters", "n/a (no adapter API)")
        sw = sorted(a.get("switch_ms_median", a.get("switch_ms")) for a in ads.values())
        switch = f"{sw[len(sw) // 2]:.4f} ms" if sw else "n/a"
        if ads and "switch_is" in next(iter(ads.values())):
            switch += f" ({next(iter(ads.values()))['switch_is']})"
        ttft = f"{base['ttft_ms']:.1f} ms" if base.get("ttft_ms") is not None else ""
        q = r.get("quality")
        fidelity = f"{q['kl']:.3f} / {q['top1']:.0%}" if q else ("reference" if name.startswith("pytorch") else "")
        rows.append(f"| {name} | {r.get('file', '')} | {base['decode_tokens_per_s']:.1f} | {ad_rate} | {switch} | {ttft} | {fidelity} |")
    return rows


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, base, adapted, switch = [], [], [], []
    for name, r in results["engines"].items():
        if "error" in r:
            continue
        names.append(name)
        base.append(r.get("base", r)["decode_tokens_per_s"])
        ads = r.get("adapters", {})
        rates = sorted(a["decode_tokens_per_s"] for a in ads.values())
        adapted.append(rates[len(rates) // 2] if rates else 0)
        sws = sorted(a.get("switch_ms_median", a.get("switch_ms")) for a in ads.values())
        switch.append(sws[len(sws) // 2] if sws else float("nan"))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(names))
    a1.bar([i - 0.2 for i in x], base, 0.4, label="base")
    a1.bar([i + 0.2 for i in x], adapted, 0.4, label="with adapter")
    a1.set_xticks(list(x), names, rotation=20, ha="right")
    a1.set_ylabel("decode tokens/s (higher is better)")
    a1.legend()
    a1.set_title(f"SmolLM2-135M, {results['new_tokens']} greedy tokens, {results['threads']} threads")
    a2.bar(list(x), switch)
    a2.set_yscale("log")
    a2.set_xticks(list(x), names, rotation=20, ha="right")
    a2.set_ylabel("adapter switch, ms (log; lower is better)")
    a2.set_title("switching task adapters")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_engines(args, work: Path) -> dict:
    """Every engine once, one after the other, then each quantized build's quality; the results
    object written to results.json."""
    from edgepeft.demo.shipped import shipped_adapters
    from edgepeft.exporters.builtin import materialize

    base_dir = materialize("builtin:smollm2-135m")
    bundle = bench_bundle(work, base_dir, shipped_adapters(), "int4", "onnx,gguf")
    pure = bench_bundle(work, base_dir, shipped_adapters(), "int4-pure", "onnx")
    noslots = bench_bundle(work, base_dir, shipped_adapters(), "int4-pure", "onnx", slots="none")
    adapters = {n: Path(a["source"]) for n, a in bundle.adapters.items()}
    gguf_size = format_bytes(bundle.file(bundle.backends["gguf"]["model"]).stat().st_size, "MiB", 0)
    results = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "threads": args.threads,
               "new_tokens": args.new_tokens, "runs": args.runs, "prompt": PROMPT, "when": time.strftime("%Y-%m-%d %H:%M"),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
               "engines": {}}
    e, n = results["engines"], (args.threads, args.runs, args.new_tokens)
    ours_builds = {"edgepeft onnx int4": (bundle, "onnx"), "edgepeft onnx int4-pure": (pure, "onnx"),
                   "edgepeft onnx int4-pure, --slots none": (noslots, "onnx"), "edgepeft gguf Q4_K_M": (bundle, "gguf")}
    for name, (b, backend) in ours_builds.items():
        e[name] = {**ours(b.root, backend, *n), "file": onnx_size(b) if backend == "onnx" else gguf_size}
    e["edgepeft onnx int4-pure, --slots none"]["no_adapters"] = "n/a (no slots: merged-only base)"
    e["llama-cpp-python Q4_K_M"] = {**llama_cpp_direct(bundle.root, *n), "file": gguf_size}
    model_dir = None
    if args.genai_python:
        model_dir = genai_build(args.genai_python, base_dir, work / "genai-int4", work / "genai-cache", args.threads,
                                model_id="HuggingFaceTB/SmolLM2-135M-Instruct")
        e["onnxruntime-genai int4"] = {**genai(args.genai_python, model_dir, *n),
                                       "file": format_bytes((model_dir / "model.onnx.data").stat().st_size, "MiB", 0)}
    else:
        e["onnxruntime-genai int4"] = {"error": "not run: pass --genai-python"}
    e["pytorch+peft fp32"] = {**pytorch(base_dir, adapters, *n), "file": ""}
    # After every speed run, so that it cannot disturb them.
    scored = quality(base_dir, {name: (b.root, backend) for name, (b, backend) in ours_builds.items()}, model_dir)
    scored["llama-cpp-python Q4_K_M"] = scored["edgepeft gguf Q4_K_M"]  # the same file through the same llama.cpp
    for name, q in scored.items():
        if name in e and "error" not in e[name]:
            e[name]["quality"] = q
    return results


def report(results: dict, args) -> list[str]:
    """results/README.md's lines."""
    e = results["engines"]
    lines = ["# Engine comparison: SmolLM2-135M-Instruct with the demo adapters", "",
             "Adapters: the three shipped demo adapters, and `r16-all7`, a random rank-16 LoRA on all seven "
             "projections (for speed only).", "",
             f"- when: {results['when']}; machine: {results['machine']['platform']}, {results['machine']['cpus']} CPUs",
             f"- command: `python benchmarks/compare_engines.py --threads {args.threads} --runs {args.runs} "
             f"--new-tokens {args.new_tokens}{' --genai-python GENAI_VENV/bin/python' if args.genai_python else ''}`",
             f"- versions: {versions(results)}",
             f"- each engine in its own process, one after the other; {args.new_tokens} greedy tokens (EOS ignored), "
             f"{args.threads} threads, median of {args.runs} runs after a warm-up", ""]
    lines += table(results)
    if "error" in e["edgepeft onnx int4"]:
        return lines
    lines += ["", "edgepeft's own figures (from `edgepeft bench`) for each adapter:", ""]
    for eng in ("edgepeft onnx int4", "edgepeft onnx int4-pure", "edgepeft gguf Q4_K_M"):
        r = e[eng]
        if "error" in r:
            continue
        for name, a in r["adapters"].items():
            paired = f" ({a['decode_vs_base']}x the base, runs paired)" if "decode_vs_base" in a else ""
            lines.append(f"- {eng}, {name}: decode {a['decode_tokens_per_s']} tok/s{paired}, switch median "
                         f"{a['switch_ms_median']} ms / p95 {a['switch_ms_p95']} ms, {a['switch_vs_reload']}x "
                         f"faster than reloading the base ({r['base']['reload_s']} s)")
        m = r.get("memory")
        if m:
            lines.append(f"- {eng} peak RSS from the {m.get('peaks_from', 'process start')}: "
                         f"{format_bytes(m['peak_rss_0_adapters'], 'MiB', 0)} (0 adapters), "
                         f"{format_bytes(m['peak_rss_1_adapter'], 'MiB', 0)} (1), "
                         f"{format_bytes(m['peak_rss_all_adapters'], 'MiB', 0)} "
                         f"(all); adapters add {m['added_per_file_byte']}x their file size")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--genai-python", default=os.environ.get("GENAI_PYTHON"),
                    help="python with onnxruntime-genai (and its builder) installed")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "edgepeft" / "bench"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = run_engines(args, work)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = report(results, args)
    (RESULTS / "README.md").write_text("\n".join(lines) + "\n")
    try:
        plot(results, RESULTS / "speed.png")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
