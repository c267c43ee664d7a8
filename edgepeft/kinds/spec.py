"""The neutral adapter spec: what every kind reads from a PEFT directory, free of torch and PEFT."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class LoraModule:
    """One LoRA-adapted linear layer: y += scale * (x @ a.T @ b.T + bias)."""

    a: np.ndarray  # [rank, in_features]
    b: np.ndarray  # [out_features, rank]
    scale: float
    bias: np.ndarray | None = None  # [out_features], PEFT's lora_bias (scaled like B)
    # DoRA: the trained magnitude m [out_features]; y = m / ||W + scale B A||_row * (x W^T + scale x A^T B^T) + b
    magnitude: np.ndarray | None = None

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.a.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.b.shape[0])


@dataclass
class ScaleModule:
    """One IA3-adapted linear layer: its output (or, for feed-forward layers, its input) is
    multiplied elementwise by `vector`."""

    vector: np.ndarray  # [out_features], or [in_features] when on_input
    on_input: bool

    @property
    def rank(self) -> int:  # a scaling vector has no rank; 0 keeps summaries uniform
        return 0


@dataclass
class AdapterSpec:
    """An adapter as read from a PEFT directory.

    `modules` maps the base model's module name (e.g. "model.layers.0.self_attn.q_proj") to the
    kind's per-module data. `source_hash` is the sha256 of the safetensors file, recorded in the
    manifest so a bundle says exactly which training run each adapter came from.
    """

    kind: str
    path: Path
    config: dict
    source_hash: str
    modules: dict[str, LoraModule | ScaleModule] = field(default_factory=dict)
    # Bias tuning (PEFT bias="all"/"lora_only", BitFit-style): the trained biases, by module name.
    biases: dict[str, np.ndarray] = field(default_factory=dict)
    # Base weights PEFT saved next to the adapter (save_embedding_layers): checked equal to the
    # base at export, because a resized or retrained embedding is not an adapter.
    saved_base: dict[str, np.ndarray] = field(default_factory=dict)
    # Prompt-learning kinds (prompt, prefix): PEFT's `prompt_embeddings` [num_virtual_tokens, D].
    virtual: np.ndarray | None = None

    @property
    def targets(self) -> list[str]:
        """Short names of the adapted layers (q_proj, v_proj, ...), sorted."""
        return sorted({name.rsplit(".", 1)[-1] for name in [*self.modules, *self.biases]})

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values() if isinstance(m, LoraModule)})

    def summary(self) -> dict:
        """What the manifest records about this adapter."""
        if self.virtual is not None:  # no layers adapted: rank and targets mean nothing here
            return {
                "kind": self.kind,
                "peft_type": self.config.get("peft_type"),
                "num_virtual_tokens": int(self.virtual.shape[0]),
                "source_hash": self.source_hash,
            }
        return {
            "kind": self.kind,
            "rank": (self.ranks[0] if len(self.ranks) == 1 else self.ranks) if self.ranks else None,
            "targets": self.targets,
            "modules": len(self.modules),
            **({"biases": len(self.biases)} if self.biases else {}),
            "source_hash": self.source_hash,
        }
