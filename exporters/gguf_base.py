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

from . import mapped_pages
from .archs import ATTENTION_MIXER, DELTA_NET, SHORT_CONV, Arch, Layout, arch_of
from .gguf_deltanet import add_deltanet_keys, deltanet_tensor, recurrent_pattern_problem
from .gguf_vocab import add_tokenizer, gguf_name
from .hf_base import BaseModel
from .hf_config import SLIDING, rope_parameters

GGUF_QUANTS = ("F32", "F16", "Q8_0", "Q4_K_M")  # common ones; any LLAMA_FTYPE_MOSTLY_* name works
# How write_base_gguf holds each type's values in numpy (bf16: its bits, numpy has no bfloat16).
_STORAGE = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


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
    if fam.per_layer_input or fam.kv_shared_field:
        raise UnsupportedModel(f"{where}: GGUF export of {config.model_type} (per-layer inputs, KV sharing) is not "
                               "written yet; export --format onnx instead")
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
    conv = fam.block(SHORT_CONV)
    if conv and getattr(config, conv.bias_field, False):
        raise UnsupportedModel(f"{where}: llama.cpp's {fam.gguf_arch.lower()} has no biases in its convolution blocks, "
                               f"this config sets {conv.bias_field} (export --format onnx instead)")
    problem = recurrent_pattern_problem(fam, config, lay.mixers)
    if problem:
        raise UnsupportedModel(f"{where}: {problem}; this config's layer_types differ (export --format onnx instead)")
    if fam.gguf_scale_is_head_dim and abs(lay.attention_scale - dims["head_dim"] ** -0.5) > 1e-7:
        raise UnsupportedModel(f"{where}: llama.cpp's {fam.gguf_arch.lower()} scales attention by head_dim ** -0.5, this "
                               f"config by {fam.attention_scale_field} (export --format onnx instead)")


def _head_count_kv(d: dict, fam: Arch, lay: Layout):
    """KV heads: one number, or per layer with 0 for the layers without a KV cache (a hybrid's
    short convolutions), which is how llama.cpp's lfm2 tells its recurrent layers apart. Its
    qwen35 takes them from full_attention_interval instead and sizes every layer's KV from the
    first layer's count, so it gets one number."""
    if all(m == ATTENTION_MIXER for m in lay.mixers) or fam.block(DELTA_NET):
        return d["num_kv_heads"]
    return [d["num_kv_heads"] if m == ATTENTION_MIXER else 0 for m in lay.mixers]


