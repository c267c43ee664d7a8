"""Phi-3 / Phi-3.5-mini / Phi-4-mini: the Llama block with q/k/v and gate/up stored fused
(qkv_proj, gate_up_proj; PEFT adapters target those), partial rotary (partial_rotary_factor)
and LongRoPE scaling, whose short and long factors are read from the model's rotary module."""

from .base import FUSED_GROUPS, Arch

PHI3 = Arch(family="phi3", gguf_arch="PHI3", groups=FUSED_GROUPS, gguf_sliding_window=True)
