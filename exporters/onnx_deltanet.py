"""The gated DeltaNet block of hybrid families (Qwen3.5) in the ONNX decoder, its two states
carried as graph inputs and outputs beside the attention layers' KV cache.

    in_proj (slot: qkv, z, b, a packed) -> Split
    qkv -> Transpose [batch, channels, seq] -> CausalConvWithState (SiLU; past_conv.N in,
        present_conv.N out) -> Transpose back -> Split q, k, v
    q, k -> L2 norm per key head (SimplifiedLayerNormalization, see below)
    decay = -exp(A_log) * Softplus(a + dt_bias); rate = Sigmoid(b)
    LinearAttention(q, k, v, past_recurrent.N, decay, rate; gated_delta) -> present_recurrent.N
    -> RMSNorm per value head (no offset) * silu(z) -> out_proj (slot)

onnxruntime's com.microsoft CausalConvWithState and LinearAttention (as onnxruntime-genai's
Qwen3.5 builder uses them) compute a prefill of any length and a single-token decode with the
same operators; a sequence starts from zero states. LinearAttention takes the key heads as its
query heads and the value heads as its KV heads (key head h serving value heads h * ratio to
(h + 1) * ratio - 1, as transformers repeats them), and keeps one [key_dim, value_dim] matrix
per value head. Its CPU kernels run float32 only, so the block is exported in fp32 graphs (int4
and int8 quantize the weights of an fp32 graph).

transformers' l2norm is x * rsqrt(sum(x^2) + 1e-6); that is RMSNorm with epsilon 1e-6 / d and a
weight of 1 / sqrt(d), so one fused operator computes it, the query's 1 / sqrt(d) scale folded
into its weight.

As in onnx_conv.py, every position is a token of its row (the block reads no attention_mask):
a prefill must be one unpadded sequence per row.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgepeft.errors import UnsupportedModel
from edgepeft.runtime_contract import state_names

from .archs.base import CONV_STATE, RECURRENT_STATE, DeltaNet
from .onnx_slots import Graph, to_numpy

MS = "com.microsoft"
L2_EPS = 1e-6  # transformers' l2norm of q and k


def gated_deltanet(g: Graph, layer: int, block, spec: DeltaNet, config, x: str, prefix: str,
                   projection: Callable[[str, str], str]) -> str:
    """The block of decoder layer `layer` (torch module `block`, described by `spec`) over x
    [batch, seq, hidden]; projection(x, group) adds one of its two projections with its slot.
    Returns the block's output [batch, seq, hidden]."""
    if g.np_dtype != np.float32:
        raise UnsupportedModel(f"layer {layer}: a gated DeltaNet runs in fp32 graphs only (onnxruntime's "
                               "LinearAttention and CausalConvWithState CPU kernels are float32)")
    nk, nv, dk, dv = spec.heads(config)
    channels, name = spec.conv_channels(config), f"/{prefix}"
    past_conv, present_conv = state_names(layer, CONV_STATE)
    past_rec, present_rec = state_names(layer, RECURRENT_STATE)
    sizes = [channels, nv * dv, nv, nv]
    split = g.const("const.deltanet_in." + ".".join(map(str, sizes)), sizes)
    qkv, z, b, a = g.node("Split", [projection(x, spec.in_group), split], 4, f"{name}/Split", axis=-1)
    qkv = g.node("Transpose", [qkv], 1, f"{name}/Transpose", perm=[0, 2, 1])  # [batch, channels, seq]
    conv = getattr(block, spec.conv)
    weight = g.init(f"{prefix}.{spec.conv}.weight", to_numpy(conv.weight))  # [channels, 1, kernel]
    bias = g.init(f"{prefix}.{spec.conv}.bias", to_numpy(conv.bias)) if conv.bias is not None else ""
    conv_out = f"{name}/CausalConv/out"
    g.node("CausalConvWithState", [qkv, weight, bias, past_conv], [conv_out, present_conv], f"{name}/CausalConv",
           domain=MS, activation="silu")
    qkv = g.node("Transpose", [conv_out], 1, f"{name}/TransposeBack", perm=[0, 2, 1])
    q, k, v = g.node("Split", [qkv, g.const(f"const.deltanet_qkv.{nk * dk}.{nv * dv}", [nk * dk, nk * dk, nv * dv])],
                     3, f"{name}/SplitQKV", axis=-1)
    q = _l2norm(g, q, nk, dk, f"{prefix}.q_l2norm", scale=dk ** -0.5)
    k = _l2norm(g, k, nk, dk, f"{prefix}.k_l2norm")
    a = g.node("Add", [a, g.init(f"{prefix}.dt_bias", to_numpy(block.dt_bias))], 1, f"{name}/dt/Add")
    a = g.node("Softplus", [a], 1, f"{name}/dt/Softplus")
    neg_a = -np.exp(to_numpy(block.A_log).astype(np.float32))
    decay = g.node("Mul", [a, g.init(f"{prefix}.neg_exp_A", neg_a)], 1, f"{name}/decay/Mul")
    rate = g.node("Sigmoid", [b], 1, f"{name}/beta/Sigmoid")
    out = f"{name}/LinearAttention/out"
    g.node("LinearAttention", [q, k, v, past_rec, decay, rate], [out, present_rec], f"{name}/LinearAttention",
           domain=MS, q_num_heads=nk, kv_num_heads=nv, update_rule="gated_delta", scale=1.0)
    out = _heads(g, out, nv, dv, f"{name}/out")
    norm = getattr(block, spec.norm)
    out = g.node("SimplifiedLayerNormalization", [out, g.init(f"{prefix}.{spec.norm}.weight", to_numpy(norm.weight))],
                 1, f"{name}/Norm", axis=-1, epsilon=float(norm.variance_epsilon), stash_type=1)
    out = g.node("Reshape", [out, g.const("const.deltanet_flat", [0, 0, -1])], 1, f"{name}/out/Flatten")
    gate = g.node("Mul", [z, g.node("Sigmoid", [z], 1, f"{name}/z/Sigmoid")], 1, f"{name}/z/Silu")
    out = g.node("Mul", [out, gate], 1, f"{name}/Gate")
    return projection(out, spec.out_group)


def _heads(g: Graph, x: str, heads: int, dim: int, name: str) -> str:
    """x [batch, seq, heads * dim] as [batch, seq, heads, dim]."""
    return g.node("Reshape", [x, g.const(f"const.heads.{heads}.{dim}", [0, 0, heads, dim])], 1, f"{name}/Reshape")


def _l2norm(g: Graph, x: str, heads: int, dim: int, name: str, scale: float = 1.0) -> str:
    """x [batch, seq, heads * dim] L2-normalised per head as transformers' l2norm, times `scale`."""
    y = _heads(g, x, heads, dim, f"/{name}")
    weight = g.init(f"{name}.weight", np.full(dim, scale / np.sqrt(dim), np.float32))
    y = g.node("SimplifiedLayerNormalization", [y, weight], 1, f"/{name}/Norm", axis=-1,
               epsilon=L2_EPS / dim, stash_type=1)
    return g.node("Reshape", [y, g.const("const.deltanet_flat", [0, 0, -1])], 1, f"/{name}/Flatten")
