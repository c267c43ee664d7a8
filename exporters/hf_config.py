"""What a Hugging Face config says, read the same way on transformers 4.57 and 5.x.

transformers 5 moved the rotary settings into `config.rope_parameters` (one dict, or one per
layer type for Gemma 3), dropped `rope_theta` / `rope_local_base_freq` as attributes and keeps
`rope_scaling` only as an alias. Everything in the exporters that needs those settings asks here.
"""

from __future__ import annotations

FULL, SLIDING = "full_attention", "sliding_attention"


def rope_parameters(config, layer_type: str = FULL) -> dict:
    """The rotary settings of `layer_type`'s layers: `rope_type`, `rope_theta` and the scaling
    fields of that type (`factor`, `original_max_position_embeddings`, ...)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:  # transformers 5
        if all(isinstance(v, dict) for v in params.values()):  # one dict per layer type
            params = params.get(layer_type) or params.get(FULL) or {}
        out = dict(params)
    else:  # transformers 4.x: rope_theta plus an optional rope_scaling dict
        out = dict(getattr(config, "rope_scaling", None) or {})
        out["rope_theta"] = float(getattr(config, "rope_theta", 10000.0))
        local = getattr(config, "rope_local_base_freq", None)
        if layer_type == SLIDING and local is not None:  # Gemma 3: sliding layers are never scaled
            out = {"rope_theta": float(local)}
    out["rope_type"] = out.get("rope_type", out.get("type")) or "default"
    out.setdefault("rope_theta", 10000.0)
    return out


def partial_rotary_factor(config) -> float:
    """The share of each head's dimensions that rotate (Phi-4-mini, Qwen3.5: below 1)."""
    value = getattr(config, "partial_rotary_factor", None)
    if value is None:
        value = rope_parameters(config).get("partial_rotary_factor")
    return float(value or 1.0)


def rotary_call(model, layer_type: str):
    """A callable (x, position_ids) -> (cos, sin) giving `layer_type`'s rotary table from the
    model's own rotary module: transformers 5 keeps one module taking the layer type (Gemma 3),
    4.x a second module for the sliding layers (`rotary_emb_local`). None when absent."""
    import inspect

    inner = model.model
    module = inner.rotary_emb
    if "layer_type" in inspect.signature(module.forward).parameters:
        return lambda x, pos: module(x, pos, layer_type)
    if layer_type == SLIDING:
        module = getattr(inner, "rotary_emb_local", None)
        if module is None:
            return None
    return module
