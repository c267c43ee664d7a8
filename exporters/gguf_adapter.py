"""Adapter -> GGUF LoRA adapter that stock llama.cpp loads (`--lora`, `Llama(lora_path=)`). The
kind decides the tensors and alpha, or refuses (`edgepeft.kinds.KINDS[kind].gguf_tensors`); this
module names them, permutes them and writes the file.

Layout (as llama.cpp's convert_lora_to_gguf.py writes it): general.type = "adapter",
adapter.type = "lora", adapter.lora.alpha; per module `<gguf name>.weight.lora_a` [r, in] and
`.lora_b` [out, r]. llama.cpp scales each module by alpha / rank(module) * user scale, or by the
user scale alone when alpha is 0.

- q_proj/k_proj B rows get the same rotary permutation as the base weights (else the adapter is
  silently wrong on llama-architecture models); a gated DeltaNet's projections get the value
  head order of its base tensors (gguf_deltanet.py).
- When every module's PEFT scale equals alpha / rank for one alpha, that alpha is written and B
  kept as trained; otherwise each module's exact scale is folded into its B and alpha is 0
  (edgepeft/kinds/lora.py, gguf_tensors).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgepeft.errors import UnsupportedAdapter, require
from edgepeft.bundle import GGUF_FINGERPRINT_KEY
from edgepeft.files import atomic_path
from edgepeft.kinds import KINDS, AdapterSpec

from .archs import arch_of
from .gguf_base import gguf_arch, needs_permutation, permute_rows
from .gguf_deltanet import reorder_lora

_ATTN = {"q_proj": "num_heads", "k_proj": "num_kv_heads"}


def export_adapter_gguf(spec: AdapterSpec, manifest_base: dict, dest: Path) -> None:
    """Write `spec` as a GGUF LoRA adapter for the bundle base described by `manifest_base`."""
    gguf = require("gguf", "export")
    lora = KINDS[spec.kind].gguf_tensors(spec, manifest_base["linear_shapes"])
    model_type, dims = manifest_base["model_type"], manifest_base["dims"]
    arch = gguf_arch(gguf, model_type)
    names = gguf.get_tensor_name_map(arch, dims["num_layers"])
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch])  # path given at write time
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora.alpha)
    # Stock llama.cpp ignores unknown keys; our runtime refuses an adapter made for another base.
    writer.add_string(GGUF_FINGERPRINT_KEY, manifest_base["fingerprint"])
    for module, a, b in lora.tensors:
        target = names.get_name(module)
        if target is None:
            raise UnsupportedAdapter(f"{spec.path}: module {module} has no GGUF tensor name")
        short = module.rsplit(".", 1)[-1]
        if needs_permutation(model_type) and short in _ATTN:
            b = permute_rows(b, dims[_ATTN[short]])
        a, b = reorder_lora(arch_of(model_type), dims.get("linear_heads"), module, a, b)
        writer.add_tensor(f"{target}.weight.lora_a", np.ascontiguousarray(a, np.float32))
        writer.add_tensor(f"{target}.weight.lora_b", np.ascontiguousarray(b, np.float32))
    with atomic_path(dest) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
