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


# int4 keeps the tensors quantization hurts most at 8 bits, as llama.cpp's Q4_K_M keeps some at 6:
# the packed q/k/v projection (v_proj is one Q4_K_M widens), the MLP down projection and the
# output head. Measured on SmolLM2-135M (`edgepeft verify`'s first scoring, the 7 chat prompts
# alone; base KL / top-1 against PyTorch), 4-bit blocks rounded from their absmax (onnxruntime's
# default):
#   int4-pure (every MatMul at 4 bits, as onnxruntime-genai's int4): KL 0.74, top-1 55%;
#   qkv + down_proj + lm_head at 8 bits (this mix): KL 0.16, top-1 79%, ~20% slower decode;
#   with importance-weighted 4-bit blocks (int4_blocks): int4-pure KL 0.64, top-1 67%; this mix
#   KL 0.12, top-1 85% (json/upper/rank-16 adapters 0.10-0.12), at the same speed.
SENSITIVE = ("qkv_proj/MatMul", "down_proj/MatMul", "/lm_head/MatMul")
# With a tied head, the int4 export recomputes the head's top logits exactly from the fp16
# embedding table (onnx_graph.exact_head) and the head itself is 4-bit: verify's scoring (prompts
# and answers, see verify.py), SmolLM2 base KL 0.077 against 0.071 with the head at 8 bits, 12%
# faster decode. Without that recomputation a 4-bit head costs too much: base 0.125, the
# sentiment adapter 0.176 and upper 0.156, over verify's 0.15.
SENSITIVE_EXACT_HEAD = SENSITIVE[:2]
EXACT_HEAD_TOP_K = 64  # k=16: +13% decode, base KL 0.082, sentiment 0.142; k=256: +8%, 0.074, 0.133

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
    square of the weight's row), d refit by least squares for the chosen rounding. On SmolLM2-135M
    (int4 mix) onnxruntime's k-quant gave KL 0.13 on the base but 0.18 with the json adapter
    (over verify's 0.15), this 0.12 and 0.11; weighing by importance alone (no sqrt term) cost
    the json adapter 5 of its 40 task prompts.
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


def quantize(proto, quant: str, lora_nodes: list[str], block_size: int = 32, accuracy_level: int = 4,
             importance: dict[str, np.ndarray] | None = None, eight_bit: tuple[str, ...] = SENSITIVE):
    """Return `proto` with base MatMuls as MatMulNBits (int4/int8, symmetric blocks); fp16/fp32
    pass through. int4 puts the `eight_bit` projections (SENSITIVE, or SENSITIVE_EXACT_HEAD for a
    graph with an exact head) at 8 bits; int4-pure does not.

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
    # onnxruntime comes from the onnx or onnx-gpu extra (the two packages cannot share a venv).
    nbits = require("onnxruntime.quantization.matmul_nbits_quantizer", "onnx")
    onnx = require("onnx", "export")
    skip = set(lora_nodes)
    base = [n for n in proto.graph.node if n.op_type == "MatMul" and n.name not in skip]
    wide = {n.name for n in base if quant == "int8" or (quant == "int4" and n.name.endswith(eight_bit))}
    narrow = {n.name for n in base} - wide
    # Our 4-bit blocks are computed before onnxruntime's quantizer drops the float weights.
    weights = {i.name: i for i in proto.graph.initializer}
    ours = {name: int4_blocks(onnx.numpy_helper.to_array(weights[node.input[1]]), importance[name], block_size)
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
        if node.op_type != "MatMulNBits":
            continue
        name = node.name.rsplit("_", 1)[0]  # onnxruntime names it <MatMul>_Q4 / _Q8
        if name in ours:
            packed, scales = ours[name]
            inits[node.input[1]].CopyFrom(onnx.numpy_helper.from_array(packed, node.input[1]))
            inits[node.input[2]].CopyFrom(onnx.numpy_helper.from_array(scales, node.input[2]))
    return proto
