"""Adapter kinds: one module per kind, and the table of which kind runs where.

Each kind module exposes `KIND` (our name), `PEFT_TYPES` (PEFT's `peft_type` values it reads)
and `read(path, config) -> AdapterSpec`. The exporters hold each kind's backend encoding in
`edgepeft.exporters.kinds`; this table says what exists, and `edgepeft inspect` prints it.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import AdapterError, EdgepeftError, UnsupportedAdapter
from ..files import read_json_object
from ..limits import check_adapter_limits
from ..peft_config import check_peft_config
from . import ia3, lora, prefix, prompt
from .spec import AdapterSpec

KINDS = {m.KIND: m for m in (lora, ia3, prompt, prefix)}
_BY_PEFT_TYPE = {t: m for m in KINDS.values() for t in m.PEFT_TYPES}
KINDS["dora"] = lora  # DoRA is LoRA with use_dora; its own row in SUPPORT because it runs differently

# How each kind runs on each backend: "swap" = separate file, hot-swapped at run time;
# "merge" = only baked into a dedicated base; "no" = not supported (yet). One row per kind.
SUPPORT: dict[str, dict[str, str]] = {
    "lora": {"onnx": "swap", "gguf": "swap"},
    # LoRA on the embedding or the lm_head; on GGUF only merged (not tested against llama.cpp).
    "lora-embedding": {"onnx": "swap", "gguf": "merge"},
    # DoRA: the magnitude / row-norm term becomes a per-output scale at export (ONNX scale slots);
    # llama.cpp's LoRA format has no such term.
    "dora": {"onnx": "swap", "gguf": "merge"},
    "ia3": {"onnx": "swap", "gguf": "merge"},
    # Bias tuning: PEFT's lora_bias, or trained base biases (bias="all"/"lora_only", BitFit-style).
    "bias": {"onnx": "swap", "gguf": "merge"},
    "prompt": {"onnx": "swap", "gguf": "no"},
    "prefix": {"onnx": "swap", "gguf": "no"},
}


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
    return kind.read(path, config)


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
    rows = [spec.kind]
    mods = spec.modules.values()
    if any(name.endswith(("embed_tokens", "lm_head")) for name in spec.modules):
        rows.append("lora-embedding")
    if spec.biases or any(getattr(m, "bias", None) is not None for m in mods):
        rows.append("bias")
    return rows


def needs_full_slots(spec: AdapterSpec) -> bool:
    """Whether `spec` needs the ONNX base's scale and bias slots (export --slots full)."""
    return spec.kind in ("dora", "ia3") or "bias" in features(spec)


def support_table() -> list[dict[str, str]]:
    """The kind x backend table as rows, for `inspect` and docs."""
    return [{"kind": k, **row} for k, row in SUPPORT.items()]


__all__ = ["AdapterSpec", "KINDS", "SUPPORT", "features", "needs_full_slots", "read_checked_adapter", "read_peft_adapter", "support_table"]
