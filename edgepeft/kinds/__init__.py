"""Adapter kinds: one module per kind, end to end (reading, ONNX tensors, GGUF tensors or the
refusal, merging, slots; the protocol is protocol.Kind), and the one registry callers look a kind
up in. Adding a kind is its module and its entry in KINDS (docs/kinds.md).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import AdapterError, EdgepeftError, UnsupportedAdapter
from ..files import read_json_object
from ..limits import check_adapter_limits
from ..peft_config import check_peft_config
from . import dora, ia3, lora, prefix, prompt
from .protocol import BaseView, GgufLora, Kind
from .spec import AdapterSpec

KINDS: dict[str, Kind] = {unit.NAME: unit for unit in (lora, dora, ia3, prompt, prefix)}
_BY_PEFT_TYPE = {t: unit for unit in KINDS.values() for t in unit.PEFT_TYPES}

# How each kind runs on each backend, then LoRA's extras (features()): "swap" = separate file,
# hot-swapped at run time; "merge" = only baked into a dedicated base; "no" = not supported (yet).
SUPPORT: dict[str, dict[str, str]] = {**{name: unit.SUPPORT for name, unit in KINDS.items()}, **lora.EXTRAS}


def read_peft_adapter(path: str | Path) -> AdapterSpec:
    """Read a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: not a directory (expected a PEFT adapter directory)")
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise AdapterError(f"{path}: no adapter_config.json (not a PEFT adapter directory)")
    config = check_peft_config(read_json_object(cfg_path, AdapterError), cfg_path)
    if not (path / "adapter_model.safetensors").is_file():
        if (path / "adapter_model.bin").exists():
            raise AdapterError(
                f"{path}: only adapter_model.bin (a pickle) is present; edgepeft reads safetensors "
                "only. Re-save it with PeftModel.save_pretrained(dir, safe_serialization=True)"
            )
        raise AdapterError(f"{path}: no adapter_model.safetensors")
    peft_type = str(config.get("peft_type", "")).upper()
    kind = _BY_PEFT_TYPE.get(peft_type)
    if kind is None:
        raise UnsupportedAdapter(
            f"{cfg_path}: PEFT type {peft_type or '(missing)'} is not supported; "
            f"supported: {', '.join(sorted(_BY_PEFT_TYPE))}"
        )
    return _text_model_names(kind.read(path, config), path)


# An adapter trained on a vision-language model (Qwen3.5's released class) names the text
# model's modules under model.language_model.: they are read under the text model's names, which
# is what edgepeft exports; one that adapts a vision or audio tower (Qwen3.5's model.visual.,
# Gemma 4's model.vision_tower., model.audio_tower. and their embedders) is refused.
_VLM_TEXT, _TEXT = "model.language_model.", "model."
_VLM_TOWERS = ("model.visual.", "model.vision_tower.", "model.audio_tower.", "model.embed_vision.",
               "model.embed_audio.")


def _text_model_names(spec: AdapterSpec, path: Path) -> AdapterSpec:
    names = [*spec.modules, *spec.biases, *spec.saved_base]
    tower = next((n for n in names if n.startswith(_VLM_TOWERS)), None)
    if tower is not None:
        raise UnsupportedAdapter(f"{path}: adapts a vision or audio tower ({tower}); edgepeft exports a "
                                 "multimodal model's text model only")
    for field in ("modules", "biases", "saved_base"):
        table = getattr(spec, field)
        setattr(spec, field, {_TEXT + k[len(_VLM_TEXT):] if k.startswith(_VLM_TEXT) else k: v
                              for k, v in table.items()})
    return spec


def read_checked_adapter(path: str | Path) -> AdapterSpec:
    """`read_peft_adapter`, held to edgepeft.limits, and with any failure a one-line
    EdgepeftError: what the exporters call on a user's directory."""
    try:
        return check_adapter_limits(read_peft_adapter(path))
    except EdgepeftError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, re.error) as e:
        # A combination of fields no kind expected: still the user's input, still one line.
        raise AdapterError(f"{path}: cannot read this adapter ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None


def features(spec: AdapterSpec) -> list[str]:
    """The SUPPORT rows `spec` needs: its kind, plus the LoRA extras it uses."""
    return [spec.kind, *lora.extras(spec)]


def needed_slots(spec: AdapterSpec) -> str:
    """The ONNX slot set `spec` needs: "lora", "full" or "none" (a KV-cache prefix needs no slot)."""
    return KINDS[spec.kind].slots(spec)


def needs_full_slots(spec: AdapterSpec) -> bool:
    """Whether `spec` needs the ONNX base's scale and bias slots (export --slots full)."""
    return needed_slots(spec) == "full"


def support_table() -> list[dict[str, str]]:
    """The kind x backend table as rows, for `inspect` and docs."""
    return [{"kind": k, **row} for k, row in SUPPORT.items()]


__all__ = ["AdapterSpec", "BaseView", "GgufLora", "KINDS", "Kind", "SUPPORT", "features", "needed_slots",
           "needs_full_slots", "read_checked_adapter", "read_peft_adapter", "support_table"]
