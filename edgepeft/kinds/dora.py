"""DoRA: LoRA with a trained magnitude per output. PEFT computes
`m / ||W + s B A||_row * (x W^T + s x A^T B^T) + b`; the norm depends only on the base and the
adapter, so the export computes `m / ||...||` once, from the fp32 base weights, into the group's
output scale slot (ONNX --slots full). llama.cpp's LoRA format has no such term: GGUF gets --merge.

PEFT saves DoRA as a LORA config with use_dora, so LoRA's reader reads it (kind "dora").
"""

from __future__ import annotations

import numpy as np

from . import lora
from .protocol import BaseView, no_gguf_form
from .slots import SlotTensors
from .spec import AdapterSpec, LoraModule

NAME = "dora"
PEFT_TYPES = ()  # read by lora.read, which gives kind "dora" when use_dora is set
SUPPORT = {"onnx": "swap", "gguf": "merge"}
MERGEABLE = True
read = lora.read
gguf_tensors = no_gguf_form


def slots(spec: AdapterSpec) -> str:
    return "full"


def onnx_tensors(spec: AdapterSpec, onnx_info: dict, base: BaseView | None) -> dict[str, np.ndarray]:
    packer = SlotTensors(spec, onnx_info, base)
    packer.require_full("DoRA")
    lora.add_modules(spec, packer, scale_out=_magnitude_over_norm)
    return packer.tensors()


def _magnitude_over_norm(packer: SlotTensors, name: str, mod: LoraModule) -> np.ndarray:
    """m / ||W + s B A||, the norm taken per output row."""
    weight = packer.base_param(name, "weight") + np.float32(mod.scale) * (mod.b @ mod.a)
    return mod.magnitude / np.linalg.norm(weight, axis=1)
