"""Weight-only quantization of the ONNX base with onnxruntime's own MatMulNBits quantizer.

Only the base MatMuls are quantized; the LoRA slot MatMuls (and their float inputs) are excluded,
so adapters stay float.
"""

from __future__ import annotations

import contextlib
import os

from edgepeft.errors import UnsupportedModel, require

ONNX_QUANTS = ("int4", "int4-pure", "int8", "fp16", "fp32")
WEIGHT_ONLY = ("int4", "int4-pure", "int8")


# int4 keeps the tensors quantization hurts most at 8 bits, as llama.cpp's Q4_K_M keeps some at 6:
# the packed q/k/v projection (v_proj is one Q4_K_M widens), the MLP down projection and the
# output head. Measured on SmolLM2-135M (`edgepeft verify`, 7 chat prompts; 40 held-out prompts
# per demo adapter):
#   int4-pure (every MatMul at 4 bits, as onnxruntime-genai's int4): upper task 90% where
#     PyTorch scores 100% (json 77.5%, sentiment 95%);
#   down_proj + lm_head at 8 bits: tasks json 87.5%, sentiment 100%, upper 100%; base KL 0.44,
#     top-1 72.6% against PyTorch;
#   + qkv at 8 bits (this mix): base KL 0.235, top-1 80.8%, ~3.5% slower decode than without.
SENSITIVE = ("qkv_proj/MatMul", "down_proj/MatMul", "/lm_head/MatMul")


def quantize(proto, quant: str, lora_nodes: list[str], block_size: int = 32, accuracy_level: int = 4):
    """Return `proto` with base MatMuls as MatMulNBits (int4/int8, symmetric blocks); fp16/fp32
    pass through. int4 puts the SENSITIVE projections at 8 bits; int4-pure does not.

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
    algo = None
    if quant == "int4":  # int4-pure: no per-node config
        wide = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.name.endswith(SENSITIVE)]
        algo = nbits.RTNWeightOnlyQuantConfig(
            customized_weight_config={n: {"bits": 8, "scheme": "sym"} for n in wide})
    quantizer = nbits.MatMulNBitsQuantizer(
        proto, bits=8 if quant == "int8" else 4, block_size=block_size, is_symmetric=True,
        accuracy_level=accuracy_level, nodes_to_exclude=list(lora_nodes), algo_config=algo,
    )
    # The RTN path prints its own progress bar to stdout; ours already shows the step.
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        quantizer.process()
    proto = quantizer.model.model
    onnx = require("onnx", "export")
    for node in proto.graph.node:  # the RTN path leaves accuracy_level unset (fp32 compute)
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(kept + [onnx.helper.make_attribute("accuracy_level", accuracy_level)])
    return proto
