"""Weight-only quantization of the ONNX base to onnxruntime's MatMulNBits.

onnxruntime's own quantizer rewrites the graph; with activation statistics (calibration.py) our
importance-weighted search then replaces its 4-bit blocks. Only the base MatMuls are quantized;
the LoRA slot MatMuls (and their float inputs) are excluded, so adapters stay float.
"""

from __future__ import annotations

import numpy as np

from edgepeft.errors import UnsupportedModel, require

ONNX_QUANTS = ("int4", "int4-pure", "int8", "fp16", "fp32")
WEIGHT_ONLY = ("int4", "int4-pure", "int8")


# int4 keeps the projection groups quantization hurts most at 8 bits, as llama.cpp's Q4_K_M keeps
# some tensors at 6: the packed q/k/v projection (v_proj is one Q4_K_M widens), the MLP down
# projection and the output head. Each is named as the manifest's eight_bit list records it (the
# tail of the group's MatMul node name, the form of the first int4 bundles), here with its group.
EIGHT_BIT_GROUPS = {"qkv_proj/MatMul": "qkv_proj", "down_proj/MatMul": "down_proj", "/lm_head/MatMul": "lm_head"}
SENSITIVE = tuple(EIGHT_BIT_GROUPS)
# With a tied head, the int4 export recomputes the head's top logits exactly from the fp16
# embedding table (onnx_graph's _DecoderBuilder.exact_head), so the head itself can be 4-bit; without that
# recomputation a 4-bit head fails verify.
SENSITIVE_EXACT_HEAD = SENSITIVE[:2]
# Fewer exact logits decode faster but lose accuracy; more cost speed for little gain.
EXACT_HEAD_TOP_K = 64

# Scale candidates per 4-bit block (llama.cpp's make_qx_quants search): the level the block's
# signed absmax is rounded to, -9 ... -7 in steps of 0.05 (-8 is plain absmax rounding).
_CANDIDATES = -8 + np.arange(-20, 21) * 0.05
_ROWS_PER_CHUNK = 1 << 16  # blocks searched at once: bounds the search's memory


