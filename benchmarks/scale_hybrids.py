"""The hybrid shapes of benchmarks/scale_models.py: Qwen3.5-0.8B and LFM2-350M, their published
config.json values and their checkpoints' tensors.

Qwen3.5-0.8B is released as a vision-language checkpoint (Qwen3_5ForConditionalGeneration,
model_type qwen3_5) with the text model under `model.language_model.` and a vision tower under
`model.visual.`; the base written here has both, as the release does (its multi-token-prediction
head, mtp.*, which transformers does not load, is left out). The text tensors are written out by
hand below, so scale_models.check_base checks them against transformers' model; the vision
tower's names and shapes are taken from transformers' own model (edgepeft leaves the tower out,
so it is there to make the checkpoint the size and layout a user's is, not to be checked).
LFM2-350M is a plain causal LM (Lfm2ForCausalLM): convolution layers (in_proj, a depthwise
kernel of conv_L_cache, out_proj) between attention layers with q/k layer norms, its MLP width
adjusted from block_ff_dim as transformers does (block_auto_adjust_ff_dim).
"""

from __future__ import annotations

_QWEN35_LAYERS = (["linear_attention"] * 3 + ["full_attention"]) * 6
_LFM2_FULL = (2, 5, 8, 10, 12, 14)

# Qwen/Qwen3.5-0.8B and LiquidAI/LFM2-350M, their config.json (the fields transformers reads).
SHAPES = {
    "qwen35-0.8b": {
        "architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5", "image_token_id": 248056,
        "video_token_id": 248057, "vision_start_token_id": 248053, "vision_end_token_id": 248054,
        "text_config": {
            "model_type": "qwen3_5_text", "vocab_size": 248320, "hidden_size": 1024, "intermediate_size": 3584,
            "num_hidden_layers": 24, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 256,
            "attn_output_gate": True, "linear_num_key_heads": 16, "linear_num_value_heads": 16,
            "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
            "full_attention_interval": 4, "layer_types": _QWEN35_LAYERS, "max_position_embeddings": 262144,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                                "mrope_section": [11, 11, 10], "mrope_interleaved": True}},
        "vision_config": {
            "model_type": "qwen3_5_vision", "depth": 12, "hidden_size": 768, "num_heads": 12,
            "intermediate_size": 3072, "in_channels": 3, "patch_size": 16, "temporal_patch_size": 2,
            "spatial_merge_size": 2, "out_hidden_size": 1024, "num_position_embeddings": 2304}},
    "lfm2-350m": {
        "architectures": ["Lfm2ForCausalLM"], "model_type": "lfm2", "vocab_size": 65536, "hidden_size": 1024,
        "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 8,
        "max_position_embeddings": 128000, "norm_eps": 1e-5, "conv_bias": False, "conv_L_cache": 3,
        "block_dim": 1024, "block_ff_dim": 6656, "intermediate_size": 6656, "block_multiple_of": 256,
        "block_ffn_dim_multiplier": 1.0, "block_auto_adjust_ff_dim": True, "full_attn_idxs": list(_LFM2_FULL),
        "layer_types": ["full_attention" if i in _LFM2_FULL else "conv" for i in range(16)],
        "rope_theta": 1000000.0},
}

LIKE = {"qwen35-0.8b": "Qwen3.5-0.8B (its vision-language checkpoint)", "lfm2-350m": "LFM2-350M"}


def config(shape: str, tokens: dict) -> dict:
    """config.json of `shape`, bf16, tied embeddings (as both releases), with the tokenizer's
    special ids `tokens`."""
    cfg = {**SHAPES[shape], "tie_word_embeddings": True, "torch_dtype": "bfloat16", **tokens}
    if "text_config" in cfg:
        cfg["text_config"] = {**cfg["text_config"], "hidden_act": "silu", "attention_bias": False,
                              "attention_dropout": 0.0, "initializer_range": 0.02, "tie_word_embeddings": True,
                              "use_cache": True, **tokens}
    else:
        cfg.update({"initializer_range": 0.02, "use_cache": True})
    return cfg


def text_config(cfg: dict) -> dict:
    return cfg.get("text_config", cfg)


