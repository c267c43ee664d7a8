"""Weight-only quantization of the ONNX base with onnxruntime's own MatMulNBits quantizer.

Only the base MatMuls are quantized; the LoRA slot MatMuls (and their float inputs) are excluded,
so adapters stay float.
"""

from __future__ import annotations

from edgepeft.errors import UnsupportedModel, require

ONNX_QUANTS = ("int4", "int8", "fp16", "fp32")


def quantize(proto, quant: str, lora_nodes: list[str], block_size: int = 32, accuracy_level: int = 4):
    """Return `proto` with base MatMuls as MatMulNBits (int4/int8); fp16/fp32 pass through.

    accuracy_level 4 lets the CPU kernel compute in int8 (what onnxruntime-genai uses on CPU);
    1 keeps fp32 compute."""
    if quant not in ONNX_QUANTS:
        raise UnsupportedModel(f"unknown ONNX precision {quant!r} (choose from {', '.join(ONNX_QUANTS)})")
    if quant in ("fp16", "fp32"):
        return proto
    if block_size < 16 or block_size & (block_size - 1):
        raise UnsupportedModel(f"block size {block_size} must be a power of two >= 16")
    nbits = require("onnxruntime.quantization.matmul_nbits_quantizer", "export")
    quantizer = nbits.MatMulNBitsQuantizer(
        proto, bits=4 if quant == "int4" else 8, block_size=block_size, is_symmetric=True,
        accuracy_level=accuracy_level, nodes_to_exclude=list(lora_nodes),
    )
    quantizer.process()
    return quantizer.model.model
