"""Adapter -> onnxruntime adapter file (.onnx_adapter), written with onnxruntime.AdapterFormat.

Each adapted module becomes the pair of slot tensors the base graph declares:
A = lora_A^T [in, r] and B = scale * lora_B^T [r, out]; the scale (alpha/r, alpha/sqrt(r) for
rsLoRA, per-module alpha_pattern) is folded into B so the graph needs no scale input.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgepeft.errors import AdapterMismatch, UnsupportedAdapter, require
from edgepeft.files import atomic_path
from edgepeft.kinds import AdapterSpec
from edgepeft.runtime_contract import fingerprint_version


def adapter_tensors(spec: AdapterSpec, onnx_info: dict) -> dict[str, np.ndarray]:
    """The slot tensors for `spec` on a base whose ONNX slots are `onnx_info['slots']`."""
    if spec.kind != "lora":
        raise UnsupportedAdapter(f"{spec.path}: kind {spec.kind} cannot be swapped on ONNX yet")
    slots = {s["module"]: s for s in onnx_info["slots"]}
    dtype = np.float16 if onnx_info.get("dtype") == "fp16" else np.float32
    out: dict[str, np.ndarray] = {}
    for name, mod in spec.modules.items():
        slot = slots.get(name)
        if slot is None:
            raise UnsupportedAdapter(
                f"{spec.path}: module {name} has no adapter slot in the ONNX base "
                f"(slots cover {', '.join(sorted({s['target'] for s in slots.values()}))})"
            )
        if (mod.in_features, mod.out_features) != (slot["in"], slot["out"]):
            raise AdapterMismatch(
                f"{spec.path}: module {name} is {mod.in_features}->{mod.out_features} but the base's is "
                f"{slot['in']}->{slot['out']} (adapter trained for another base?)"
            )
        if mod.bias is not None:
            raise UnsupportedAdapter(f"{spec.path}: lora_bias is not supported on the ONNX backend yet")
        out[slot["A"]] = np.ascontiguousarray(mod.a.T.astype(dtype))
        out[slot["B"]] = np.ascontiguousarray((mod.b * np.float32(mod.scale)).T.astype(dtype))
    return out


def export_adapter_onnx(spec: AdapterSpec, onnx_info: dict, fingerprint: str, dest: Path) -> None:
    """Write `spec` as an onnxruntime adapter file at `dest` (atomically)."""
    ort = require("onnxruntime", "onnx")
    tensors = adapter_tensors(spec, onnx_info)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(fingerprint_version(fingerprint))
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in tensors.items()})
    with atomic_path(dest) as tmp:
        fmt.export_adapter(str(tmp))
