"""Next-token choice: greedy, or temperature with top-k / top-p, from a seeded generator."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgepeft.errors import InvalidArgument


@dataclass
class SamplingParams:
    """How each next token is chosen; out-of-range values raise InvalidArgument naming the value."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InvalidArgument(f"temperature {self.temperature} must be a finite number >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k {self.top_k} must be >= 0 (0 = no limit)")
        if not 0 < self.top_p <= 1:  # also refuses NaN
            raise InvalidArgument(f"top_p {self.top_p} must be in (0, 1] (1 = no limit)")
        if self.seed is not None and self.seed < 0:
            raise InvalidArgument(f"seed {self.seed} must be >= 0")


def generation_params(max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                      seed: int | None = None) -> SamplingParams:
    """Check one generation request's arguments and return its sampling parameters; the CLI calls
    it before opening a bundle, so that bad values fail before any model loads."""
    if max_new_tokens < 1:
        raise InvalidArgument(f"max new tokens {max_new_tokens} must be at least 1")
    return SamplingParams(temperature, top_k, top_p, seed)


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        if p.temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / p.temperature
        if p.top_k and p.top_k < z.size:
            kth = np.partition(z, -p.top_k)[-p.top_k]
            z = np.where(z < kth, -np.inf, z)
        z -= z.max()
        probs = np.exp(z)
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs)
            cum = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cum, p.top_p)) + 1]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(self.rng.choice(probs.size, p=probs))
