"""llama.cpp contexts and the adapter sets they apply, shared by the GGUF backend's sequences
(runtime/gguf_backend.py) and its batcher (runtime/gguf_batch.py).

Ownership: a `LoraSets` owns every adapter handle (`llama_adapter_lora`) of one model and knows
every context made on it. A context applies one adapter set at a time (llama.cpp applies LoRA
per context, never per token) and is held by whatever runs on it: a sequence, or a batcher's
rows. An unloaded adapter is marked at once, so nothing starts applying it; each context that
still applies it drops it when nothing holds it any more (at once when idle), and llama.cpp frees
the handle when the last one has. Unloading waits for the sequences running at that moment to
end, as llama.cpp frees adapters between calls; batch rows keep the adapter until they end.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepeft.errors import AdapterError, BundleError, EngineError


@dataclass(eq=False)
class GgufAdapter:
    path: Path
    handle: object  # llama_adapter_lora_p; None once llama.cpp has freed it
    scale: float = 1.0
    freed: bool = False  # unloaded: no context starts applying it
    users: int = 0  # contexts applying it


@dataclass(frozen=True)
class GgufCombo:
    """Several adapters applied together (each with its own scale)."""

    parts: tuple

    @property
    def path(self) -> Path:
        return Path("+".join(a.path.name for a in self.parts))


def adapter_set(handle) -> tuple:
    """The adapters a handle applies: () for none, one, or a combination's parts."""
    return () if handle is None else handle.parts if isinstance(handle, GgufCombo) else (handle,)


class GgufContext:
    """One llama_context: its KV cache, its token batch, the adapter set it applies and how many
    sequences or rows hold it. Decodes hold the backend's step lock."""

    def __init__(self, llama_cpp, ctx, n_batch: int, n_vocab: int, step_lock, shared: bool = False):
        self.llama_cpp, self.ctx, self.n_batch, self.n_vocab, self.step_lock = llama_cpp, ctx, n_batch, n_vocab, step_lock
        self.shared = shared  # several sequences (a batcher's rows) rather than one
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.active: tuple = ()
        self.holders = 0
        self.releases = 0  # how many times a holder let go

    @property
    def cells(self) -> int:
        return int(self.llama_cpp.llama_n_ctx(self.ctx))

    def decode(self, entries: list) -> None:
        """One llama_decode of `entries` [(token, position, sequence id, want logits)]."""
        if self.ctx is None:
            raise EngineError("this llama.cpp context is closed")
        batch = self.batch
        batch.n_tokens = len(entries)
        for i, (tok, pos, seq, want) in enumerate(entries):
            batch.token[i] = int(tok)
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = bool(want)
        with self.step_lock:
            rc = self.llama_cpp.llama_decode(self.ctx, batch)
        if rc != 0:
            raise EngineError(f"llama.cpp decode failed (code {rc})")

    def logits(self, i: int) -> np.ndarray:
        """A copy of the logits of the last decode's i-th token that asked for them."""
        ptr = self.llama_cpp.llama_get_logits_ith(self.ctx, i)
        if not ptr:
            raise EngineError(f"llama.cpp returned no logits for batch token {i}")
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,)).copy()

    def outputs(self, n: int) -> np.ndarray:
        """A copy of the last decode's logits, [n, vocab]: one row per token that asked for them."""
        ptr = self.llama_cpp.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n, self.n_vocab)).copy()

    def run(self, ids: list[int], start: int, seq: int, all_logits: bool) -> np.ndarray:
        """Decode `ids` at positions start.. of sequence `seq`, in chunks of n_batch; logits of
        every position, or of the last one only."""
        out = []
        for i in range(0, len(ids), self.n_batch):
            chunk, last = ids[i: i + self.n_batch], i + self.n_batch >= len(ids)
            self.decode([(t, start + i + j, seq, all_logits or (last and j == len(chunk) - 1))
                         for j, t in enumerate(chunk)])
            if all_logits or last:
                out.append(self.outputs(len(chunk) if all_logits else 1))
        return out[0] if len(out) == 1 else np.concatenate(out)

    def forget(self, seq: int = -1, start: int = -1) -> None:
        """Drop sequence `seq`'s positions from `start` on (-1: every sequence, every position)."""
        memory = self.llama_cpp.llama_get_memory(self.ctx)
        if seq < 0 and start < 0:
            self.llama_cpp.llama_memory_clear(memory, True)
        elif not self.llama_cpp.llama_memory_seq_rm(memory, seq, start, -1):
            # a recurrent or hybrid memory refuses to drop part of a sequence
            raise EngineError(f"llama.cpp could not drop sequence {seq}'s positions from {start} on")

    def free(self) -> None:
        if self.ctx:
            self.llama_cpp.llama_batch_free(self.batch)
            self.llama_cpp.llama_free(self.ctx)
            self.ctx = None


