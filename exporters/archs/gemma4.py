"""Gemma 4 (text: the E2B / E4B decoder): Gemma 3's layer (a norm before and after attention
and the MLP (Gemma 4's RMSNorms multiply by w itself, not 1 + w), GeGLU, embeddings
scaled by sqrt(hidden) inside the module, sliding-window layers with their own rotary base beside
global ones) with:

- per-layer inputs (base.PerLayerInput): a second embedding table mixed into every layer after
  its MLP;
- KV sharing: the last num_kv_shared_layers layers have no k/v projections and attend over the
  KV cache of the last earlier layer of their layer type (Layout.kv_source);
- full-attention layers with their own head size (global_head_dim, transformers'
  per_layer_config) and "proportional" partial rotary (a table over the whole head whose last
  frequencies are zero);
- q, k and v RMS-normalised per head (v without weight), attention unscaled (scale 1);
- each layer's output times its `layer_scalar`; the logits soft-capped (final_logit_softcapping).

The released checkpoints are multimodal (Gemma4ForConditionalGeneration, model_type "gemma4")
with the text weights under `model.language_model.`: the exporters read the text config and
those weights (hf_base.text_config, checkpoint.CheckpointTensors) and leave the vision and audio
towers out. Not described here (Arch.refused: refused at export): mixture-of-experts
layers, k = v attention, bidirectional attention."""

from .base import Arch, Norms, PerLayerInput

_NORMS = Norms(pre_attention="input_layernorm", post_attention="post_attention_layernorm",
               pre_mlp="pre_feedforward_layernorm", post_mlp="post_feedforward_layernorm", offset=0.0)

GEMMA4 = Arch(family="gemma4", gguf_arch="GEMMA4", norms=_NORMS, activation="gelu_tanh", embed_scale="module",
              qk_norm=True, v_norm=True, attention_scale=1.0, local_rope=True, per_layer_input=PerLayerInput(),
              kv_shared_field="num_kv_shared_layers", layer_scalar="layer_scalar", per_layer_heads=True,
              refused=(("enable_moe_block", False, "mixture-of-experts layers"),
                       ("attention_k_eq_v", False, "attention with keys as values"),
                       ("use_bidirectional_attention", None, "bidirectional attention")))
