"""Prompt-learning adapters (prompt tuning, P-tuning, prefix tuning) -> a KV-cache prefix in an
onnxruntime adapter file. The kinds (edgepeft/kinds/prompt.py, prefix.py) check and lay out the
prefix; this module runs the torch base for prompt tuning's.

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

File layout (prompt.kv_prefix_tensors): `prefix.{layer}.key` / `prefix.{layer}.value`
[num_kv_heads, P, head_dim] in the base graph's float type; model_version carries the base
fingerprint like every adapter file.
"""

from __future__ import annotations

import numpy as np

from edgepeft.errors import require

from .checkpoint import float32_compute
from .hf_base import BaseModel


def virtual_token_cache(base: BaseModel, embeddings: np.ndarray, layers: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer (key, value) [num_kv_heads, V, head_dim] of the fp32 base run over `embeddings`
    [V, hidden] at positions 0..V-1 (BaseView.virtual_kv)."""
    torch = require("torch", "export")
    transformers = require("transformers", "export")
    # A config-less DynamicCache keeps every position (one made from a sliding-window config
    # would drop the oldest), while the model still applies its own attention mask.
    cache = transformers.DynamicCache()
    with torch.no_grad(), float32_compute(base):
        base.model.model(inputs_embeds=torch.from_numpy(embeddings)[None], past_key_values=cache, use_cache=True)
    out = []
    for i in range(layers):
        layer = cache.layers[i]
        out.append((layer.keys[0].float().numpy(), layer.values[0].float().numpy()))
    return out
