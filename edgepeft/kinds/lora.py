"""LoRA, with PEFT's variants: per-module rank and alpha (rank_pattern, alpha_pattern), rsLoRA
scaling, lora_bias, embedding and lm_head LoRA, trained biases (bias="all" or "lora_only"), any
subset of linear layers. DoRA is read here too (a LORA config with use_dora) and exported by dora.py.

ONNX: each module's A = lora_A^T [in, r] and B = scale * lora_B^T [r, out] go into the slot of its
packed group (slots.py); the scale (alpha/r, alpha/sqrt(r) for rsLoRA, per-module alpha_pattern)
is folded into B so the graph needs no scale input.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import AdapterError, AdapterMismatch, UnsupportedAdapter
from ..files import sha256_file
from ..tensors import read_safetensors
from .protocol import BaseView, GgufLora
from .slots import SlotTensors
from .spec import AdapterSpec, LoraModule

NAME = "lora"
PEFT_TYPES = ("LORA",)
SUPPORT = {"onnx": "swap", "gguf": "swap"}
MERGEABLE = True
# What a LoRA may use beyond plain LoRA, with rows of their own because they run differently
# (features() in the registry names the ones an adapter uses).
EXTRAS = {
    # LoRA on the embedding or the lm_head; on GGUF only merged (not tested against llama.cpp).
    "lora-embedding": {"onnx": "swap", "gguf": "merge"},
    # Bias tuning: PEFT's lora_bias, or trained base biases (bias="all"/"lora_only", BitFit-style).
    "bias": {"onnx": "swap", "gguf": "merge"},
}

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
    return AdapterSpec(kind="dora" if dora else NAME, path=path, config=config,
                       source_hash=sha256_file(weights_path), modules=modules, biases=biases,
                       saved_base=saved_base)


def extras(spec: AdapterSpec) -> list[str]:
    """The EXTRAS rows `spec` uses."""
    rows = []
    if any(name.endswith(("embed_tokens", "lm_head")) for name in spec.modules):
        rows.append("lora-embedding")
    if spec.biases or any(getattr(m, "bias", None) is not None for m in spec.modules.values()):
        rows.append("bias")
    return rows


def slots(spec: AdapterSpec) -> str:
    return "full" if "bias" in extras(spec) else "lora"


def onnx_tensors(spec: AdapterSpec, onnx_info: dict, base: BaseView | None) -> dict[str, np.ndarray]:
    packer = SlotTensors(spec, onnx_info, base)
    if slots(spec) == "full":
        packer.require_full("bias tuning")
    add_modules(spec, packer)
    return packer.tensors()


ScaleOut = Callable[[SlotTensors, str, LoraModule], np.ndarray]


def add_modules(spec: AdapterSpec, packer: SlotTensors, scale_out: ScaleOut | None = None) -> None:
    """Put `spec`'s LoRA modules, lora_bias and trained biases into their slots. `scale_out`
    (DoRA's) gives a module's output scale, for the slot's scale_out columns of that module."""
    for name, saved in spec.saved_base.items():
        weight = packer.base_param(name, "weight")
        if weight is None or weight.shape != saved.shape or not np.allclose(weight, saved, atol=1e-6):
            raise AdapterMismatch(f"{spec.path}: the adapter saved its own {name} weights and they differ from the "
                                  "base's (a resized or retrained embedding is not an adapter; use --merge)")
    for name, mod in spec.modules.items():
        slot, part = packer.find(name)
        cols = slice(part["offset"], part["offset"] + part["out"])
        if (mod.in_features, mod.out_features) != (slot["in"], part["out"]):
            raise AdapterMismatch(
                f"{spec.path}: module {name} is {mod.in_features}->{mod.out_features} but the base's is "
                f"{slot['in']}->{part['out']} (adapter trained for another base?)"
            )
        if slot.get("embedding") and (mod.magnitude is not None or mod.bias is not None):
            raise UnsupportedAdapter(f"{spec.path}: DoRA or lora_bias on the embedding is not supported")
        if scale_out is not None:
            packer.vector(slot, "scale_out")[cols] = scale_out(packer, name, mod)
        if mod.bias is not None:
            packer.vector(slot, "bias")[cols] += np.float32(mod.scale) * mod.bias
        packer.add_lora(slot, part, mod)
    for name, trained in spec.biases.items():
        slot, part = packer.find(name)
        if trained.shape != (part["out"],):
            raise AdapterMismatch(f"{spec.path}: bias of {name} has {trained.size} values, the layer has {part['out']}")
        packer.vector(slot, "bias")[part["offset"]:part["offset"] + part["out"]] = trained


def gguf_tensors(spec: AdapterSpec, linear_shapes: dict) -> GgufLora:
    """llama.cpp scales each module by alpha / rank(module). When every module's PEFT scale is that
    for one alpha, the alpha is written and B kept as trained (the conventional encoding);
    otherwise (rsLoRA, alpha_pattern, rank_pattern with a fixed alpha...) each module's exact
    scale is folded into its B and alpha is 0, which llama.cpp reads as "no scaling"."""
    alpha = _uniform_alpha(spec)
    return GgufLora(float(alpha or 0.0), _gguf_modules(spec, linear_shapes, alpha))


def _uniform_alpha(spec: AdapterSpec) -> float | None:
    alphas = {round(m.scale * m.rank, 6) for m in spec.modules.values()}
    return alphas.pop() if len(alphas) == 1 else None


def _gguf_modules(spec: AdapterSpec, shapes: dict, alpha: float | None) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    for module, m in spec.modules.items():
        short = module.rsplit(".", 1)[-1]
        if short not in shapes:
            raise UnsupportedAdapter(f"{spec.path}: module {module} is not a linear layer GGUF adapters cover")
        if [m.in_features, m.out_features] != list(shapes[short]):
            raise AdapterMismatch(f"{spec.path}: module {module} is {m.in_features}->{m.out_features} but the "
                                  f"base's is {shapes[short][0]}->{shapes[short][1]} (adapter trained for another base?)")
        if m.bias is not None:
            raise UnsupportedAdapter(f"{spec.path}: lora_bias has no GGUF adapter form; use --merge")
        yield module, m.a, (m.b if alpha else m.b * np.float32(m.scale))
