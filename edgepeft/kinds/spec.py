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
    modules: dict[str, LoraModule] = field(default_factory=dict)

    @property
    def targets(self) -> list[str]:
        """Short names of the adapted layers (q_proj, v_proj, ...), sorted."""
        return sorted({name.rsplit(".", 1)[-1] for name in self.modules})

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values()})

    def summary(self) -> dict:
        """What the manifest records about this adapter."""
        return {
            "kind": self.kind,
            "rank": self.ranks[0] if len(self.ranks) == 1 else self.ranks,
            "targets": self.targets,
            "modules": len(self.modules),
            "source_hash": self.source_hash,
        }
