"""Weight-only quantization of the ONNX base to onnxruntime's MatMulNBits.

Each base MatMul's weight is quantized when the graph builder makes it (WeightQuantizer): 4-bit
blocks by our importance-weighted search over activation statistics (calibration.py), 8-bit
blocks by onnxruntime's own kernel; to_matmul_nbits then writes the MatMulNBits nodes. Only the
base MatMuls are quantized; the LoRA slot MatMuls (and their float inputs) stay float.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from edgepeft.errors import UnsupportedModel, require

from .progress import QUIET
from .int4_search import int4_blocks  # the 4-bit search, re-exported here for its callers
from .onnx_external import tensor

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


def check_quant(quant: str, block_size: int) -> None:
    """Refuse an unknown precision or a block size MatMulNBits cannot take."""
    if quant not in ONNX_QUANTS:
        raise UnsupportedModel(f"unknown ONNX precision {quant!r} (choose from {', '.join(ONNX_QUANTS)})")
    if quant in WEIGHT_ONLY and (block_size < 16 or block_size & (block_size - 1)):
        raise UnsupportedModel(f"block size {block_size} must be a power of two >= 16")


def rtn_blocks(w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray, None]:
    """w [K, N] in symmetric blocks rounded from their absmax, by onnxruntime's own kernel (what
    its MatMulNBitsQuantizer writes): packed uint8 [N, K/block, block*bits/8], scales [N, K/block]."""
    # onnxruntime comes from the onnx or onnx-gpu extra (the two packages cannot share a venv).
    kernels = require("onnxruntime.capi._pybind_state", "onnx")
    K, N = w.shape
    nb = -(-K // block_size)
    x = np.pad(np.asarray(w, np.float32), ((0, nb * block_size - K), (0, 0)))
    packed = np.zeros((N, nb, block_size * bits // 8), np.uint8)
    scales = np.zeros((N, nb), np.float32)
    zero = np.zeros((N, -(-nb * bits // 8)), np.uint8)  # unused: symmetric
    kernel = kernels.quantize_matmul_8bits if bits == 8 else kernels.quantize_matmul_4bits
    kernel(packed, np.ascontiguousarray(x), scales, zero, block_size, N, nb * block_size, True)
    return packed, scales, None


SPLIT_WEIGHTS = 1 << 24  # a 4-bit search over more weights than this is split across the threads


class WeightQuantizer:
    """Turns each base MatMul weight into MatMulNBits blocks as the graph builder makes it, so that
    the float32 weights never pile up: a weight is quantized in a pool of threads (numpy and
    onnxruntime's kernels release the GIL) and dropped. `bits(group)` says 4 or 8 per projection
    group; 4-bit blocks are int4_blocks' with the module's activation statistics, or rounded from
    their absmax where there are none. With `external`, each weight's blocks are written to the
    ONNX data file as soon as they are done, in the order the weights came, and only references
    to them are kept. Why not onnxruntime's quantizer: it rewrites a finished
    graph, so the whole float32 graph would have to sit in memory first, and it copies it."""

    def __init__(self, bits, importance: dict[str, np.ndarray], block_size: int, zero_points: bool,
                 progress=QUIET, total: int = 0, external=None, before_head=None):
        self.bits, self.importance, self.block_size, self.zero_points = bits, importance, block_size, zero_points
        self.before_head = before_head  # called before the head's weight is read (gguf_job.GgufJob.wait)
        self.external = external  # an onnx_external.ExternalData: each weight's blocks go there when done
        self.workers = os.cpu_count() or 1
        self.pool = ThreadPoolExecutor(max_workers=self.workers)
        self.pending: dict[str, object] = {}
        self.blocks: dict[str, tuple] = {}
        self.tick = progress.units(total, "MatMuls")

    def _one(self, w: np.ndarray, bits: int, importance) -> tuple:
        if bits == 4 and importance is not None:
            return int4_blocks(w, importance, self.block_size, self.zero_points)
        return rtn_blocks(w, bits, self.block_size)

    def reading(self, group: str) -> None:
        """The graph builder is about to read a weight of projection `group`."""
        if group == "lm_head" and self.before_head is not None:
            self.before_head()

    def __call__(self, node: str, module: str, group: str, w: np.ndarray) -> None:
        """Quantize weight `w` [K, N] of MatMul `node`, whose input `module` reads. A large 4-bit
        search (a big vocabulary's head) runs as column slices, one per thread: each output
        column's blocks depend on that column alone, so the slices give the same blocks."""
        self._collect(block=len(self.pending) >= 2 * self.workers)  # bounds the weights in flight
        bits, importance = self.bits(group), self.importance.get(module)
        parts = self.workers if bits == 4 and importance is not None and w.size > SPLIT_WEIGHTS else 1
        bounds = np.linspace(0, w.shape[1], parts + 1).astype(int)
        self.pending[node] = (bits, w.shape[0], [self.pool.submit(self._one, w[:, lo:hi], bits, importance)
                                                 for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo])

    def _finish(self, node: str) -> None:
        bits, k, futures = self.pending.pop(node)
        parts = [f.result() for f in futures]
        packed, scales = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        zp = None
        if any(p[2] is not None for p in parts):  # a slice with symmetric blocks only gets its 8s back
            zp = np.concatenate([p[2] if p[2] is not None else np.full((len(p[1]), -(-p[1].shape[1] // 2)), 0x88, np.uint8)
                                 for p in parts])
        if self.external is not None:
            packed, scales = self.external.write(packed), self.external.write(scales)
            zp = None if zp is None else self.external.write(zp)
        self.blocks[node] = (bits, packed, scales, zp, k)
        self.tick()

    def _collect(self, block: bool) -> None:
        """Finish the weights that are done, in the order they came (the first one waited for
        if `block`), up to the first that is not."""
        for node, (_, _, futures) in list(self.pending.items()):
            if not (block or all(f.done() for f in futures)):
                break
            self._finish(node)
            block = False

    def results(self) -> dict[str, tuple]:
        """{MatMul node: (bits, packed, scales, zero points or None, K)} once every weight is done."""
        try:
            for node in list(self.pending):
                self._finish(node)
        finally:
            self.pool.shutdown(cancel_futures=True)
        return self.blocks


def to_matmul_nbits(proto, blocks: dict[str, tuple], block_size: int, accuracy_level: int):
    """Rewrite each MatMul of `blocks` ({node: (bits, packed, scales, zero points or None, K)}, the
    arrays in memory or onnx_external.ExternalRefs to the data file) into
    the MatMulNBits node onnxruntime's MatMulNBitsQuantizer writes (its node and initializer
    names, inputs and attributes; zero points as a fourth input where a block has one), removing
    its float weight if the graph holds one; each entry leaves `blocks` as it goes. accuracy_level 4 lets the CPU kernel compute in int8
    (what onnxruntime-genai uses on CPU); 1 keeps fp32 compute."""
    h = require("onnx", "export").helper
    dropped = set()
    for idx, node in enumerate(proto.graph.node):
        if node.op_type != "MatMul" or node.name not in blocks:
            continue
        bits, packed, scales, zp, k = blocks.pop(node.name)  # the graph's copy is the only one left
        b = node.input[1]
        inputs = [node.input[0], f"{b}_Q{bits}", f"{b}_scales"]
        new = [tensor(packed, inputs[1]), tensor(scales, inputs[2])]
        if zp is not None:
            inputs.append(f"{b}_Q{bits}_zero_points")  # the name earlier exports gave it
            new.append(tensor(zp, inputs[3]))
        proto.graph.initializer.extend(new)
        attrs = {"K": int(k), "N": int(packed.shape[0]), "bits": bits, "block_size": block_size}
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        proto.graph.node[idx].CopyFrom(h.make_node("MatMulNBits", inputs, list(node.output),
                                                   name=nbits_node(node.name, bits), domain="com.microsoft", **attrs))
        dropped.add(b)
    # deleted in place: rebuilding the list would copy every initializer (all the quantized bytes)
    for i in reversed([i for i, t in enumerate(proto.graph.initializer) if t.name in dropped]):
        del proto.graph.initializer[i]
    return proto
