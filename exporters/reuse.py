"""A bundle exported once and reused while it still holds what an export would write now: for
the demo and the benchmarks, which measure what the exporter makes today."""

from __future__ import annotations

import time
from pathlib import Path

from edgepeft.bundle import Bundle
from edgepeft.errors import EdgepeftError
from edgepeft.files import sha256_file

from .bundle_export import export_bundle
from .onnx_export import onnx_export_current


def export_or_reuse(base: str, out: str | Path, adapters: dict[str, Path], formats: str, onnx_quant: str = "int4",
                    gguf_quant: str = "Q4_K_M", quiet: bool = True, **options) -> tuple[Bundle, float | None]:
    """The bundle at `out` when it comes from `base` with exactly `adapters` (by their weights'
    hash), at these precisions and from the current ONNX recipe; else a fresh export_bundle(...,
    **options). Also returns the export's seconds, None when reused. Options beyond these
    (e.g. slots="none") are not compared: give each variant its own `out`."""
    wanted = {n: sha256_file(Path(p) / "adapter_model.safetensors") for n, p in adapters.items()}
    quants = {"onnx": onnx_quant, "gguf": gguf_quant}
    try:
        b = Bundle.open(out)
        held = {n: a.get("source_hash") for n, a in b.adapters.items()}
        fresh = all(b.backends.get(f, {}).get("quant") == quants[f] for f in formats.split(","))
        if b.base.get("source") == base and held == wanted and fresh and (
                "onnx" not in formats or onnx_export_current(b.backends["onnx"])):
            return b, None
    except EdgepeftError:
        pass
    t0 = time.perf_counter()
    b = export_bundle(base, out, {n: str(p) for n, p in adapters.items()}, formats=formats, onnx_quant=onnx_quant,
                      gguf_quant=gguf_quant, quiet=quiet, **options)
    return b, time.perf_counter() - t0
