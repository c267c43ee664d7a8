"""Qwen3: Qwen2 without q/k/v biases, plus an RMSNorm over each head's q and k before rotary."""

from .base import Arch

QWEN3 = Arch(family="qwen3", gguf_arch="QWEN3", qk_norm=True, sliding_window_flag="use_sliding_window",
             gguf_pre_tokenizer="qwen2")