def _qwen35_layer(t: dict, p: str, kind: str) -> list[tuple[str, tuple[int, ...]]]:
    h = t["hidden_size"]
    if kind == "full_attention":  # q_proj: each head's query and its output gate
        hd, nq, nkv = t["head_dim"], t["num_attention_heads"], t["num_key_value_heads"]
        a = f"{p}.self_attn"
        return [(f"{a}.q_proj.weight", (2 * nq * hd, h)), (f"{a}.k_proj.weight", (nkv * hd, h)),
                (f"{a}.v_proj.weight", (nkv * hd, h)), (f"{a}.o_proj.weight", (h, nq * hd)),
                (f"{a}.q_norm.weight", (hd,)), (f"{a}.k_norm.weight", (hd,))]
    key = t["linear_num_key_heads"] * t["linear_key_head_dim"]
    nv, vd = t["linear_num_value_heads"], t["linear_value_head_dim"]
    conv = 2 * key + nv * vd  # the convolution runs over q, k and v together
    a = f"{p}.linear_attn"
    return [(f"{a}.in_proj_qkv.weight", (conv, h)), (f"{a}.in_proj_z.weight", (nv * vd, h)),
            (f"{a}.in_proj_b.weight", (nv, h)), (f"{a}.in_proj_a.weight", (nv, h)),
            (f"{a}.conv1d.weight", (conv, 1, t["linear_conv_kernel_dim"])), (f"{a}.dt_bias", (nv,)),
            (f"{a}.A_log", (nv,)), (f"{a}.norm.weight", (vd,)), (f"{a}.out_proj.weight", (h, nv * vd))]


def _lfm2_layer(t: dict, p: str, kind: str) -> list[tuple[str, tuple[int, ...]]]:
    h = t["hidden_size"]
    if kind == "full_attention":
        hd = h // t["num_attention_heads"]
        kv, a = t["num_key_value_heads"] * hd, f"{p}.self_attn"
        return [(f"{a}.q_proj.weight", (h, h)), (f"{a}.k_proj.weight", (kv, h)), (f"{a}.v_proj.weight", (kv, h)),
                (f"{a}.out_proj.weight", (h, h)), (f"{a}.q_layernorm.weight", (hd,)),
                (f"{a}.k_layernorm.weight", (hd,))]
    return [(f"{p}.conv.in_proj.weight", (3 * h, h)), (f"{p}.conv.out_proj.weight", (h, h)),
            (f"{p}.conv.conv.weight", (h, 1, t["conv_L_cache"]))]


def lfm2_ff(t: dict) -> int:
    """The MLP width transformers' Lfm2MLP builds from block_ff_dim (its auto adjustment)."""
    ff = t["intermediate_size"]
    if t.get("block_auto_adjust_ff_dim"):
        ff = int(t["block_ffn_dim_multiplier"] * int(2 * ff / 3))
        ff = t["block_multiple_of"] * -(-ff // t["block_multiple_of"])
    return ff


def tensor_groups(cfg: dict, vision: list[tuple[str, tuple[int, ...]]] | None = None) -> list[list]:
    """The checkpoint's tensors as (name, shape), one group per shard: the embedding and final
    norm, each decoder layer, then (Qwen3.5) the vision tower `vision`. Tied: no lm_head."""
    t = text_config(cfg)
    h, qwen = t["hidden_size"], cfg["model_type"] == "qwen3_5"
    m = "model.language_model" if qwen else "model"
    ff = t["intermediate_size"] if qwen else lfm2_ff(t)
    final = f"{m}.norm.weight" if qwen else f"{m}.embedding_norm.weight"
    groups = [[(f"{m}.embed_tokens.weight", (t["vocab_size"], h)), (final, (h,))]]
    mixer = _qwen35_layer if qwen else _lfm2_layer
    mlp, norms = ((("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), ("input_layernorm", "post_attention_layernorm"))
                  if qwen else (("feed_forward.w1", "feed_forward.w3", "feed_forward.w2"),
                                ("operator_norm", "ffn_norm")))
    for i, kind in enumerate(t["layer_types"]):
        p = f"{m}.layers.{i}"
        groups.append(mixer(t, p, kind) + [(f"{p}.{mlp[0]}.weight", (ff, h)), (f"{p}.{mlp[1]}.weight", (ff, h)),
                                           (f"{p}.{mlp[2]}.weight", (h, ff))]
                      + [(f"{p}.{n}.weight", (h,)) for n in norms])
    if qwen:
        groups.append(vision or [])
    return groups


def vision_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """The vision tower's tensors, from transformers' own model of `cfg` on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    model_cfg = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(model_cfg)
    return [(n, tuple(p.shape)) for n, p in model.state_dict().items() if n.startswith("model.visual.")]


def is_vlm(cfg: dict) -> bool:
    return "vision_config" in cfg
