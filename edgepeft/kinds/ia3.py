"""IA3: learned scaling vectors. PEFT multiplies the output of each target layer by its vector,
or the input for `feedforward_modules` (for llama: k_proj and v_proj outputs, down_proj input)."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import AdapterError
from ..files import sha256_file
from ..tensors import read_safetensors
from .spec import AdapterSpec, ScaleModule

KIND = "ia3"
PEFT_TYPES = ("IA3",)

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
    return AdapterSpec(kind=KIND, path=path, config=config, source_hash=sha256_file(weights_path),
                       modules=modules)
