"""Weight-only quantization of the ONNX base to onnxruntime's MatMulNBits.

onnxruntime's own quantizer rewrites the graph; with activation statistics (calibration.py) our
importance-weighted search then replaces its 4-bit blocks. Only the base MatMuls are quantized;
the LoRA slot MatMuls (and their float inputs) are excluded, so adapters stay float.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from edgepeft.errors import UnsupportedModel, require

ONNX_QUANTS = ("int4", "int4-pure", "int8", "fp16", "fp32")
WEIGHT_ONLY = ("int4", "int4-pure", "int8")


# int4 keeps the projection groups quantization hurts most at 8 bits, as llama.cpp's Q4_K_M keeps
# some tensors at 6: the packed q/k/v projection (v_proj is one Q4_K_M widens), the MLP down
# projection and the output head. `--int4-target-kl` chooses per MatMul by measured sensitivity
# instead (sensitivity.py). With a tied head, the int4 export recomputes the head's top logits
# exactly from the fp16 embedding table (onnx_graph's _DecoderBuilder.exact_head), so the head itself
# stays 4-bit; without that recomputation a 4-bit head fails verify.
EIGHT_BIT_GROUPS = ("qkv_proj", "down_proj", "lm_head")
# Fewer exact logits decode faster but lose accuracy; more cost speed for little gain.
EXACT_HEAD_TOP_K = 64

# Scale candidates per 4-bit block (llama.cpp's make_qx_quants search): the level the block's
# signed absmax is rounded to, -9 ... -7 in steps of 0.05 (-8 is plain absmax rounding).
_CANDIDATES = -8 + np.arange(-20, 21) * 0.05
# Asymmetric candidates (zero_points): the block's range over 15 levels, times these.
_RANGE_CANDIDATES = np.linspace(0.6, 1.4, 21)
_ROWS_PER_CHUNK = 1 << 16  # blocks searched at once: bounds the search's memory


def int4_blocks(w: np.ndarray, importance: np.ndarray, block_size: int,
                zero_points: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """4-bit blocks for a MatMul weight w [K, N] (K the input axis), in MatMulNBits' layout:
    packed uint8 [N, K/block, block/2] (low nibble first), scales float32 [N, K/block], and,
    with zero_points, the blocks' zero points packed uint8 [N, ceil(blocks/2)] (low nibble
    first; 8 is symmetric), or None where every block kept 8.

    onnxruntime's quantizers have no way to take activation statistics for a CPU 4-bit build
    (its default rounds each block from its absmax; RTN and k-quant weigh by the weights alone;
    GPTQ and AWQ need a calibration reader over the whole ONNX graph, and AWQ a GPU), so this is
    ours, after llama.cpp's importance-matrix Q4_0: per block, the scale candidate that minimises
    sum_k c_k (w_k - d (u_k - z))^2 with c_k = importance_k * sqrt(sigma2 + w_k^2) (sigma2 the
    mean square of the weight's row), d refit by least squares for the chosen rounding. The
    symmetric candidates (z = 8) are always searched; zero_points adds asymmetric ones (the
    block's range over 15 levels, x 0.6 ... 1.4, z rounded), so a block takes a zero point only
    where it lowers that block's weighted error. onnxruntime's k-quant kept the base but not every
    adapter within verify's bound; weighing by importance alone (no sqrt term) lost an adapter's
    task check.
    """
    K, N = w.shape
    nb = -(-K // block_size)
    pad = nb * block_size - K  # onnxruntime pads K to whole blocks with zeros
    x_all = np.pad(np.ascontiguousarray(w.T, np.float32), ((0, 0), (0, pad))).reshape(N * nb, block_size)
    imp = np.pad(np.asarray(importance, np.float64), (0, pad)).reshape(nb, block_size)
    imp = (imp + 1e-12 * max(float(imp.max()), 1e-30)).astype(np.float32)  # no channel counts nothing
    sigma2 = np.repeat((x_all.reshape(N, -1) ** 2).sum(1) / K, nb)  # per block: its row's mean square
    u_all = np.empty(x_all.shape, np.uint8)
    z_all = np.full(N * nb, 8, np.uint8)
    d_all = np.empty(N * nb, np.float32)
    step = max(nb, _ROWS_PER_CHUNK // nb * nb)  # whole rows of blocks, so the importance tiles align
    for lo in range(0, N * nb, step):
        x = x_all[lo:lo + step]
        wt = np.tile(imp, (len(x) // nb, 1)) * np.sqrt(sigma2[lo:lo + step, None] + x * x)
        best = np.full(len(x), np.inf, np.float32)
        u_best, z_best, d_best = u_all[lo:lo + step], z_all[lo:lo + step], d_all[lo:lo + step]

        def consider(q, z):  # q = u - z, the signed levels; keep each block's better rounding
            wq = wt * q
            d = (wq * x).sum(1) / np.maximum((wq * q).sum(1), 1e-30)
            err = (wt * (x - d[:, None] * q) ** 2).sum(1)
            better = err < best
            best[better] = err[better]
            d_best[better] = d[better]
            u_best[better] = (q[better] + z[better, None]).astype(np.uint8)
            z_best[better] = z[better]

        m = x[np.arange(len(x)), np.abs(x).argmax(1)]  # signed absmax; c = -8 rounds it to -8
        m = np.where(m == 0, 1.0, m)
        eight = np.full(len(x), 8.0, np.float32)
        for c in _CANDIDATES:
            consider(np.clip(np.rint(x * (c / m)[:, None]), -8, 7), eight)
        if zero_points:
            lo_x, span = x.min(1), np.maximum(x.max(1) - x.min(1), 1e-30)
            for f in _RANGE_CANDIDATES:
                d0 = span * f / 15
                z = np.clip(np.rint(-lo_x / d0), 0, 15)
                consider(np.clip(np.rint(x / d0[:, None]) + z[:, None], 0, 15) - z[:, None], z)
    u = u_all.reshape(N, nb, block_size)
    packed = np.ascontiguousarray(u[..., 0::2] | (u[..., 1::2] << 4))
    zp = None
    if zero_points and (z_all != 8).any():
        z = np.pad(z_all.reshape(N, nb), ((0, 0), (0, nb % 2)), constant_values=8)
        zp = np.ascontiguousarray(z[:, 0::2] | (z[:, 1::2] << 4))
    return packed, d_all.reshape(N, nb), zp


def dequantize_int4(packed: np.ndarray, scales: np.ndarray, zp: np.ndarray | None, k: int) -> np.ndarray:
    """The weight [K, N] that MatMulNBits computes with for int4_blocks' output."""
    n, nb = scales.shape
    u = np.stack([packed & 15, packed >> 4], axis=-1).reshape(n, nb, -1).astype(np.float32)
    z = np.full((n, nb), 8.0, np.float32) if zp is None else \
        np.stack([zp & 15, zp >> 4], axis=-1).reshape(n, -1)[:, :nb].astype(np.float32)
    return ((u - z[..., None]) * scales[..., None]).reshape(n, -1)[:, :k].T


def rtn_8bit(w: np.ndarray, block_size: int) -> np.ndarray:
    """w [K, N] after onnxruntime's default symmetric 8-bit blockwise rounding (each block's signed
    absmax to -128), dequantized: what an 8-bit MatMulNBits computes with."""
    K, N = w.shape
    nb = -(-K // block_size)
    x = np.pad(np.ascontiguousarray(w.T, np.float32), ((0, 0), (0, nb * block_size - K))).reshape(N, nb, block_size)
    m = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)
    d = np.where(m == 0, 1.0, m) / -128
    return (np.clip(np.rint(x / d), -128, 127) * d).reshape(N, -1)[:, :K].T


def nbits_node(matmul: str, bits: int) -> str:
    """The name onnxruntime's MatMulNBitsQuantizer gives the node that replaces MatMul `matmul`."""
    return f"{matmul}_Q{bits}"


def base_matmuls(proto, lora_nodes: list[str]) -> list:
    """The MatMul nodes the quantizer turns into MatMulNBits: every MatMul with a weight
    initializer that is not an adapter slot's."""
    weights = {i.name for i in proto.graph.initializer}
    skip = set(lora_nodes)
    return [n for n in proto.graph.node if n.op_type == "MatMul" and n.name not in skip and n.input[1] in weights]


def importance_blocks(proto, lora_nodes: list[str], importance: dict[str, np.ndarray], block_size: int,
                      zero_points: bool = False) -> dict[str, tuple]:
    """{MatMul node: int4_blocks(...)} for every base MatMul with activation statistics. The search
    is numpy on whole arrays, which releases the GIL: one thread per core."""
    onnx = require("onnx", "export")
    weights = {i.name: i for i in proto.graph.initializer}
    nodes = [n for n in base_matmuls(proto, lora_nodes) if n.name in importance]

    def one(n):
        return int4_blocks(onnx.numpy_helper.to_array(weights[n.input[1]]), importance[n.name], block_size, zero_points)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(zip((n.name for n in nodes), pool.map(one, nodes)))


def quantize(proto, quant: str, lora_nodes: list[str], block_size: int = 32, accuracy_level: int = 4,
             blocks: dict[str, tuple] | None = None, eight_bit: frozenset[str] | set[str] = frozenset()):
    """Return `proto` with base MatMuls as MatMulNBits (int4/int8, symmetric blocks unless a block
    has a zero point); fp16/fp32 pass through. int4 puts the `eight_bit` MatMul nodes at 8 bits
    (sensitivity.py chooses them); int4-pure has none. lora_nodes is build_decoder's
    info["lora_nodes"].

    blocks ({MatMul node: (packed, scales, zero points or None)}, importance_blocks) replace
    onnxruntime's 4-bit rounding of those nodes; without them the 4-bit blocks are rounded from
    their absmax. accuracy_level 4 lets the CPU kernel compute in int8 (what onnxruntime-genai
    uses on CPU); 1 keeps fp32 compute."""
    if quant not in ONNX_QUANTS:
        raise UnsupportedModel(f"unknown ONNX precision {quant!r} (choose from {', '.join(ONNX_QUANTS)})")
    if quant in ("fp16", "fp32"):
        return proto
    if block_size < 16 or block_size & (block_size - 1):
        raise UnsupportedModel(f"block size {block_size} must be a power of two >= 16")
    # onnxruntime comes from the onnx or onnx-gpu extra (the two packages cannot share a venv).
    nbits = require("onnxruntime.quantization.matmul_nbits_quantizer", "onnx")
    onnx = require("onnx", "export")
    base = base_matmuls(proto, lora_nodes)
    wide = {n.name for n in base if quant == "int8" or (quant == "int4" and n.name in eight_bit)}
    narrow = {n.name for n in base} - wide
    ours = {nbits_node(name, 4): blocks[name] for name in narrow if blocks and name in blocks}
    # Two passes of onnxruntime's default quantizer (blockwise absmax rounding, in its C++ kernel):
    # the 8-bit nodes, then the 4-bit ones; each pass leaves the other's nodes alone.
    for bits, nodes in ((8, wide), (4, narrow)):
        if not nodes:
            continue
        quantizer = nbits.MatMulNBitsQuantizer(
            proto, bits=bits, block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
            nodes_to_exclude=[n.name for n in proto.graph.node if n.op_type == "MatMul" and n.name not in nodes],
        )
        quantizer.process()
        proto = quantizer.model.model
    inits = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits" and node.name in ours:
            packed, scales, zp = ours[node.name]
            inits[node.input[1]].CopyFrom(onnx.numpy_helper.from_array(packed, node.input[1]))
            inits[node.input[2]].CopyFrom(onnx.numpy_helper.from_array(scales, node.input[2]))
            if zp is not None:
                if len(node.input) > 3 and node.input[3]:
                    raise AssertionError(f"{node.name}: onnxruntime's symmetric quantizer wrote zero points")
                name = f"{node.input[1]}_zero_points"
                proto.graph.initializer.append(onnx.numpy_helper.from_array(zp, name))
                del node.input[3:]
                node.input.append(name)
    return proto