class LoraSets:
    """A model's adapters and the contexts that apply them (see the module docstring)."""

    def __init__(self, llama_cpp, model):
        self.llama_cpp, self.model = llama_cpp, model
        self.lock = threading.Condition(threading.RLock())  # adapter counts, contexts' sets and holders
        self.contexts: list[GgufContext] = []

    def load(self, path: Path) -> GgufAdapter:
        with self.lock:
            handle = self.llama_cpp.llama_adapter_lora_init(self.model, str(path).encode())
        if not handle:
            raise AdapterError(f"{path}: llama.cpp refused it (not a LoRA GGUF for this base's architecture and shapes)")
        return GgufAdapter(path, handle)

    def add(self, c: GgufContext) -> None:
        with self.lock:
            self.contexts.append(c)

    def discard(self, c: GgufContext) -> None:
        """Forget a context and free it (its adapters lose a user)."""
        with self.lock:
            if c in self.contexts:
                self._apply(c, ())
                self.contexts.remove(c)
            c.free()

    def hold(self, c: GgufContext, handle) -> bool:
        """Hold `c` for a sequence or row on `handle`: the first holder sets the context's adapter
        set. True when it did (the caller then clears the cache)."""
        key = adapter_set(handle)
        with self.lock:
            for a in key:
                if a.freed:
                    raise BundleError(f"adapter {a.path.name} was unloaded while this call waited for it")
            first = c.holders == 0
            if first:
                self._apply(c, key)
            elif not same_set(c.active, key):
                raise EngineError("a llama.cpp context applies one adapter set at a time")
            c.holders += 1
        return first

    def release(self, c: GgufContext) -> None:
        """Let go of `c`; when nothing holds it, it drops the unloaded adapters it applies."""
        with self.lock:
            c.holders -= 1
            c.releases += 1
            if c.holders == 0 and any(a.freed for a in c.active):
                self._apply(c, ())
            self.lock.notify_all()

    def free(self, adapter: GgufAdapter) -> None:
        """Unload `adapter`: idle contexts drop it now, held ones when they are released; returns
        once the sequences running now have ended."""
        with self.lock:
            adapter.freed = True
            for c in self.contexts:
                if c.holders == 0 and any(a is adapter for a in c.active):
                    self._apply(c, ())
            running = {c: c.releases for c in self.contexts if c.holders and not c.shared}
            while any(c.holders and c.releases == n for c, n in running.items()):
                self.lock.wait()
            self._free_unused(adapter)

    def _apply(self, c: GgufContext, key: tuple) -> None:
        """Make `key` context `c`'s adapter set; then free what no context applies any more."""
        if same_set(c.active, key):
            return
        if c.ctx is not None:
            llama_cpp = self.llama_cpp
            if key:
                handles = (llama_cpp.llama_adapter_lora_p_ctypes * len(key))(*[a.handle for a in key])
                scales = (ctypes.c_float * len(key))(*[a.scale for a in key])
                rc = llama_cpp.llama_set_adapters_lora(c.ctx, handles, len(key), scales)
            else:
                rc = llama_cpp.llama_set_adapters_lora(c.ctx, None, 0, None)
            if rc != 0:
                raise EngineError(f"llama.cpp could not apply adapter {key[0].path.name if key else ''} (code {rc})")
        old, c.active = c.active, key
        for a in key:
            a.users += 1
        for a in old:
            a.users -= 1
            self._free_unused(a)

    def _free_unused(self, a: GgufAdapter) -> None:
        if a.freed and a.users == 0 and a.handle is not None:
            self.llama_cpp.llama_adapter_lora_free(a.handle)
            a.handle = None


def same_set(a: tuple, b: tuple) -> bool:
    """Whether two adapter sets are the same handles in the same order."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))
