"""LoRA adapter -> GGUF LoRA adapter that stock llama.cpp loads (`--lora`, `Llama(lora_path=)`).

Layout (as llama.cpp's convert_lora_to_gguf.py writes it): general.type = "adapter",
adapter.type = "lora", adapter.lora.alpha; per module `<gguf name>.weight.lora_a` [r, in] and
`.lora_b` [out, r]. llama.cpp scales each module by alpha / rank(module) * user scale, or by the
user scale alone when alpha is 0.

- q_proj/k_proj B rows get the same rotary permutation as the base weights (else the adapter is
  silently wrong on llama-architecture models).
- When every module's PEFT scale equals alpha / rank for one alpha, that alpha is written and B
  kept as trained (the conventional encoding). Otherwise (rsLoRA, alpha_pattern, rank_pattern with
  a fixed alpha...) each module's exact scale is folded into its B and alpha is written as 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgepeft.errors import AdapterMismatch, UnsupportedAdapter, require
from edgepeft.bundle import GGUF_FINGERPRINT_KEY
from edgepeft.files import atomic_path
from edgepeft.kinds import AdapterSpec

from .gguf_base import _ARCH, needs_permutation, permute_rows

_ATTN = {"q_proj": "num_heads", "k_proj": "num_kv_heads"}


def _uniform_alpha(spec: AdapterSpec) -> float | None:
    alphas = {round(m.scale * m.rank, 6) for m in spec.modules.values()}
    return alphas.pop() if len(alphas) == 1 else None


def export_adapter_gguf(spec: AdapterSpec, manifest_base: dict, dest: Path) -> None:
    """Write `spec` as a GGUF LoRA adapter for the bundle base described by `manifest_base`."""
    gguf = require("gguf", "export")
    if spec.kind != "lora":
        raise UnsupportedAdapter(f"{spec.path}: kind {spec.kind} has no GGUF adapter form; use --merge")
    model_type, dims, shapes = manifest_base["model_type"], manifest_base["dims"], manifest_base["linear_shapes"]
    arch = getattr(gguf.MODEL_ARCH, _ARCH[model_type])
    names = gguf.get_tensor_name_map(arch, dims["num_layers"])
    alpha = _uniform_alpha(spec)
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch])  # path given at write time
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha or 0.0))
    # Stock llama.cpp ignores unknown keys; our runtime refuses an adapter made for another base.
    writer.add_string(GGUF_FINGERPRINT_KEY, manifest_base["fingerprint"])
    for module, m in spec.modules.items():
        short = module.rsplit(".", 1)[-1]
        if short not in shapes:
            raise UnsupportedAdapter(f"{spec.path}: module {module} is not a linear layer GGUF adapters cover")
        if [m.in_features, m.out_features] != list(shapes[short]):
            raise AdapterMismatch(f"{spec.path}: module {module} is {m.in_features}->{m.out_features} but the "
                                  f"base's is {shapes[short][0]}->{shapes[short][1]} (adapter trained for another base?)")
        if m.bias is not None:
            raise UnsupportedAdapter(f"{spec.path}: lora_bias has no GGUF adapter form; use --merge")
        target = names.get_name(module)
        if target is None:
            raise UnsupportedAdapter(f"{spec.path}: module {module} has no GGUF tensor name")
        b = m.b if alpha else m.b * np.float32(m.scale)
        if needs_permutation(model_type) and short in _ATTN:
            b = permute_rows(b, dims[_ATTN[short]])
        writer.add_tensor(f"{target}.weight.lora_a", np.ascontiguousarray(m.a, np.float32))
        writer.add_tensor(f"{target}.weight.lora_b", np.ascontiguousarray(b, np.float32))
    with atomic_path(dest) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
