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

from .progress import QUIET
from .int4_search import int4_blocks  # the 4-bit search, re-exported here for its callers

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
                      zero_points: bool = False, progress=QUIET) -> dict[str, tuple]:
    """{MatMul node: int4_blocks(...)} for every base MatMul with activation statistics. The search
    is numpy on arrays of thousands of blocks, which releases the GIL: one thread per core."""
    onnx = require("onnx", "export")
    weights = {i.name: i for i in proto.graph.initializer}
    nodes = [n for n in base_matmuls(proto, lora_nodes) if n.name in importance]

    def one(n):
        return int4_blocks(onnx.numpy_helper.to_array(weights[n.input[1]]), importance[n.name], block_size, zero_points)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(zip((n.name for n in nodes), progress.items(pool.map(one, nodes), len(nodes), "MatMuls")))


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
