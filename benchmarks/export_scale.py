"""Export at real sizes: a random bf16 base shaped like Llama-3.2-1B or Qwen3-4B (no download),
with a rank-16 LoRA on all seven projections; our export (ONNX int4, GGUF Q4_K_M and the adapter)
beside onnxruntime-genai's builder (int4, CPU) on the same checkpoint, one after the other in one
sitting: wall time, peak RSS, and our export's split by step.

    python benchmarks/export_scale.py --shape llama-1b [--genai-python /tmp/genai/bin/python]

The checkpoint is written one decoder layer per safetensors shard, so making it never holds the
model; the tokenizer is the builtin SmolLM2's (its vocabulary fits; calibration reads real text).
Results: benchmarks/results/export_scale-<shape>.md. Decode speed at these sizes is measured by
compare_engines.py on the bundle this writes.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

SHAPES = {  # (hidden, layers, heads, kv heads, head_dim, intermediate, vocab, extra config)
    "tiny": (256, 2, 4, 2, 64, 512, 49152, {"model_type": "llama", "rope_theta": 10000.0}),
    "llama-1b": (2048, 16, 32, 8, 64, 8192, 128256, {
        "model_type": "llama", "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"}}),
    "qwen3-4b": (2560, 36, 32, 8, 128, 9728, 151936, {
        "model_type": "qwen3", "rope_theta": 1000000.0, "max_position_embeddings": 40960}),
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def step(msg: str, t0: float = time.perf_counter()) -> None:
    print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)


def make_base(shape: str, out: Path, tokenizer: Path) -> None:
    """Random bf16 weights (std 0.02, norms 1), one shard per decoder layer; tied embeddings."""
    import torch
    from safetensors.torch import save_file

    h, n, nh, nkv, hd, inter, vocab, extra = SHAPES[shape]
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": [("Qwen3" if extra["model_type"] == "qwen3" else "Llama") + "ForCausalLM"],
           "hidden_size": h, "num_hidden_layers": n, "num_attention_heads": nh, "num_key_value_heads": nkv,
           "head_dim": hd, "intermediate_size": inter, "vocab_size": vocab, "rms_norm_eps": 1e-6,
           "tie_word_embeddings": True, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
           "torch_dtype": "bfloat16", "max_position_embeddings": 8192, **extra}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / f, out / f)
    g = torch.Generator().manual_seed(0)

    def rnd(*s):
        return (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)

    def ones(k):
        return torch.ones(k, dtype=torch.bfloat16)

    weight_map = {}

    def shard(tensors: dict, file: str) -> None:
        save_file(tensors, str(out / file))
        weight_map.update(dict.fromkeys(tensors, file))

    shard({"model.embed_tokens.weight": rnd(vocab, h), "model.norm.weight": ones(h)}, "embed.safetensors")
    for i in range(n):
        p = f"model.layers.{i}"
        t = {f"{p}.self_attn.q_proj.weight": rnd(nh * hd, h), f"{p}.self_attn.k_proj.weight": rnd(nkv * hd, h),
             f"{p}.self_attn.v_proj.weight": rnd(nkv * hd, h), f"{p}.self_attn.o_proj.weight": rnd(h, nh * hd),
             f"{p}.mlp.gate_proj.weight": rnd(inter, h), f"{p}.mlp.up_proj.weight": rnd(inter, h),
             f"{p}.mlp.down_proj.weight": rnd(h, inter),
             f"{p}.input_layernorm.weight": ones(h), f"{p}.post_attention_layernorm.weight": ones(h)}
        if extra["model_type"] == "qwen3":
            t |= {f"{p}.self_attn.q_norm.weight": ones(hd), f"{p}.self_attn.k_norm.weight": ones(hd)}
        shard(t, f"layer{i:03d}.safetensors")
    # the index transformers reads for a sharded checkpoint (onnxruntime-genai's builder loads it so)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def make_lora(shape: str, base: Path, out: Path, rank: int = 16) -> None:
    """A rank-16 LoRA on all seven projections, written as PEFT writes one (random, non-zero B)."""
    import torch
    from safetensors.torch import save_file

    h, n, nh, nkv, hd, inter, _, _ = SHAPES[shape]
    dims = {"q_proj": (h, nh * hd), "k_proj": (h, nkv * hd), "v_proj": (h, nkv * hd), "o_proj": (nh * hd, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(n):
        for m, (fin, fout) in dims.items():
            p = f"base_model.model.model.layers.{i}.{'self_attn' if m in PROJECTIONS[:4] else 'mlp'}.{m}"
            tensors[f"{p}.lora_A.weight"] = torch.randn(rank, fin, generator=g) * 0.02
            tensors[f"{p}.lora_B.weight"] = torch.randn(fout, rank, generator=g) * 0.02
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": list(PROJECTIONS), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "base_model_name_or_path": str(base)}))


def timed(cmd: list[str], work: Path) -> dict:
    """Run `cmd` under GNU time: its wall time, its peak RSS and its stderr."""
    if not Path("/usr/bin/time").is_file():
        raise SystemExit("export_scale.py: needs GNU time at /usr/bin/time for each run's peak RSS")
    stats = work / "time.txt"
    p = subprocess.run(["/usr/bin/time", "-o", str(stats), "-f", "%e %M", *cmd], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"export_scale.py: {' '.join(cmd[:4])} ... failed:\n{p.stderr[-3000:]}")
    wall, kib = stats.read_text().split()[-2:]
    return {"wall_s": round(float(wall), 1), "peak_rss_gib": round(int(kib) * 1024 / 2**30, 2), "stderr": p.stderr}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=SHAPES, default="tiny")
    ap.add_argument("--work", type=Path, default=Path("/tmp/export_scale"))
    ap.add_argument("--genai-python", default=None, help="a Python with onnxruntime-genai (its builder); none: skipped")
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    from edgepeft.exporters.builtin import materialize

    work = args.work / args.shape
    base, lora = work / "base", work / "lora"
    if not (base / "config.json").is_file():
        step(f"writing a random bf16 {args.shape} base to {base}")
        make_base(args.shape, base, materialize("builtin:smollm2-135m"))
        make_lora(args.shape, base, lora)
    runs = {}
    step("our export: ONNX int4 + GGUF Q4_K_M + the adapter")
    runs["edgepeft"] = timed([sys.executable, "-m", "edgepeft", "export", str(base), "--out", str(work / "bundle"),
                              "--adapter", f"a={lora}", "--format", "onnx,gguf"], work)
    if args.genai_python:
        step("onnxruntime-genai's builder: int4, CPU")
        runs["genai"] = timed([args.genai_python, "-m", "onnxruntime_genai.models.builder", "-m", str(base),
                               "-o", str(work / "genai"), "-p", "int4", "-e", "cpu", "-c", str(work / "hf-cache")], work)
    split = re.search(r"edgepeft: done in \S+ \((.*)\)", runs["edgepeft"]["stderr"])
    report(args, runs, split.group(1) if split else "")
    return 0


def report(args, runs: dict, split: str) -> None:
    import onnxruntime
    import transformers

    name = args.name or f"export_scale-{args.shape}"
    lines = [f"# Export at real sizes: {args.shape}", "",
             f"- when: {date.today()}; machine: {platform.machine()}, {platform.processor() or 'cpu'}; "
             f"transformers {transformers.__version__}, onnxruntime {onnxruntime.__version__}",
             f"- command: `python benchmarks/export_scale.py --shape {args.shape}"
             + (" --genai-python PY`" if args.genai_python else "`"), "",
             "| tool | what | wall s | peak RSS GiB |", "|---|---|---|---|",
             f"| edgepeft export | ONNX int4 + GGUF Q4_K_M + rank-16 LoRA | {runs['edgepeft']['wall_s']} | "
             f"{runs['edgepeft']['peak_rss_gib']} |"]
    if "genai" in runs:
        lines.append(f"| onnxruntime-genai builder | ONNX int4 | {runs['genai']['wall_s']} | "
                     f"{runs['genai']['peak_rss_gib']} |")
    lines += ["", f"Our export by step: {split}", ""]
    out = Path(__file__).parent / "results" / f"{name}.md"
    out.write_text("\n".join(lines))
    (out.with_suffix(".json")).write_text(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "stderr"}
                                                      for k, v in runs.items()} | {"split": split}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