def int4_blocks(w: np.ndarray, importance: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 4-bit blocks for a MatMul weight w [K, N] (K the input axis), in MatMulNBits'
    layout: packed uint8 [N, K/block, block/2] (low nibble first, zero point 8) and scales
    float32 [N, K/block].

    onnxruntime's quantizers have no way to take activation statistics for a CPU 4-bit build
    (its default rounds each block from its absmax; RTN and k-quant weigh by the weights alone;
    GPTQ and AWQ need a calibration reader over the whole ONNX graph, and AWQ a GPU), so this is
    ours, after llama.cpp's importance-matrix Q4_0: per block, the scale candidate that minimises
    sum_k c_k (w_k - d q_k)^2 with c_k = importance_k * sqrt(sigma2 + w_k^2) (sigma2 the mean
    square of the weight's row), d refit by least squares for the chosen rounding. onnxruntime's
    k-quant kept the base but not every adapter within verify's bound; weighing by importance
    alone (no sqrt term) lost an adapter's task check.
    """
    K, N = w.shape
    nb = -(-K // block_size)
    pad = nb * block_size - K  # onnxruntime pads K to whole blocks with zeros
    x_all = np.pad(np.ascontiguousarray(w.T, np.float32), ((0, 0), (0, pad))).reshape(N * nb, block_size)
    imp = np.pad(np.asarray(importance, np.float64), (0, pad)).reshape(nb, block_size)
    imp = (imp + 1e-12 * max(float(imp.max()), 1e-30)).astype(np.float32)  # no channel counts nothing
    sigma2 = np.repeat((x_all.reshape(N, -1) ** 2).sum(1) / K, nb)  # per block: its row's mean square
    q_all = np.empty(x_all.shape, np.int8)
    d_all = np.empty(N * nb, np.float32)
    step = max(nb, _ROWS_PER_CHUNK // nb * nb)  # whole rows of blocks, so the importance tiles align
    for lo in range(0, N * nb, step):
        x = x_all[lo:lo + step]
        wt = np.tile(imp, (len(x) // nb, 1)) * np.sqrt(sigma2[lo:lo + step, None] + x * x)
        m = x[np.arange(len(x)), np.abs(x).argmax(1)]  # signed absmax; c = -8 rounds it to -8
        m = np.where(m == 0, 1.0, m)
        best = np.full(len(x), np.inf, np.float32)
        for c in _CANDIDATES:
            q = np.clip(np.rint(x * (c / m)[:, None]), -8, 7)
            wq = wt * q
            d = (wq * x).sum(1) / np.maximum((wq * q).sum(1), 1e-30)
            err = (wt * (x - d[:, None] * q) ** 2).sum(1)
            better = err < best
            best[better] = err[better]
            d_all[lo:lo + step][better] = d[better]
            q_all[lo:lo + step][better] = q[better]
    u = (q_all.astype(np.int16) + 8).astype(np.uint8).reshape(N, nb, block_size)
    return np.ascontiguousarray(u[..., 0::2] | (u[..., 1::2] << 4)), d_all.reshape(N, nb)


def nbits_node(matmul: str, bits: int) -> str:
    """The name onnxruntime's MatMulNBitsQuantizer gives the node that replaces MatMul `matmul`."""
    return f"{matmul}_Q{bits}"


def quantize(proto, quant: str, lora_nodes: list[str], block_size: int = 32, accuracy_level: int = 4,
             importance: dict[str, np.ndarray] | None = None, eight_bit: tuple[str, ...] = SENSITIVE,
             projections: dict[str, str] | None = None):
    """Return `proto` with base MatMuls as MatMulNBits (int4/int8, symmetric blocks); fp16/fp32
    pass through. int4 puts the `eight_bit` projections (SENSITIVE, or SENSITIVE_EXACT_HEAD for a
    graph with an exact head) at 8 bits; int4-pure does not. lora_nodes and projections ({MatMul
    node: projection group}) are build_decoder's info["lora_nodes"] and info["projections"].

    importance ({MatMul node: mean x^2 per input channel}, see calibration.py) makes the 4-bit
    blocks of those nodes importance-weighted; without it they are rounded from their absmax.
    accuracy_level 4 lets the CPU kernel compute in int8 (what onnxruntime-genai uses on CPU);
    1 keeps fp32 compute."""
    if quant not in ONNX_QUANTS:
        raise UnsupportedModel(f"unknown ONNX precision {quant!r} (choose from {', '.join(ONNX_QUANTS)})")
    if quant in ("fp16", "fp32"):
        return proto
    if block_size < 16 or block_size & (block_size - 1):
        raise UnsupportedModel(f"block size {block_size} must be a power of two >= 16")
    if quant == "int4" and eight_bit and projections is None:
        raise TypeError("quantize: int4's 8-bit projections need build_decoder's info['projections']")
    # onnxruntime comes from the onnx or onnx-gpu extra (the two packages cannot share a venv).
    nbits = require("onnxruntime.quantization.matmul_nbits_quantizer", "onnx")
    onnx = require("onnx", "export")
    skip = set(lora_nodes)
    base = [n for n in proto.graph.node if n.op_type == "MatMul" and n.name not in skip]
    groups = {EIGHT_BIT_GROUPS[tag] for tag in eight_bit}
    wide = {n.name for n in base if quant == "int8" or (quant == "int4" and projections.get(n.name) in groups)}
    narrow = {n.name for n in base} - wide
    # Our 4-bit blocks are computed before onnxruntime's quantizer drops the float weights.
    weights = {i.name: i for i in proto.graph.initializer}
    ours = {nbits_node(name, 4): int4_blocks(onnx.numpy_helper.to_array(weights[node.input[1]]), importance[name],
                                             block_size)
            for node in base if (name := node.name) in narrow and importance and name in importance}
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
            packed, scales = ours[node.name]
            inits[node.input[1]].CopyFrom(onnx.numpy_helper.from_array(packed, node.input[1]))
            inits[node.input[2]].CopyFrom(onnx.numpy_helper.from_array(scales, node.input[2]))
    return proto
