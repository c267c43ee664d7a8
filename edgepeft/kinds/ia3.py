"""IA3: learned scaling vectors. PEFT multiplies the output of each target layer by its vector,
or the input for `feedforward_modules` (for llama: k_proj and v_proj outputs, down_proj input).

ONNX (--slots full): k/v vectors go into the qkv group's output scale (ones for q), the
feed-forward vector into down_proj's input scale. GGUF: --merge only.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import AdapterError, AdapterMismatch, UnsupportedAdapter
from ..files import sha256_file
from ..tensors import read_safetensors
from .protocol import BaseView, no_gguf_form
from .slots import SlotTensors, parts
from .spec import AdapterSpec, ScaleModule

NAME = "ia3"
PEFT_TYPES = ("IA3",)
SUPPORT = {"onnx": "swap", "gguf": "merge"}
MERGEABLE = True
gguf_tensors = no_gguf_form

_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.ia3_l(?:\.[A-Za-z0-9_]+)?$")


def read(path: Path, config: dict) -> AdapterSpec:
    weights_path = path / "adapter_model.safetensors"
    modules: dict[str, ScaleModule] = {}
    for key, arr in read_safetensors(weights_path).items():
        if key.startswith(_PREFIX):
            key = key[len(_PREFIX):]
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"{weights_path}: unexpected tensor {key!r} in an IA3 adapter")
        # PEFT stores [out, 1] for output scaling and [1, in] for feed-forward (input) scaling.
        if arr.ndim != 2 or 1 not in arr.shape:
            raise AdapterError(f"{weights_path}: {key} has shape {list(arr.shape)}, expected [n, 1] or [1, n]")
        modules[m["module"]] = ScaleModule(vector=arr.reshape(-1).astype("float32"), on_input=arr.shape[0] == 1)
    if not modules:
        raise AdapterError(f"{weights_path}: no IA3 tensors found")
    return AdapterSpec(kind=NAME, path=path, config=config, source_hash=sha256_file(weights_path),
                       modules=modules)


def slots(spec: AdapterSpec) -> str:
    return "full"


def onnx_tensors(spec: AdapterSpec, onnx_info: dict, base: BaseView | None) -> dict[str, np.ndarray]:
    packer = SlotTensors(spec, onnx_info, base)
    packer.require_full("IA3")
    for name, mod in spec.modules.items():
        slot, part = packer.find(name)
        if mod.on_input:
            if "scale_in" not in slot or len(parts(slot)) != 1 or mod.vector.shape != (slot["in"],):
                raise UnsupportedAdapter(f"{spec.path}: IA3 input scaling of {name} is only supported on down_proj")
            packer.vector(slot, "scale_in")[:] = mod.vector
            continue
        if mod.vector.shape != (part["out"],):
            raise AdapterMismatch(f"{spec.path}: IA3 vector of {name} has {mod.vector.size} values, the layer "
                                  f"has {part['out']} outputs (adapter trained for another base?)")
        cols = slice(part["offset"], part["offset"] + part["out"])
        packer.vector(slot, "scale_out")[cols] *= mod.vector
        if slot.get("has_bias"):  # PEFT scales the layer's whole output, bias included
            packer.vector(slot, "bias")[cols] *= mod.vector
    return packer.tensors()
