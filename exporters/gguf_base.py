"""Base -> GGUF with the `gguf` package, quantized by llama.cpp's own quantizer.

Tensor names come from gguf's TensorNameMap; hyper-parameters and tokenizer keys from its
constants. llama.cpp applies rotary embeddings to interleaved pairs for the llama architecture,
so q_proj/k_proj rows are permuted here exactly as llama.cpp's converter does (and LoRA B of
those modules must get the same permutation: see gguf_adapter.py). The other families use the
NeoX rotary layout in llama.cpp and need no permutation. What differs per family (architecture,
norm offset, keys llama.cpp reads, what it hard-codes) comes from exporters/archs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgepeft.errors import EngineError, UnsupportedModel, require
from edgepeft.llama_log import quiet_llama_cpp

from .archs import Arch, Layout, arch_of
from .gguf_vocab import add_tokenizer, gguf_name
from .hf_base import BaseModel
from .hf_config import SLIDING, rope_parameters

GGUF_QUANTS = ("F32", "F16", "Q8_0", "Q4_K_M")  # common ones; any LLAMA_FTYPE_MOSTLY_* name works


def gguf_arch(gguf, model_type: str):
    """gguf-py's MODEL_ARCH of `model_type`'s family."""
    return getattr(gguf.MODEL_ARCH, arch_of(model_type).gguf_arch)


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for q/k (per head: interleave the two rotary halves).
    Works on any array whose first axis is n_head * head_dim (weights, biases, LoRA B)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def needs_permutation(model_type: str) -> bool:
    return arch_of(model_type).permute_qk


def check_gguf_layout(where, config, dims: dict, lay: Layout) -> None:
    """Refuse, at export, a config llama.cpp would run differently from PyTorch because it
    hard-codes that part of the family (exporters/archs: gguf_swa_pattern, ...)."""
    fam = arch_of(config.model_type)
    if fam.gguf_swa_pattern and any(lay.windows):
        want = tuple(bool((i + 1) % fam.gguf_swa_pattern) for i in range(len(lay.windows)))
        if tuple(w is not None for w in lay.windows) != want:
            raise UnsupportedModel(f"{where}: llama.cpp's {fam.gguf_arch.lower()} runs every {fam.gguf_swa_pattern}th "
                                   "layer global and the rest sliding-window; this config's layer_types differ "
                                   "(export --format onnx instead)")
    local = rope_parameters(config, SLIDING)["rope_theta"] if fam.local_rope else None
    if fam.gguf_local_rope_base is not None and local is not None and float(local) != fam.gguf_local_rope_base:
        raise UnsupportedModel(f"{where}: llama.cpp's {fam.gguf_arch.lower()} rotates sliding-window layers with base "
                               f"{fam.gguf_local_rope_base:g}, this config with {float(local):g} (export --format onnx)")
    uncapped = [what for what, cap in (("attention scores", lay.attn_softcap), ("logits", lay.final_softcap)) if not cap]
    if fam.gguf_softcaps and uncapped:
        raise UnsupportedModel(f"{where}: llama.cpp's {fam.gguf_arch.lower()} always soft-caps attention scores and "
                               f"logits, this config leaves its {' and '.join(uncapped)} uncapped "
                               "(export --format onnx instead)")
    if fam.gguf_scale_is_head_dim and abs(lay.attention_scale - dims["head_dim"] ** -0.5) > 1e-7:
        raise UnsupportedModel(f"{where}: llama.cpp's {fam.gguf_arch.lower()} scales attention by head_dim ** -0.5, this "
                               f"config by {fam.attention_scale_field} (export --format onnx instead)")


def _add_family_keys(writer, base: BaseModel, fam: Arch, lay: Layout) -> None:
    """The keys llama.cpp reads for this family beyond the common ones: sliding window,
    soft-caps, and LongRoPE's original context and attention factor."""
    if fam.gguf_sliding_window:
        writer.add_sliding_window(int(base.dims["sliding_window"] or 0))
    if lay.attn_softcap:
        writer.add_attn_logit_softcapping(float(lay.attn_softcap))
    if lay.final_softcap:
        writer.add_final_logit_softcapping(float(lay.final_softcap))
    if rope_parameters(base.config)["rope_type"] == "longrope":
        rotary = base.model.model.rotary_emb
        writer.add_rope_scaling_orig_ctx_len(int(rotary.config.original_max_position_embeddings))
        writer.add_rope_scaling_attn_factors(float(rotary.attention_scaling))


