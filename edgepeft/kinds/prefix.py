"""Prefix tuning: learned keys and values for P virtual positions in every attention layer.

PEFT saves `prompt_embeddings` [num_virtual_tokens, num_layers * 2 * token_dim]. With
prefix_projection it is already the projection MLP's output (see prompt.py on
get_prompt_embedding_to_save). For grouped-query attention PEFT sets token_dim = num_kv_heads *
head_dim and num_attention_heads = num_kv_heads in the saved config, so `PeftModel.get_prompt`
views each row as [num_layers * 2, num_attention_heads, token_dim / num_attention_heads]: entry
2*l is layer l's key, 2*l + 1 its value. Keys go into the KV cache as they are (no rotary), the
real tokens then run at positions P, P+1, ...

ONNX: PEFT hands these to the model as a P-long cache, so the adapter file holds them as they are
(prompt.kv_prefix_tensors), with no slots and nothing computed from the base. Not mergeable, and
llama.cpp's adapter files cannot hold it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import AdapterError, AdapterMismatch
from ..files import sha256_file
from .prompt import config_int, kv_prefix_tensors, read_virtual
from .protocol import BaseView, no_gguf_form
from .spec import AdapterSpec

NAME = "prefix"
PEFT_TYPES = ("PREFIX_TUNING",)
SUPPORT = {"onnx": "swap", "gguf": "no"}
# Virtual tokens are not a weight delta: `export --merge` refuses this kind.
MERGEABLE = False
gguf_tensors = no_gguf_form


def read(path: Path, config: dict) -> AdapterSpec:
    layers = config_int(path, config, "num_layers")
    token_dim = config_int(path, config, "token_dim")
    heads = config_int(path, config, "num_attention_heads")
    if token_dim % heads:
        raise AdapterError(f"{path / 'adapter_config.json'}: token_dim {token_dim} is not a multiple of "
                           f"num_attention_heads {heads}")
    virtual = read_virtual(path, config, layers * 2 * token_dim, "num_layers * 2 * token_dim")
    return AdapterSpec(kind=NAME, path=path, config=config, source_hash=sha256_file(path / "adapter_model.safetensors"),
                       virtual=virtual)


def past_key_values(spec: AdapterSpec) -> list[tuple]:
    """Per layer (key, value), each [heads, P, head_dim], exactly as PeftModel.get_prompt lays
    them out (view [P, layers * 2, heads, head_dim], then permute to [layers * 2, heads, P, hd])."""
    cfg = spec.config
    layers, heads = int(cfg["num_layers"]), int(cfg["num_attention_heads"])
    p = spec.virtual.shape[0]
    kv = spec.virtual.reshape(p, layers * 2, heads, int(cfg["token_dim"]) // heads).transpose(1, 2, 0, 3)
    return [(kv[2 * i], kv[2 * i + 1]) for i in range(layers)]


def slots(spec: AdapterSpec) -> str:
    return "none"


def onnx_tensors(spec: AdapterSpec, onnx_info: dict, base: BaseView | None) -> dict[str, np.ndarray]:
    kv, cfg = onnx_info["kv"], spec.config
    have = (int(cfg["num_layers"]), int(cfg["num_attention_heads"]), int(cfg["token_dim"]) // int(cfg["num_attention_heads"]))
    want = (kv["num_layers"], kv["num_kv_heads"], kv["head_dim"])
    if have != want:
        raise AdapterMismatch(
            f"{spec.path}: prefix is for {have[0]} layers x {have[1]} KV heads x {have[2]} dims, the base has "
            f"{want[0]} x {want[1]} x {want[2]} (adapter trained for another base?)"
        )
    return kv_prefix_tensors(spec, onnx_info, past_key_values(spec))
