"""Qwen2 / Qwen2.5: the Llama layout with q/k/v biases (read from the checkpoint), the NeoX
rotary layout in llama.cpp, and a sliding window that applies only with use_sliding_window."""

from .base import Arch

QWEN2 = Arch(family="qwen2", gguf_arch="QWEN2", sliding_window_flag="use_sliding_window",
             gguf_pre_tokenizer="qwen2")
