"""Prompt-learning adapters (prompt tuning, P-tuning, prefix tuning) -> a KV-cache prefix in an
onnxruntime adapter file.

Both kinds come down to keys and values for P virtual positions at the start of every layer's KV
cache; the runtime copies them into a sequence's cache and runs the real tokens at positions
P, P+1, ..., which is what PEFT does:
- prefix tuning: PEFT hands its past_key_values to the model as a P-long cache, so HF gives the
  real tokens cache positions P.. (LlamaModel: cache_position = arange(past, past + n)). The
  keys are used as saved, without rotary, exactly like GroupQueryAttention's cache entries.
- prompt tuning / P-tuning: PEFT concatenates the V virtual embeddings before the token
  embeddings and runs the whole sequence, virtual tokens at positions 0..V-1. Causal attention
  means the virtual positions' keys and values depend only on the virtual embeddings, so we run
  the fp32 base once over them here and store its cache (post-rotary keys, as GroupQueryAttention
  caches them). This needs the torch base, which `export` has loaded anyway and `add-adapter`
  loads from the bundle's recorded source.

File layout: `prefix.{layer}.key` / `prefix.{layer}.value` [num_kv_heads, P, head_dim] in the
base graph's float type; model_version carries the base fingerprint like every adapter file.
"""

from __future__ import annotations

from typing import Callable, Union

import numpy as np

from edgepeft.errors import AdapterMismatch, UnsupportedAdapter, require
from edgepeft.kinds import AdapterSpec
from edgepeft.kinds.prefix import past_key_values
from edgepeft.runtime_contract import prefix_names

from .hf_base import BaseModel

KINDS = ("prompt", "prefix")
BaseSource = Union[BaseModel, Callable[[], BaseModel], None]


def _prefix_from_prefix_tuning(spec: AdapterSpec, kv: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    cfg = spec.config
    have = (int(cfg["num_layers"]), int(cfg["num_attention_heads"]), int(cfg["token_dim"]) // int(cfg["num_attention_heads"]))
    want = (kv["num_layers"], kv["num_kv_heads"], kv["head_dim"])
    if have != want:
        raise AdapterMismatch(
            f"{spec.path}: prefix is for {have[0]} layers x {have[1]} KV heads x {have[2]} dims, the base has "
            f"{want[0]} x {want[1]} x {want[2]} (adapter trained for another base?)"
        )
    return past_key_values(spec)


def _prefix_from_prompt_tuning(spec: AdapterSpec, base: BaseModel, kv: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    torch = require("torch", "export")
    transformers = require("transformers", "export")
    hidden = base.dims["hidden_size"]
    if spec.virtual.shape[1] != hidden:
        raise AdapterMismatch(f"{spec.path}: virtual tokens have {spec.virtual.shape[1]} dims, the base's embeddings "
                              f"{hidden} (adapter trained for another base?)")
    # A config-less DynamicCache keeps every position (one made from a sliding-window config
    # would drop the oldest), while the model still applies its own attention mask.
    cache = transformers.DynamicCache()
    with torch.no_grad():
        base.model.model(inputs_embeds=torch.from_numpy(spec.virtual)[None], past_key_values=cache, use_cache=True)
    out = []
    for i in range(kv["num_layers"]):
        layer = cache.layers[i]
        out.append((layer.keys[0].float().numpy(), layer.values[0].float().numpy()))
    return out


def prefix_tensors(spec: AdapterSpec, onnx_info: dict, base: BaseSource = None) -> dict[str, np.ndarray]:
    """The `prefix.*` parameters of `spec` for a bundle whose ONNX base is `onnx_info`."""
    kv = onnx_info["kv"]
    if spec.kind == "prefix":
        layers = _prefix_from_prefix_tuning(spec, kv)
    elif spec.kind == "prompt":
        if callable(base):
            base = base()
        if base is None:
            raise UnsupportedAdapter(f"{spec.path}: prompt tuning needs the base model to compute its KV prefix")
        layers = _prefix_from_prompt_tuning(spec, base, kv)
    else:
        raise UnsupportedAdapter(f"{spec.path}: kind {spec.kind} is not a prompt-learning kind")
    p = int(spec.virtual.shape[0])
    if p >= int(onnx_info["context_length"]):
        raise UnsupportedAdapter(f"{spec.path}: {p} virtual tokens leave no room in the bundle's context length "
                                 f"{onnx_info['context_length']}")
    dtype = np.float16 if onnx_info.get("dtype") == "fp16" else np.float32
    out: dict[str, np.ndarray] = {}
    for i, (k, v) in enumerate(layers):
        k_name, v_name = prefix_names(i)
        out[k_name] = np.ascontiguousarray(k, dtype=dtype)
        out[v_name] = np.ascontiguousarray(v, dtype=dtype)
    return out