def _add_family_keys(writer, base: BaseModel, fam: Arch, lay: Layout) -> None:
    """The keys llama.cpp reads for this family beyond the common ones: sliding window,
    soft-caps, LongRoPE's original context and attention factor, a short convolution's kernel,
    a gated DeltaNet's sizes (gguf_deltanet.py)."""
    conv = fam.block(SHORT_CONV)
    if conv:
        writer.add_shortconv_l_cache(conv.kernel(base.config))
    if fam.block(DELTA_NET):
        add_deltanet_keys(writer, fam, base.config)
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
    """Write `base` as a GGUF file of type F32, F16 or BF16 at `dest` (quantize_gguf makes the
    rest); norms and biases stay F32 in every type."""
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
    writer.add_head_count_kv(_head_count_kv(d, fam, lay))
    writer.add_key_length(d["head_dim"])
    writer.add_value_length(d["head_dim"])
    writer.add_rope_dimension_count(lay.rotary_dim)
    scaling = rope_parameters(cfg)
    writer.add_rope_freq_base(float(scaling["rope_theta"]))
    writer.add_layer_norm_rms_eps(d["rms_norm_eps"])
    writer.add_vocab_size(d["vocab_size"])
    writer.add_file_type({"F16": gguf.LlamaFileType.MOSTLY_F16, "BF16": gguf.LlamaFileType.MOSTLY_BF16}.get(
        ftype, gguf.LlamaFileType.ALL_F32))
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

    plan = _rope_tensors(gguf, base, scaling) + _weight_tensors(base, names, ftype)
    # gguf-py writes one tensor at a time once every tensor's name, shape and type is declared
    # (add_tensor_info, then write_tensor_data in the same order): each weight is read from the
    # checkpoint, converted and written before the next, instead of add_tensor holding them all.
    # Its lazy tensors (gguf.lazy) would defer the same conversions through a graph of numpy
    # stand-ins; these plain functions need none of that.
    for target, shape, gtype, _ in plan:
        nbytes = int(np.prod(shape)) * np.dtype(_STORAGE[gtype]).itemsize
        writer.add_tensor_info(target, shape, np.dtype(_STORAGE[gtype]), nbytes,
                               raw_dtype=gguf.GGMLQuantizationType[gtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for target, shape, gtype, make in plan:
        w = make()
        assert w.shape == tuple(shape) and w.dtype == _STORAGE[gtype], target
        writer.write_tensor_data(w)
        del w
    writer.close()


def _rope_tensors(gguf, base: BaseModel, scaling: dict) -> list:
    """The rotary tensors llama.cpp reads for llama3 and longrope scaling, as write plan entries."""
    d, rope_type, out = base.dims, scaling["rope_type"], []
    if rope_type == "llama3":
        # llama.cpp reads llama3 rope scaling as a rope_freqs tensor (inverse frequency factors).
        inv = base.model.model.rotary_emb.inv_freq.detach().float().numpy()
        base_inv = 1.0 / (float(scaling["rope_theta"]) ** (np.arange(0, d["head_dim"], 2, dtype=np.float32) / d["head_dim"]))
        freqs = (base_inv / inv).astype(np.float32)
        out.append(("rope_freqs.weight", freqs.shape, "F32", lambda: freqs))
    elif rope_type == "longrope":  # llama.cpp picks one of these per context (n_ctx > original: long)
        for key, tensor in (("long_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_LONG),
                            ("short_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT)):
            factors = np.asarray(scaling[key], np.float32)
            out.append((f"{gguf.TENSOR_NAMES[tensor]}.weight", factors.shape, "F32", lambda f=factors: f))
    return out


def _weight_tensors(base: BaseModel, names, ftype: str) -> list:
    """(GGUF name, shape, GGML type, function making the array) for every weight, in llama.cpp's
    order; the function reads the weight from the checkpoint when the writer gets to it, in any
    float dtype (upcast to float32 as torch's .float() does, exact from bf16/fp16)."""
    d, fam = base.dims, base.arch
    shapes = dict(base.model.state_dict())
    plan = []
    for name in sorted(shapes, key=_tensor_order):
        if name == "lm_head.weight" and d["tie_word_embeddings"]:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        block = deltanet_tensor(fam, d.get("linear_heads"), name, tuple(shapes[name].shape))
        if block is not None:
            plan.append(_block_entry(base, name, ftype, *block))
            continue
        stem, _, suffix = name.rpartition(".")
        target = names.get_name(stem)
        if target is None:
            if "rotary_emb" in name:
                continue
            raise UnsupportedModel(f"{base.local_dir}: tensor {name} has no GGUF name")
        shape = tuple(shapes[name].shape)
        # A depthwise convolution [channels, 1, kernel] is written [channels, kernel], as llama.cpp's
        # converter squeezes it, and in F32, which ggml's ssm_conv reads (its quantizer skips it).
        depthwise = suffix == "weight" and _is_depthwise_conv(fam, stem)
        if depthwise:
            shape = (shape[0], shape[2])
        # ggml keeps norms and biases in F32 whatever the file type, like llama.cpp's converter.
        gtype = "F32" if len(shape) == 1 or depthwise else ftype
        heads = (d["num_heads"] if stem.endswith("q_proj") else d["num_kv_heads"] if stem.endswith("k_proj")
                 else None) if fam.permute_qk else None

        depthwise = shape if depthwise else None

        def make(name=name, gtype=gtype, heads=heads, depthwise=depthwise):
            if gtype == "BF16":
                w = _bf16_bits(base.stored(name))
            else:
                w = base.tensor(name).numpy()
                if fam.norms.offset and name.endswith("norm.weight"):
                    w = w + np.float32(fam.norms.offset)  # llama.cpp multiplies by the stored weight: store 1 + w
            if heads:
                w = permute_rows(w, heads)
            if depthwise:
                w = w.reshape(depthwise)
            return w.astype(_STORAGE[gtype], copy=False)  # no copy of what is already float32

        plan.append((f"{target}.{suffix}", shape, gtype, make))
    return plan


def _block_entry(base: BaseModel, name: str, ftype: str, target: str, shape: tuple, f32: bool, transform) -> tuple:
    """The write plan entry of a tensor a mixer block names and transforms itself
    (gguf_deltanet.py); `f32`: kept in F32 whatever the file type (vectors, the convolution)."""
    gtype = "F32" if f32 else ftype

    def make():
        w = _bf16_bits(base.stored(name)) if gtype == "BF16" else base.tensor(name).numpy()
        return np.ascontiguousarray(transform(w)).astype(_STORAGE[gtype], copy=False)

    return target, shape, gtype, make


def _is_depthwise_conv(fam: Arch, stem: str) -> bool:
    """Whether module `stem` is the depthwise convolution of a short-convolution block."""
    sc = fam.block(SHORT_CONV)
    return sc is not None and stem.endswith(f".{sc.parent}.{sc.conv}")


def _bf16_bits(t) -> np.ndarray:
    """Tensor `t` in bf16 as its uint16 bits: a bf16 checkpoint's own bits, untouched, else
    rounded to nearest even by torch. Not gguf-py's quants.quantize(BF16): bf16 needs no
    conversion at all, and for other dtypes torch converts in one pass where gguf-py's numpy
    rounding keeps about another float32 copy of the tensor."""
    torch = require("torch", "export")
    if t.dtype != torch.bfloat16:
        t = t.float().to(torch.bfloat16)
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def quantize_source_type(base: BaseModel) -> str:
    """The type of the GGUF that llama.cpp quantizes: BF16 when every matrix is stored in bf16
    (the checkpoint's bits as they are: half the bytes of F32, and llama.cpp reads BF16 exactly,
    so its quantized file is the one it makes from F32), else F32. Norms are F32 in both."""
    matrices = [name for name, p in base.model.named_parameters(remove_duplicate=False) if p.ndim > 1]
    return "BF16" if all(base.stored_dtype(name) == "BF16" for name in matrices) else "F32"


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
    with mapped_pages.released(src):  # it maps `src` whole: what it has read need not stay resident
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), params)
    if rc != 0:
        raise UnsupportedModel(f"{src}: llama.cpp could not quantize it to {quant} (code {rc})")
