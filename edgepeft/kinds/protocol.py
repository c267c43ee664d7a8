"""The protocol every adapter kind implements: one module per kind, listed once in
`edgepeft.kinds.KINDS`, which the readers and exporters look the kind up in (docs/kinds.md).

Kinds import neither torch nor onnx: what a kind computes from the base (DoRA's weight norms, a
layer's bias, prompt tuning's KV cache) it asks of a `BaseView`, which the exporter implements over
the loaded model; the file writers (onnxruntime's AdapterFormat, gguf-py) stay in exporters/.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Protocol

import numpy as np

from ..errors import UnsupportedAdapter
from .spec import AdapterSpec


class BaseView(Protocol):
    """The base model as a kind computed from it sees it (exporters/onnx_adapter.py implements it)."""

    dims: dict  # the manifest's dims: hidden_size, num_layers, num_kv_heads, ...

    def param(self, module: str, name: str) -> np.ndarray | None:
        """Module `module`'s parameter `name` ("weight", "bias") as float32; None when it has none."""

    def virtual_kv(self, embeddings: np.ndarray, layers: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per layer (key, value) [kv_heads, V, head_dim] of the base run over `embeddings`
        [V, hidden] at positions 0..V-1, keys after rotary (as GroupQueryAttention caches them)."""


class GgufLora(NamedTuple):
    """What a kind's GGUF LoRA adapter holds; exporters/gguf_adapter.py names and writes it."""

    alpha: float  # adapter.lora.alpha; 0 when each lora_b already carries its module's exact scale
    # (module, lora_a [r, in], lora_b [out, r]) per module, each checked as it is taken
    tensors: Iterable[tuple[str, np.ndarray, np.ndarray]]


class Kind(Protocol):
    """One adapter kind, end to end. A kind module provides these names."""

    NAME: str  # our name, the manifest's "kind"
    PEFT_TYPES: tuple[str, ...]  # the adapter_config.json peft_type values it reads; () if another kind's reader gives it
    SUPPORT: dict[str, str]  # backend -> "swap" (own file, hot-swapped), "merge" (only with --merge) or "no"
    MERGEABLE: bool  # whether export --merge can bake it into the base (PEFT's merge_and_unload)

    def slots(self, spec: AdapterSpec) -> str:
        """The ONNX slot set `spec` needs: "lora", "full" (scale and bias slots too) or "none"."""

    def read(self, path, config: dict) -> AdapterSpec:
        """The PEFT directory `path`, whose adapter_config.json is `config`, as an AdapterSpec."""

    def onnx_tensors(self, spec: AdapterSpec, onnx_info: dict, base: BaseView | None) -> dict[str, np.ndarray]:
        """The parameters of `spec`'s .onnx_adapter file for the bundle's ONNX base `onnx_info`."""

    def gguf_tensors(self, spec: AdapterSpec, linear_shapes: dict) -> GgufLora:
        """`spec` as a GGUF LoRA adapter, or UnsupportedAdapter when llama.cpp's format cannot hold it."""


def no_gguf_form(spec: AdapterSpec, linear_shapes: dict) -> GgufLora:
    """`gguf_tensors` of the kinds llama.cpp's LoRA adapter files cannot hold."""
    raise UnsupportedAdapter(f"{spec.path}: kind {spec.kind} has no GGUF adapter form; use --merge")
