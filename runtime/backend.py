"""What the Engine asks of a backend, declared once: a Backend, the SequenceState it makes for
each sequence, and the Batcher that decodes rows of several sequences together.

Ownership (llama.h style): a Backend owns the base model and the native memory of every adapter
it loads. A SequenceState is the backend's own object, holding whatever one sequence needs between
two forward passes (a KV cache, and a hybrid family's per-layer states: LFM2's convolution,
Qwen3.5's convolution and recurrent ones):
the Engine only passes it around, asks its length and closes it. A Batcher owns its rows, each a
SequenceState. Adapter handles are backend objects too; the Engine only passes them back.

Capabilities a backend may lack are methods with a default that says so, never attributes
looked up by name: a backend that cannot batch keeps `can_batch`'s False, a state that cannot
drop its last tokens (a recurrent state) keeps `can_trim`'s False.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from edgepeft.errors import EngineError


class SequenceState(ABC):
    """One sequence's state on a backend, from its first token to `close()`."""

    length: int  # positions it holds: an adapter's virtual tokens, then the tokens run so far

    @abstractmethod
    def forward(self, ids: list[int], all_logits: bool = False) -> np.ndarray:
        """Run `ids` after what the state holds; float32 logits [len(ids), vocab], or with
        all_logits=False at least the last position's (use [-1]). A backend may return a buffer
        its next forward overwrites: copy what you keep."""

    @abstractmethod
    def reset(self) -> None:
        """Forget every token run so far (an adapter's virtual tokens stay)."""

    @abstractmethod
    def close(self) -> None:
        """Free the state now (its cache, its context or its row); closing twice is harmless."""

    def can_trim(self) -> bool:
        """Whether `trim` works: a KV cache can drop its last tokens, a recurrent state cannot."""
        return False

    def trim(self, n: int) -> None:
        """Drop the last `n` tokens (for reusing a shared prefix)."""
        raise EngineError(f"{type(self).__name__} cannot drop tokens once run")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Batcher(ABC):
    """Rows of several calls decoded together, one token each per step; used from one thread
    (the Engine's scheduler, runtime/scheduler.py). A row's prompt runs alone, through its
    `forward`; `close()` on a row frees its place."""

    @abstractmethod
    def open_row(self, adapter, budget: int) -> SequenceState:
        """A row of at most `budget` positions on `adapter` (None: the base)."""

    @abstractmethod
    def step(self, rows: list[SequenceState], tokens: list[int]) -> np.ndarray:
        """One token for each row, in one step; float32 logits [len(rows), vocab]."""

    @abstractmethod
    def close(self) -> None:
        """Free every row and buffer; closing twice is harmless."""


class Backend(ABC):
    """A bundle's base on one engine (onnxruntime, llama.cpp)."""

    name: str  # the bundle's key for this backend: "onnx", "gguf"
    context_length: int  # positions one sequence may hold
    parallel: int  # rows a batcher decodes at once
    device: str  # what runs: cpu, cuda, gpu (llama.cpp offload), ...
    providers: list[str]  # the engine's own words for it, best first
    device_note: str | None = None  # one line when the device asked for is not what runs

    @abstractmethod
    def load_adapter(self, path: Path):
        """Load an adapter file of this backend; the handle it returns is passed back to the
        methods below. Raises AdapterError / AdapterMismatch naming the file."""

    @abstractmethod
    def combine(self, adapters: list, names: list[str]):
        """A handle applying several loaded adapters at once (their updates add up)."""

    @abstractmethod
    def open_sequence(self, adapter, max_len: int) -> SequenceState:
        """A new sequence of at most `max_len` positions on `adapter` (None: the base)."""

    @abstractmethod
    def switch_to(self, adapter) -> None:
        """What selecting `adapter` for the next call costs, alone (timed by bench and demo)."""

    def free_adapter(self, adapter) -> None:
        """Release `adapter`'s native memory; sequences that still apply it keep it until they
        end. By default a handle nobody references is freed by the garbage collector."""

    def virtual_tokens(self, adapter) -> int:
        """Positions `adapter` takes before the prompt (prompt-learning kinds)."""
        return 0

    def can_batch(self, adapter) -> bool:
        """Whether a call on `adapter` may join a batch; False runs it alone."""
        return False

    def batcher(self) -> Batcher:
        """A new batcher (only asked for when `can_batch` said yes)."""
        raise EngineError(f"the {self.name} backend does not batch")

    def close(self) -> None:
        """Free the model now, rather than when the backend is garbage collected."""
