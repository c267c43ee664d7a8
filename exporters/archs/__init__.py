"""What the exporters need to know of each model family, as data.

One module per family (llama.py, qwen2.py, qwen3.py, gemma.py, gemma4.py, phi3.py, lfm2.py, qwen35.py) declares an `Arch`
(base.py says what each field means); `ARCHS` maps Hugging Face's `model_type` to it. Callers
look the base's row up here instead of branching on the type. Adding a family is its module,
one row below, and a config in tests/factory.py (docs/design.md, "Adding an architecture").
SmolLM models are model_type "llama".
"""

from __future__ import annotations

from edgepeft.errors import UnsupportedModel

from .base import (ATTENTION, ATTENTION_MIXER, DELTA_NET, MLP, SHORT_CONV, Arch, DeltaNet, Group, Layout, Norms,
                   PerLayerInput, ShortConv, layout)
from .gemma import GEMMA2, GEMMA3
from .gemma4 import GEMMA4
from .lfm2 import LFM2
from .llama import LLAMA, MISTRAL
from .phi3 import PHI3
from .qwen2 import QWEN2
from .qwen3 import QWEN3
from .qwen35 import QWEN35

# A vision-language checkpoint's model_type -> its text config's, which ARCHS holds.
VLM_TEXT = {"qwen3_5": "qwen3_5_text", "gemma4": "gemma4_text"}

__all__ = ["ARCHS", "ATTENTION", "ATTENTION_MIXER", "DELTA_NET", "MLP", "SHORT_CONV", "VLM_TEXT", "Arch",
           "DeltaNet", "Group", "Layout", "Norms", "PerLayerInput", "ShortConv", "arch_of", "layout"]

ARCHS: dict[str, Arch] = {
    "llama": LLAMA,
    "mistral": MISTRAL,
    "qwen2": QWEN2,
    "qwen3": QWEN3,
    "gemma2": GEMMA2,
    "gemma3_text": GEMMA3,
    "gemma4_text": GEMMA4,
    "phi3": PHI3,
    "lfm2": LFM2,
    "qwen3_5_text": QWEN35,
}


def arch_of(model_type: str, where: object = "this model") -> Arch:
    """The table row of `model_type`; an architecture outside the table is refused in one line."""
    arch = ARCHS.get(model_type)
    if arch is None:
        raise UnsupportedModel(f"{where}: architecture {model_type!r} is not supported "
                               f"(supported: {', '.join(ARCHS)})")
    return arch
