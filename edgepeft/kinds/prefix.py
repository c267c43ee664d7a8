"""Prefix tuning: learned keys and values for P virtual positions in every attention layer.

PEFT saves `prompt_embeddings` [num_virtual_tokens, num_layers * 2 * token_dim]. With
prefix_projection it is already the projection MLP's output (see prompt.py on
get_prompt_embedding_to_save). For grouped-query attention PEFT sets token_dim = num_kv_heads *
head_dim and num_attention_heads = num_kv_heads in the saved config, so `PeftModel.get_prompt`
views each row as [num_layers * 2, num_attention_heads, token_dim / num_attention_heads]: entry
2*l is layer l's key, 2*l + 1 its value. Keys go into the KV cache as they are (no rotary), the
real tokens then run at positions P, P+1, ...
"""

from __future__ import annotations

from pathlib import Path

from ..errors import AdapterError
from ..files import sha256_file
from .prompt import config_int, read_virtual
from .spec import AdapterSpec

KIND = "prefix"
PEFT_TYPES = ("PREFIX_TUNING",)
# Virtual tokens are not a weight delta: `export --merge` refuses this kind.
MERGEABLE = False


def read(path: Path, config: dict) -> AdapterSpec:
    layers = config_int(path, config, "num_layers")
    token_dim = config_int(path, config, "token_dim")
    heads = config_int(path, config, "num_attention_heads")
    if token_dim % heads:
        raise AdapterError(f"{path / 'adapter_config.json'}: token_dim {token_dim} is not a multiple of "
                           f"num_attention_heads {heads}")
    virtual = read_virtual(path, config, layers * 2 * token_dim, "num_layers * 2 * token_dim")
    return AdapterSpec(kind=KIND, path=path, config=config, source_hash=sha256_file(path / "adapter_model.safetensors"),
                       virtual=virtual)


def past_key_values(spec: AdapterSpec) -> list[tuple]:
    """Per layer (key, value), each [heads, P, head_dim], exactly as PeftModel.get_prompt lays
    them out (view [P, layers * 2, heads, head_dim], then permute to [layers * 2, heads, P, hd])."""
    cfg = spec.config
    layers, heads = int(cfg["num_layers"]), int(cfg["num_attention_heads"])
    p = spec.virtual.shape[0]
    kv = spec.virtual.reshape(p, layers * 2, heads, int(cfg["token_dim"]) // heads).transpose(1, 2, 0, 3)
    return [(kv[2 * i], kv[2 * i + 1]) for i in range(layers)]
