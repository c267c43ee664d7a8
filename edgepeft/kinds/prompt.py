"""Prompt tuning and P-tuning: V learned virtual token embeddings put before the prompt.

PEFT saves both as one tensor, `prompt_embeddings` [num_virtual_tokens, token_dim]. For P-tuning
that tensor is already the prompt encoder's OUTPUT: `BasePromptEncoder._get_adapter_state_dict`
(peft/tuners/tuners_utils.py) saves `PeftModel.get_prompt_embedding_to_save`, which runs the
encoder (MLP or LSTM) once, and a loaded adapter (inference_mode) uses that tensor directly as the
prompt (`PeftModel.get_prompt`). So "P-tuning's encoder is run once at export" is what PEFT's save
already did, and both types read the same way. The PEFT type is kept in the spec's config and in
the manifest summary.

ONNX: PEFT runs the virtual tokens at positions 0..V-1 before the prompt, and causal attention makes
their keys and values independent of what follows, so the export runs the fp32 base over them once
(BaseView.virtual_kv) and the adapter file holds that KV-cache prefix (kv_prefix_tensors). No
slots: the runtime copies the prefix into each call's cache. Not a weight delta, so not
mergeable; llama.cpp's adapter files cannot hold it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import AdapterError, AdapterMismatch, UnsupportedAdapter
from ..files import sha256_file
from ..runtime_contract import prefix_names
from ..tensors import read_safetensors
from .protocol import BaseView, no_gguf_form
from .slots import float_type
from .spec import AdapterSpec

NAME = "prompt"
PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING")
SUPPORT = {"onnx": "swap", "gguf": "no"}
# Virtual tokens are not a weight delta: `export --merge` refuses this kind.
MERGEABLE = False
gguf_tensors = no_gguf_form


def read_virtual(path: Path, config: dict, width: int, what: str) -> np.ndarray:
    """Check the options every prompt-learning kind shares and return `prompt_embeddings` as
    float32 [num_virtual_tokens, width]; `what` names the expected width in errors."""
    cfg_path, weights_path = path / "adapter_config.json", path / "adapter_model.safetensors"
    task = config.get("task_type")
    if task != "CAUSAL_LM":
        raise UnsupportedAdapter(f"{cfg_path}: task_type {task} is not supported for prompt learning (only CAUSAL_LM)")
    if int(config.get("num_transformer_submodules") or 1) != 1:
        raise UnsupportedAdapter(
            f"{cfg_path}: num_transformer_submodules={config['num_transformer_submodules']} is not supported "
            "(decoder-only models have 1)"
        )
    try:
        n = int(config["num_virtual_tokens"])
    except (KeyError, TypeError, ValueError):
        raise AdapterError(f"{cfg_path}: num_virtual_tokens is missing or not an integer") from None
    if n < 1:
        raise AdapterError(f"{cfg_path}: num_virtual_tokens is {n}; need at least 1")
    tensors = read_safetensors(weights_path)
    if set(tensors) != {"prompt_embeddings"}:
        raise AdapterError(f"{weights_path}: expected exactly one tensor 'prompt_embeddings', found {sorted(tensors)}")
    emb = tensors["prompt_embeddings"]
    if list(emb.shape) != [n, width]:
        raise AdapterError(
            f"{weights_path}: prompt_embeddings is {list(emb.shape)}, expected [{n}, {width}] "
            f"(num_virtual_tokens x {what})"
        )
    emb = emb.astype(np.float32)
    if not np.isfinite(emb).all():
        raise AdapterError(f"{weights_path}: prompt_embeddings contains inf or NaN")
    return emb


def config_int(path: Path, config: dict, key: str) -> int:
    try:
        value = int(config[key])
    except (KeyError, TypeError, ValueError):
        raise AdapterError(f"{path / 'adapter_config.json'}: {key} is missing or not an integer") from None
    if value < 1:
        raise AdapterError(f"{path / 'adapter_config.json'}: {key} is {value}")
    return value


def read(path: Path, config: dict) -> AdapterSpec:
    token_dim = config_int(path, config, "token_dim")
    virtual = read_virtual(path, config, token_dim, "token_dim")
    return AdapterSpec(kind=NAME, path=path, config=config, source_hash=sha256_file(path / "adapter_model.safetensors"),
                       virtual=virtual)


def slots(spec: AdapterSpec) -> str:
    return "none"


def onnx_tensors(spec: AdapterSpec, onnx_info: dict, base: BaseView | None) -> dict[str, np.ndarray]:
    kv = onnx_info["kv"]
    if base is None:
        raise UnsupportedAdapter(f"{spec.path}: prompt tuning needs the base model to compute its KV prefix")
    hidden = base.dims["hidden_size"]
    if spec.virtual.shape[1] != hidden:
        raise AdapterMismatch(f"{spec.path}: virtual tokens have {spec.virtual.shape[1]} dims, the base's embeddings "
                              f"{hidden} (adapter trained for another base?)")
    return kv_prefix_tensors(spec, onnx_info, base.virtual_kv(spec.virtual, kv["num_layers"]))


def kv_prefix_tensors(spec: AdapterSpec, onnx_info: dict, layers: list[tuple]) -> dict[str, np.ndarray]:
    """The `prefix.*` parameters of a prompt-learning adapter file: per layer (key, value)
    [num_kv_heads, P, head_dim] in the base graph's float type."""
    p = int(spec.virtual.shape[0])
    if p >= int(onnx_info["context_length"]):
        raise UnsupportedAdapter(f"{spec.path}: {p} virtual tokens leave no room in the bundle's context length "
                                 f"{onnx_info['context_length']}")
    dtype = float_type(onnx_info)
    out: dict[str, np.ndarray] = {}
    for i, (k, v) in enumerate(layers):
        k_name, v_name = prefix_names(i)
        out[k_name] = np.ascontiguousarray(k, dtype=dtype)
        out[v_name] = np.ascontiguousarray(v, dtype=dtype)
    return out
