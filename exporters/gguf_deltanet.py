"""A gated DeltaNet block (Qwen3.5) as llama.cpp's qwen35 architecture reads it, for the GGUF
base (gguf_base.py) and GGUF LoRA files (gguf_adapter.py).

What llama.cpp's converter does to the checkpoint's tensors, and so what we write:
- A_log is stored as -exp(A_log) (`ssm_a`, no suffix); dt_bias as `ssm_dt.bias`;
- the depthwise convolution [channels, 1, kernel] is squeezed to [channels, kernel], in F32;
- the gated output norm (`ssm_norm`) keeps its weight as it is (the other norms store 1 + w);
- where value heads outnumber key heads, ggml repeats key heads tiled ([k0, k1, k0, k1, ...])
  where transformers repeats each one in place ([k0, k0, k1, k1]): the value heads are reordered
  from grouped to tiled in every tensor that has one row (or column, or channel) per value head
  (in_proj_qkv's v rows, in_proj_z, in_proj_b, in_proj_a, A_log, dt_bias, the convolution's v
  channels, out_proj's columns), and so are the LoRA B rows (A columns for out_proj) of those
  projections.
"""

from __future__ import annotations

import numpy as np

from .archs import DELTA_NET, Arch

SECTIONS = [11, 11, 10, 0]  # transformers' default mrope_section, with llama.cpp's fourth (unused) section


def add_deltanet_keys(writer, fam: Arch, config) -> None:
    """The ssm.* keys, the full-attention interval and the rotary sections llama.cpp's qwen35 reads."""
    spec = fam.block(DELTA_NET)
    nk, nv, dk, dv = spec.heads(config)
    writer.add_ssm_conv_kernel(spec.kernel(config))
    writer.add_ssm_state_size(dk)
    writer.add_ssm_group_count(nk)
    writer.add_ssm_time_step_rank(nv)
    writer.add_ssm_inner_size(nv * dv)
    writer.add_full_attention_interval(int(getattr(config, "full_attention_interval", 4)))
    sections = list((getattr(config, "rope_parameters", None) or {}).get("mrope_section") or SECTIONS[:3])
    writer.add_rope_dimension_sections((sections + [0] * 4)[:4])


def recurrent_pattern_problem(fam: Arch, config, mixers) -> str | None:
    """llama.cpp's qwen35 takes every full_attention_interval-th layer as attention and the rest
    as DeltaNet; a config whose layer_types differ is described here (None when they agree)."""
    if fam.block(DELTA_NET) is None:
        return None
    every = int(getattr(config, "full_attention_interval", 4))
    want = tuple((i + 1) % every != 0 for i in range(len(mixers)))
    if tuple(m == DELTA_NET for m in mixers) != want:
        return f"llama.cpp's qwen35 runs every {every}th layer as attention and the rest as DeltaNet"
    return None


def _value_order(heads) -> np.ndarray | None:
    """Value head j of the tiled order is head order[j] of transformers' grouped order; None
    when there is one value head per key head."""
    nk, nv = heads[0], heads[1]
    if nk == nv:
        return None
    ratio = nv // nk
    return np.array([g * ratio + r for r in range(ratio) for g in range(nk)])


def _reorder(w: np.ndarray, axis: int, start: int, head: int, order) -> np.ndarray:
    """w with the value heads (`head` entries each) from index `start` on along `axis` reordered."""
    if order is None:
        return w
    w = np.moveaxis(w, axis, 0)
    heads = w[start:].reshape(len(order), head, *w.shape[1:])[order].reshape(w[start:].shape)
    return np.moveaxis(np.concatenate([w[:start], heads]), 0, axis)


def deltanet_tensor(fam: Arch, heads, name: str, shape: tuple) -> tuple[str, tuple, bool, object] | None:
    """(GGUF name, GGUF shape, whether it stays F32, transform of the stored array) for checkpoint
    tensor `name` when it belongs to a DeltaNet block (model.layers.N.<parent>.X), else None.
    `heads`: (key heads, value heads, key dim, value dim)."""
    spec = fam.block(DELTA_NET)
    parts = name.split(".")
    if spec is None or len(parts) < 5 or parts[3] != spec.parent:
        return None
    blk, rel = f"blk.{parts[2]}", ".".join(parts[4:])
    nk, nv, dk, dv = heads
    order = _value_order(heads)
    qk = 2 * nk * dk
    rows = {"in_proj_qkv.weight": ("attn_qkv.weight", qk, dv), "in_proj_z.weight": ("attn_gate.weight", 0, dv),
            "in_proj_b.weight": ("ssm_beta.weight", 0, 1), "in_proj_a.weight": ("ssm_alpha.weight", 0, 1),
            "dt_bias": ("ssm_dt.bias", 0, 1)}
    if rel in rows:
        target, start, size = rows[rel]
        return f"{blk}.{target}", shape, len(shape) == 1, lambda w: _reorder(w, 0, start, size, order)
    if rel == "A_log":
        return f"{blk}.ssm_a", shape, True, lambda w: _reorder(-np.exp(w.astype(np.float32)), 0, 0, 1, order)
    if rel == f"{spec.conv}.weight":
        return f"{blk}.ssm_conv1d.weight", (shape[0], shape[2]), True, \
            lambda w: _reorder(w.reshape(shape[0], shape[2]), 0, qk, dv, order)
    if rel == "out_proj.weight":
        return f"{blk}.ssm_out.weight", shape, False, lambda w: _reorder(w, 1, 0, dv, order)
    if rel == f"{spec.norm}.weight":
        return f"{blk}.ssm_norm.weight", shape, True, lambda w: w
    return None


def reorder_lora(fam: Arch, heads, module: str, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LoRA A [r, in] and B [out, r] of `module` in llama.cpp's value-head order (see above)."""
    spec = fam.block(DELTA_NET)
    parts = module.split(".")
    if spec is None or len(parts) != 5 or parts[3] != spec.parent:
        return a, b
    nk, nv, dk, dv = heads
    order = _value_order(heads)
    rows = {"in_proj_qkv": (2 * nk * dk, dv), "in_proj_z": (0, dv), "in_proj_b": (0, 1), "in_proj_a": (0, 1)}
    if parts[4] in rows:
        return a, _reorder(b, 0, *rows[parts[4]], order)
    if parts[4] == "out_proj":
        return _reorder(a, 1, 0, dv, order), b
    return a, b
