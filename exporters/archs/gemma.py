"""Gemma 2 and Gemma 3 (text): embeddings scaled by sqrt(hidden), RMSNorms applied as `1 + w`,
a norm before and after both attention and the MLP, GeGLU (tanh GELU), attention scaled by
query_pre_attn_scalar, sliding-window layers beside global ones (config.layer_types).
Gemma 2 soft-caps attention scores and logits; Gemma 3 drops the caps, adds q/k norms and
gives its sliding layers their own rotary settings."""

from .base import Arch, Norms

_NORMS = Norms(pre_attention="input_layernorm", post_attention="post_attention_layernorm",
               pre_mlp="pre_feedforward_layernorm", post_mlp="post_feedforward_layernorm", offset=1.0)

GEMMA2 = Arch(family="gemma", gguf_arch="GEMMA2", norms=_NORMS, activation="gelu_tanh", embed_scale="model",
              attention_scale_field="query_pre_attn_scalar", gguf_swa_pattern=2, gguf_scale_is_head_dim=True,
              gguf_sliding_window=True, gguf_softcaps=True)
GEMMA3 = Arch(family="gemma", gguf_arch="GEMMA3", norms=_NORMS, activation="gelu_tanh", embed_scale="module",
              qk_norm=True, attention_scale_field="query_pre_attn_scalar", local_rope=True,
              gguf_swa_pattern=6, gguf_local_rope_base=10000.0, gguf_scale_is_head_dim=True, gguf_sliding_window=True)
