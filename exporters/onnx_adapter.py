"""Adapter -> onnxruntime adapter file (.onnx_adapter), written with onnxruntime.AdapterFormat.

What the file holds is the kind's business (`edgepeft.kinds.KINDS[kind].onnx_tensors`: slot
tensors, or a KV-cache prefix); this module gives the kinds the base they compute from, as a
`BaseView` over the torch model, and writes the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgepeft.errors import require
from edgepeft.files import atomic_path
from edgepeft.kinds import KINDS, AdapterSpec, needed_slots
from edgepeft.runtime_contract import ADAPTERS_ACTIVE, fingerprint_version

from .hf_base import BaseModel
from .onnx_prompt import virtual_token_cache


class TorchBase:
    """The `BaseView` the kinds get: a loaded BaseModel, or a function that loads it, called on
    first use (add-adapter loads the bundle's recorded source only for kinds that need it)."""

    def __init__(self, base):
        self._base = base

    @property
    def model(self) -> BaseModel:
        if callable(self._base):
            self._base = self._base()
        return self._base

    @property
    def dims(self) -> dict:
        return self.model.dims

    def param(self, module: str, name: str) -> np.ndarray | None:
        return self.model.param(module, name)

    def virtual_kv(self, embeddings: np.ndarray, layers: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return virtual_token_cache(self.model, embeddings, layers)


def adapter_tensors(spec: AdapterSpec, onnx_info: dict, base=None) -> dict[str, np.ndarray]:
    """The parameters of `spec`'s adapter file for a bundle whose ONNX base is `onnx_info`.
    `base` (BaseModel or a loader) is needed by the kinds computed from it: DoRA, biases of
    layers that have a base bias, prompt tuning."""
    return KINDS[spec.kind].onnx_tensors(spec, onnx_info, None if base is None else TorchBase(base))


def export_adapter_onnx(spec: AdapterSpec, onnx_info: dict, fingerprint: str, dest: Path, base=None) -> None:
    """Write `spec` as an onnxruntime adapter file at `dest` (atomically). `base` (the loaded
    BaseModel, or a function returning it) is used by kinds computed from the base."""
    ort = require("onnxruntime", "onnx")
    tensors = adapter_tensors(spec, onnx_info, base)
    if onnx_info.get("base_path") and needed_slots(spec) != "none":
        tensors[ADAPTERS_ACTIVE] = np.ones(1, np.float32)  # run the slots (onnx_graph.add_base_path)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(fingerprint_version(fingerprint))
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in tensors.items()})
    with atomic_path(dest) as tmp:
        fmt.export_adapter(str(tmp))