def write_base_gguf(base: BaseModel, dest: Path, ftype: str = "F32") -> None:
    """Write `base` as a GGUF file of type F32 or F16 at `dest` (quantize() makes the rest)."""
    gguf = require("gguf", "export")
    d, cfg, fam, lay = base.dims, base.config, base.arch, base.layout
    check_gguf_layout(base.local_dir, cfg, d, lay)
    arch = gguf_arch(gguf, cfg.model_type)
    names = gguf.get_tensor_name_map(arch, d["num_layers"])
    writer = gguf.GGUFWriter(str(dest), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_context_length(d["max_position_embeddings"])
    writer.add_embedding_length(d["hidden_size"])
    writer.add_block_count(d["num_layers"])
    writer.add_feed_forward_length(d["intermediate_size"])
    writer.add_head_count(d["num_heads"])
    writer.add_head_count_kv(d["num_kv_heads"])
    writer.add_key_length(d["head_dim"])
    writer.add_value_length(d["head_dim"])
    writer.add_rope_dimension_count(lay.rotary_dim)
    scaling = rope_parameters(cfg)
    writer.add_rope_freq_base(float(scaling["rope_theta"]))
    writer.add_layer_norm_rms_eps(d["rms_norm_eps"])
    writer.add_vocab_size(d["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if ftype == "F16" else gguf.LlamaFileType.ALL_F32)
    rope_type = scaling["rope_type"]
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif rope_type not in ("default", "llama3", "longrope"):
        raise UnsupportedModel(f"{base.local_dir}: rope scaling {rope_type!r} is not exported to GGUF yet")
    _add_family_keys(writer, base, fam, lay)
    name = gguf_name(Path(base.source).name or base.source, add_tokenizer(writer, gguf, base))
    if name is not None:
        writer.add_name(name)

    state = base.model.state_dict()
    if rope_type == "llama3":
        # llama.cpp reads llama3 rope scaling as a rope_freqs tensor (inverse frequency factors).
        inv = base.model.model.rotary_emb.inv_freq.detach().float().numpy()
        base_inv = 1.0 / (float(scaling["rope_theta"]) ** (np.arange(0, d["head_dim"], 2, dtype=np.float32) / d["head_dim"]))
        writer.add_tensor("rope_freqs.weight", (base_inv / inv).astype(np.float32))
    elif rope_type == "longrope":  # llama.cpp picks one of these per context (n_ctx > original: long)
        for key, tensor in (("long_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_LONG),
                            ("short_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT)):
            writer.add_tensor(f"{gguf.TENSOR_NAMES[tensor]}.weight", np.asarray(scaling[key], np.float32))
    tied = d["tie_word_embeddings"]
    for name in sorted(state, key=_tensor_order):
        if name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        stem, _, suffix = name.rpartition(".")
        target = names.get_name(stem)
        if target is None:
            if "rotary_emb" in name:
                continue
            raise UnsupportedModel(f"{base.local_dir}: tensor {name} has no GGUF name")
        w = state[name].detach().float().numpy()
        if fam.norms.offset and name.endswith("norm.weight"):
            w = w + np.float32(fam.norms.offset)  # llama.cpp multiplies by the stored weight: store 1 + w
        if fam.permute_qk:
            if stem.endswith("q_proj"):
                w = permute_rows(w, d["num_heads"])
            elif stem.endswith("k_proj"):
                w = permute_rows(w, d["num_kv_heads"])
        # ggml keeps norms and biases in F32 whatever the file type, like llama.cpp's converter.
        keep_f32 = ftype == "F32" or w.ndim == 1
        writer.add_tensor(f"{target}.{suffix}", w.astype(np.float32 if keep_f32 else np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tensor_order(name: str):
    parts = name.split(".")
    layer = int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else (-1 if "embed" in name else 10**9)
    return layer, name


def gguf_ftype(quant: str) -> int | None:
    """llama.cpp's file type for `quant`; None for F32/F16, which we write directly."""
    if quant.upper() in ("F32", "F16"):
        return None
    from edgepeft.native_check import llama_cpp_problem

    broken = llama_cpp_problem()
    if broken:  # its quantizer would kill the export midway; export checks this before anything slow
        raise EngineError(broken)
    llama_cpp = require("llama_cpp", "gguf")
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}", None)
    if ftype is None:
        raise UnsupportedModel(f"unknown GGUF quant type {quant!r} (e.g. {', '.join(GGUF_QUANTS)})")
    return ftype


def quantize_gguf(src: Path, dest: Path, quant: str, threads: int = 0) -> None:
    """Quantize with llama.cpp's own quantizer (any LLAMA_FTYPE_MOSTLY_<quant> name)."""
    llama_cpp = require("llama_cpp", "gguf")
    ftype = gguf_ftype(quant)
    quiet_llama_cpp(llama_cpp)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), params)
    if rc != 0:
        raise UnsupportedModel(f"{src}: llama.cpp could not quantize it to {quant} (code {rc})")
