"""Llama (Llama 2/3/3.2, SmolLM) and Mistral: the reference layout every field defaults to."""

from .base import Arch

# llama.cpp's llama architecture rotates interleaved pairs: q/k rows are permuted for it.
LLAMA = Arch(family="llama", gguf_arch="LLAMA", permute_qk=True)
MISTRAL = Arch(family="llama", gguf_arch="LLAMA", permute_qk=True)
