#!/usr/bin/env python3
"""Where Gemma 2's F32 GGUF logits part from PyTorch+PEFT: llama.cpp's fp16 GELU table, the
soft-caps, or the export.

    python benchmarks/gemma2_gelu.py

Tiny random Gemma 2 configs (tests/factory.py) with and without a LoRA on every projection
(rsLoRA, r 8), exported to F32 GGUF and scored by edgepeft's GGUF backend on the family tests'
~100-token prompt. Each row gives max |GGUF - reference| / reference logit range against PyTorch
with exact GELU and with GELU looked up as ggml's CPU backend does (factory.use_ggml_gelu), the
table's own effect on the PyTorch reference, and fp32 PyTorch against fp64 (how much the config
amplifies rounding). "uncapped" rows drop both soft-caps from the config and, for this experiment
only, write caps of 1e6 into the file (llama.cpp's gemma2 always caps; tanh(x / 1e6) * 1e6 is x in
fp32), past the export's refusal. Writes benchmarks/results/gemma2_gelu.{md,json}.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from factory import gemma2_all_projection_gguf, load_reference, use_ggml_gelu  # noqa: E402

PROMPT = ("the quick brown fox jumps over the lazy dog, then rests under the old tree "
          "while three birds sing in the rain")
CONFIGS = {  # name: (make_base overrides, uncapped)
    "family fixture (2 layers, hidden 64)": ({}, False),
    "4 layers, hidden 128": ({"layers": 4, "hidden": 128}, False),
    "family fixture, uncapped": ({}, True),
    "4 layers, hidden 128, uncapped": ({"layers": 4, "hidden": 128}, True),
}


def rel(got, ref) -> float:
    return float(np.abs(got - ref).max() / (ref.max() - ref.min()))


def logits(base, adapter, ids, table=False, fp64=False):
    from peft import PeftModel

    model = load_reference(base)
    if table:
        use_ggml_gelu(model)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    if fp64:
        model = model.double()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def huge_caps_in_file() -> None:
    """Experiment only: skip the refusal of an uncapped Gemma 2 and write caps of 1e6."""
    import edgepeft.exporters.bundle_export as be
    import edgepeft.exporters.gguf_base as gb

    be.check_gguf_layout = gb.check_gguf_layout = lambda *args: None
    family_keys = gb._add_family_keys
    if getattr(family_keys, "huge_caps", False):
        return

    def keys(writer, base, fam, lay):
        family_keys(writer, base, fam, lay)
        writer.add_attn_logit_softcapping(1e6)
        writer.add_final_logit_softcapping(1e6)

    keys.huge_caps = True
    gb._add_family_keys = keys


def measure(root: Path, overrides: dict, uncapped: bool) -> list[dict]:
    if uncapped:
        overrides = {**overrides, "attn_logit_softcapping": None, "final_logit_softcapping": None}
    base, adapter, engine = gemma2_all_projection_gguf(root, **overrides)
    ids = engine.tokenizer.encode(PROMPT)
    rows = []
    for name, path in (("none", None), ("all", adapter)):
        got = engine.score(ids, adapter=name if path else None)
        exact, table = logits(base, path, ids), logits(base, path, ids, table=True)
        rows.append({"adapter": name, "gguf_vs_exact": rel(got, exact), "gguf_vs_table": rel(got, table),
                     "table_vs_exact": rel(table, exact), "fp32_vs_fp64": rel(exact, logits(base, path, ids, fp64=True))})
    return rows


def main() -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (overrides, uncapped)) in enumerate(CONFIGS.items()):
            if uncapped:
                huge_caps_in_file()
            results[name] = measure(Path(tmp) / str(i), overrides, uncapped)
            print(name, json.dumps(results[name]), flush=True)
    out = ROOT / "benchmarks" / "results"
    (out / "gemma2_gelu.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = ["# Gemma 2 F32 GGUF against PyTorch+PEFT: max abs error / reference logit range", "",
             "Command: `python benchmarks/gemma2_gelu.py` (tiny random configs, ~100-token prompt).", "",
             "| config | LoRA | GGUF vs exact GELU | GGUF vs ggml's fp16 GELU table | table vs exact (PyTorch) "
             "| fp32 vs fp64 (PyTorch) |", "|---|---|---|---|---|---|"]
    for name, rows in results.items():
        for r in rows:
            lines.append(f"| {name} | {r['adapter']} | {r['gguf_vs_exact']:.1e} | {r['gguf_vs_table']:.1e} "
                         f"| {r['table_vs_exact']:.1e} | {r['fp32_vs_fp64']:.1e} |")
    (out / "gemma2_gelu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
