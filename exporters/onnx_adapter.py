"""Adapter -> onnxruntime adapter file (.onnx_adapter), written with onnxruntime.AdapterFormat.

Each adapted module contributes A = lora_A^T [in, r] and B = scale * lora_B^T [r, out] to the
slot of its packed group (q/k/v, o, gate/up, down); the scale (alpha/r, alpha/sqrt(r) for rsLoRA,
per-module alpha_pattern) is folded into B so the graph needs no scale input.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgepeft.errors import AdapterMismatch, UnsupportedAdapter, require
from edgepeft.files import atomic_path
from edgepeft.kinds import AdapterSpec
from edgepeft.runtime_contract import fingerprint_version


def _parts(slot: dict) -> list[dict]:
    """The linear layers a slot covers (one for bundles whose slots are not packed)."""
    return slot.get("parts") or [{"module": slot["module"], "target": slot.get("target", slot["module"].rsplit(".", 1)[-1]),
                                  "offset": 0, "out": slot["out"]}]


def adapter_tensors(spec: AdapterSpec, onnx_info: dict) -> dict[str, np.ndarray]:
    """The slot tensors for `spec` on a base whose ONNX slots are `onnx_info['slots']`.

    A slot packs several linear layers that share an input (q/k/v, gate/up); the adapter's
    modules in it become A = [A_1 | A_2 ...] (ranks concatenated) and a block-diagonal B, so
    x A B = [x A_1 B_1, x A_2 B_2, ...] lands in each layer's columns and zeros elsewhere."""
    if spec.kind != "lora":
        raise UnsupportedAdapter(f"{spec.path}: kind {spec.kind} cannot be swapped on ONNX yet")
    owner = {part["module"]: (slot, part) for slot in onnx_info["slots"] for part in _parts(slot)}
    dtype = np.float16 if onnx_info.get("dtype") == "fp16" else np.float32
    grouped: dict[str, list] = {}
    for name, mod in spec.modules.items():
        if name not in owner:
            targets = sorted({p["target"] for s in onnx_info["slots"] for p in _parts(s)})
            raise UnsupportedAdapter(
                f"{spec.path}: module {name} has no adapter slot in the ONNX base (slots cover {', '.join(targets)})"
            )
        slot, part = owner[name]
        if (mod.in_features, mod.out_features) != (slot["in"], part["out"]):
            raise AdapterMismatch(
                f"{spec.path}: module {name} is {mod.in_features}->{mod.out_features} but the base's is "
                f"{slot['in']}->{part['out']} (adapter trained for another base?)"
            )
        if mod.bias is not None:
            raise UnsupportedAdapter(f"{spec.path}: lora_bias is not supported on the ONNX backend yet")
        grouped.setdefault(slot["A"], []).append((slot, part, mod))
    out: dict[str, np.ndarray] = {}
    for members in grouped.values():
        slot = members[0][0]
        members.sort(key=lambda m: m[1]["offset"])
        rank = sum(mod.rank for _, _, mod in members)
        a = np.zeros((slot["in"], rank), np.float32)
        b = np.zeros((rank, slot["out"]), np.float32)
        r0 = 0
        for _, part, mod in members:
            a[:, r0:r0 + mod.rank] = mod.a.T
            b[r0:r0 + mod.rank, part["offset"]:part["offset"] + part["out"]] = (mod.b * np.float32(mod.scale)).T
            r0 += mod.rank
        out[slot["A"]] = a.astype(dtype)
        out[slot["B"]] = b.astype(dtype)
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
