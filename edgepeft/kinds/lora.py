"""LoRA, with PEFT's variants: per-module rank and alpha (rank_pattern, alpha_pattern), rsLoRA
scaling, lora_bias, DoRA (kind "dora"), embedding and lm_head LoRA, trained biases (bias="all" or
"lora_only"), any subset of linear layers."""

from __future__ import annotations

import math
import re
from pathlib import Path

from ..errors import AdapterError, UnsupportedAdapter
from ..files import sha256_file
from ..tensors import read_safetensors
from .spec import AdapterSpec, LoraModule

KIND = "lora"
PEFT_TYPES = ("LORA",)

_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)(?:\.[A-Za-z0-9_]+)?\.(?P<param>weight|bias)$")
_EMBED_KEY = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<part>A|B)(?:\.[A-Za-z0-9_]+)?$")
_MAGNITUDE_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.[A-Za-z0-9_]+)?(?:\.weight)?$")
_BIAS_KEY = re.compile(r"^(?P<module>.+?)(?:\.base_layer)?\.bias$")  # a trained base bias (bias="all")
_BASE_KEY = re.compile(r"^(?P<module>.+)\.base_layer\.weight$")  # save_embedding_layers copies


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule (peft.utils.other.get_pattern_key): the first key that matches the end of the
    module name at a dot boundary wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read(path: Path, config: dict) -> AdapterSpec:
    weights_path = path / "adapter_model.safetensors"
    cfg_path = path / "adapter_config.json"
    # Options that change the math in ways this kind does not encode are refused, not ignored.
    dora = bool(config.get("use_dora"))
    if config.get("modules_to_save"):
        raise UnsupportedAdapter(
            f"{cfg_path}: modules_to_save ({config['modules_to_save']}) is not supported: those "
            "are full copies of base layers, not an adapter"
        )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower() in ("olora", "pissa", "corda", "eva") or (
        isinstance(init, str) and init.lower().startswith("pissa")
    ):
        # These initialisations also rewrite the base weights; the saved adapter is only exact
        # after PEFT converts it back to plain LoRA (path_initial_model_for_weight_conversion).
        raise UnsupportedAdapter(
            f"{cfg_path}: init_lora_weights={init} changes the base weights; save it converted to "
            "plain LoRA (save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )

    tensors = read_safetensors(weights_path)
    parts: dict[str, dict[str, object]] = {}
    biases, saved_base = {}, {}
    for key, arr in tensors.items():
        if key.startswith(_PREFIX):
            key = key[len(_PREFIX) :]
        if m := _KEY.match(key):
            parts.setdefault(m["module"], {})[f"{m['part']}.{m['param']}"] = arr
        elif m := _EMBED_KEY.match(key):  # lora_embedding_A [r, vocab], lora_embedding_B [hidden, r]
            parts.setdefault(m["module"], {})[f"{m['part']}.weight"] = arr
        elif (m := _MAGNITUDE_KEY.match(key)) and dora:
            parts.setdefault(m["module"], {})["magnitude"] = arr
        elif m := _BASE_KEY.match(key):
            saved_base[m["module"]] = arr.astype("float32")
        elif m := _BIAS_KEY.match(key):
            biases[m["module"]] = arr.astype("float32")
        else:
            raise AdapterError(f"{weights_path}: unexpected tensor {key!r} in a LoRA adapter")
    if not parts and not biases:
        raise AdapterError(f"{weights_path}: no LoRA tensors found")

    r_default = int(config.get("r", 8))
    alpha_default = float(config.get("lora_alpha", 8))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))

    modules: dict[str, LoraModule] = {}
    for name, p in sorted(parts.items()):
        if "A.weight" not in p or "B.weight" not in p:
            raise AdapterError(f"{weights_path}: module {name} lacks lora_A or lora_B weight")
        a, b = p["A.weight"], p["B.weight"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"{weights_path}: module {name} has inconsistent shapes A{list(a.shape)} B{list(b.shape)}"
            )
        rank = int(a.shape[0])
        r_cfg = int(_pattern_value(rank_pattern, name, r_default))
        if r_cfg != rank:
            raise AdapterError(
                f"{weights_path}: module {name} has rank {rank} but adapter_config.json says {r_cfg}"
            )
        alpha = float(_pattern_value(alpha_pattern, name, alpha_default))
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        magnitude = p.get("magnitude")
        if dora and (magnitude is None or magnitude.shape != (b.shape[0],)):
            raise AdapterError(f"{weights_path}: DoRA module {name} lacks a lora_magnitude_vector of {b.shape[0]} values")
        modules[name] = LoraModule(
            a=a.astype("float32"), b=b.astype("float32"), scale=scale,
            bias=p["B.bias"].astype("float32") if "B.bias" in p else None,
            magnitude=magnitude.astype("float32") if dora else None,
        )
    return AdapterSpec(kind="dora" if dora else KIND, path=path, config=config,
                       source_hash=sha256_file(weights_path), modules=modules, biases=biases,
                       saved_base=saved_base)
