"""Continuous batching on GGUF: rows that share an adapter set decode in one llama_decode, one
sequence id per row in a multi-sequence context; different sets are interleaved, one
llama_decode per set per step (llama.cpp applies LoRA per context, never per token, which is
also why its server batches only requests with the same LoRA settings).

The batcher's contexts are its own, made when a row first needs one: each holds up to `parallel`
sequences in one unified KV cache of context_length cells, and a row reserves its budget (prompt
and generated positions) of those cells, so rows on one set share one cache while their budgets
fit; a row that does not fit opens another context for the same set. At most `parallel`
contexts exist at once (the scheduler runs at most `parallel` rows, so a row always finds one).
llama.cpp allocates a context's cache when it is made, so rows on k sets hold k caches, each
sized for the context. A context whose rows have all ended stays, idle, for the next row of any
set, until the batcher closes (the scheduler closes it when idle).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgepeft.errors import EngineError

from .backend import Batcher, SequenceState
from .gguf_context import GgufContext, adapter_set, same_set


@dataclass(eq=False)
class _BatchContext:
    """One multi-sequence context of a batcher: its rows share its adapter set (`c.active`)."""

    c: GgufContext
    cells: int  # KV cells, shared by its sequences (unified cache)
    free_seqs: list  # sequence ids not held by a row
    rows: list = field(default_factory=list)
    reserved: int = 0  # sum of its rows' budgets (<= cells)


class GgufRow(SequenceState):
    """One row of a batch: a sequence id in a batcher context, `length` positions cached."""

    def __init__(self, batcher: "GgufBatcher", bc: _BatchContext, seq: int, budget: int, handle):
        self.batcher, self.bc, self.seq, self.budget, self.handle, self.length = batcher, bc, seq, budget, handle, 0

    def forward(self, ids, all_logits: bool = False) -> np.ndarray:
        """Run `ids` after the row's cached tokens, alone, in chunks of its context's batch."""
        ids = [int(t) for t in ids]
        if not ids:
            raise EngineError("empty input: nothing to run")
        out = self.batcher.check(self, len(ids)).c.run(ids, self.length, self.seq, all_logits)
        self.length += len(ids)
        return out

    def reset(self) -> None:
        self.trim(self.length)

    def can_trim(self) -> bool:
        return not self.batcher.backend.recurrent

    def trim(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise EngineError(f"cannot drop {n} tokens from a row of {self.length}")
        if n and self.batcher.backend.recurrent and n != self.length:
            raise EngineError("a row with a convolution or recurrent state cannot drop part of its tokens")
        self.batcher.check(self, 0).c.forget(self.seq, self.length - n)
        self.length -= n

    def close(self) -> None:
        self.batcher.close_row(self)


class GgufBatcher(Batcher):
    """Called from one thread (the scheduler's); the backend's LoraSets lock guards what
    unloading an adapter (any thread) looks at."""

    def __init__(self, backend):
        self.backend, self.loras = backend, backend.loras
        self.closed = False
        self._contexts: list[_BatchContext] = []

    def open_row(self, handle, budget: int) -> GgufRow:
        b, budget = self.backend, int(budget)
        if self.closed:
            raise EngineError("this batcher is closed")
        if budget < 1:
            raise EngineError(f"a row needs a budget of at least 1 position, not {budget}")
        if budget > b.context_length:
            raise EngineError(f"{budget} tokens exceed the GGUF context length {b.context_length}")
        key = adapter_set(handle)
        with self.loras.lock:
            for a in key:
                if a.freed:
                    raise EngineError(f"adapter {a.path.name} was unloaded before this row started")
            bc = self._place(key, budget)
            if self.loras.hold(bc.c, handle):
                bc.c.forget()
            row = GgufRow(self, bc, bc.free_seqs.pop(0), budget, handle)
            bc.rows.append(row)
            bc.reserved += budget
        return row

    def _place(self, key: tuple, budget: int) -> _BatchContext:
        """A context for a row of `budget` on adapter set `key`: one on that set with room, an
        idle one (on that set first: no switch), or a new one."""
        live = [bc for bc in self._contexts if bc.rows]
        idle = [bc for bc in self._contexts if not bc.rows]
        for bc in live:
            if same_set(bc.c.active, key) and bc.free_seqs and bc.reserved + budget <= bc.cells:
                return bc
        for bc in idle:
            if same_set(bc.c.active, key):
                return bc
        if idle:
            return idle[0]
        if len(self._contexts) >= self.backend.parallel:
            raise EngineError(f"the batch is full: {len(self._contexts)} GGUF batch contexts are in use")
        c = self.backend.new_context(sequences=self.backend.parallel)
        bc = _BatchContext(c, min(self.backend.context_length, c.cells), list(range(self.backend.parallel)))
        self._contexts.append(bc)
        return bc

    def close_row(self, row: GgufRow) -> None:
        """Free `row`'s sequence; its context, when its last row leaves, stays for the next."""
        with self.loras.lock:
            bc, row.bc = row.bc, None
            if bc is None or bc not in self._contexts:
                return  # closed already (or the batcher closed)
            bc.c.forget(row.seq)
            bc.rows.remove(row)
            bc.reserved -= row.budget
            bc.free_seqs.append(row.seq)
            bc.free_seqs.sort()
            self.loras.release(bc.c)

    def check(self, row: GgufRow, n: int) -> _BatchContext:
        """`row`'s context, if `n` more positions fit its budget."""
        if self.closed or row.bc is None:
            raise EngineError("this row has ended")
        if row.length + n > row.budget:
            raise EngineError(f"row of {row.length + n} tokens exceeds its budget of {row.budget}")
        return row.bc

    def step(self, rows: list, tokens: list) -> np.ndarray:
        if len(rows) != len(tokens):
            raise EngineError(f"{len(rows)} rows but {len(tokens)} tokens")
        if len({id(r) for r in rows}) != len(rows):
            raise EngineError("a row appears twice in one step")
        groups: dict[int, tuple[_BatchContext, list]] = {}  # one llama_decode per context
        for i, row in enumerate(rows):
            bc = self.check(row, 1)
            groups.setdefault(id(bc), (bc, []))[1].append(i)
        out = np.empty((len(rows), self.backend.n_vocab), dtype=np.float32)
        for bc, idx in groups.values():
            bc.c.decode([(tokens[i], rows[i].length, rows[i].seq, True) for i in idx])
            for j, i in enumerate(idx):
                out[i] = bc.c.logits(j)
                rows[i].length += 1
        return out

    def close(self) -> None:
        with self.loras.lock:
            if self.closed:
                return
            self.closed = True
            contexts, self._contexts = self._contexts, []
            for bc in contexts:
                for row in bc.rows:
                    row.bc = None
                bc.rows = []
                bc.c.holders = 0
                self.loras.discard(bc.c)
