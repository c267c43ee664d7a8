"""Batched decoding on the ONNX backend: rows of different lengths, each on its own adapter (or
none), in one forward pass.

- One KV buffer per layer for all rows, [rows, kv_heads, positions, head_dim], serving as past
  and present. Row i's length is its attention mask's row sum: GroupQueryAttention reads per-row
  lengths from it and writes each row's new key and value, with rotary, at that row's position.
  The buffer grows as rows join, to what they ask for, and is freed when the last row leaves. A
  leaving row's place is taken by the last row (one copy of its cache), so rows 0..n-1 are used.
- Adapters: bases exported with row masks (the manifest's "row_masks") take the batch's adapters'
  ranks side by side in every slot (runtime/onnx_adapter.side_by_side) and a per-slot row mask
  that keeps row i's own columns, so each adapter's weights are read once per step. Rows all on
  one adapter bind it as one call does; rows all on the base run the slot-free path.
- A newcomer's prompt runs alone over its own row of the buffer (`OnnxRow.forward`), in chunks
  the scheduler interleaves with the others' decode steps.
- A hybrid base (LFM2, Qwen3.5): the KV buffers are the attention layers' only, and each other
  layer's state (convolution, recurrent) has a buffer of its own, [rows, *its shape], read as the
  past state; the graph writes the present state to a second array, and only the rows that ran
  copy theirs back, so a row riding along a step with a placeholder token keeps its state. A
  row's state is zeroed when it opens or resets; the state cannot drop tokens, so such rows do
  not trim.

Which calls batch is OnnxBackend.can_batch's one rule; the others run alone.
"""

from __future__ import annotations

import numpy as np

from edgepeft.errors import EngineError
from edgepeft.runtime_contract import ATTENTION_MASK, INPUT_IDS, LOGITS, kv_names, row_mask

from .backend import Batcher, SequenceState
from .onnx_adapter import side_by_side

POSITION_STEP = 64  # the buffer's positions grow in steps of this many


class OnnxRow(SequenceState):
    """One row of the batch: its adapter, its place in the buffer and its cached length."""

    def __init__(self, batcher: "OnnxBatcher", handle, budget: int, index: int):
        self.batcher, self.handle, self.budget, self.index, self.length = batcher, handle, budget, index, 0

    def forward(self, ids, all_logits: bool = False) -> np.ndarray:
        """Run `ids` after the row's cached tokens, alone, over its row of the buffer."""
        return self.batcher.prefill(self, ids, all_logits)

    def reset(self) -> None:
        self.length = 0
        self.batcher.zero_states(self)

    def can_trim(self) -> bool:
        return not self.batcher.states

    def trim(self, n: int) -> None:
        if self.batcher.states:
            raise EngineError("a row with a convolution or recurrent state cannot drop tokens once run")
        if not 0 <= n <= self.length:
            raise EngineError(f"cannot drop {n} tokens from a row of {self.length}")
        self.length -= n

    def close(self) -> None:
        self.batcher.close_row(self)


class OnnxBatcher(Batcher):
    """The rows of one scheduler (runtime/scheduler.py) on an OnnxBackend. Used from one thread."""

    def __init__(self, backend):
        self.b = backend
        self.rows: list[OnnxRow] = []
        self.kv: list[np.ndarray] = []  # per attention layer: key, value [capacity, kv_heads, positions, head_dim]
        self.states: list[np.ndarray] = []  # per layer state (backend.states): [capacity, *shape]
        self.capacity = self.positions = 0
        self._decode = None  # (key, IOBinding, logits array, present states, arrays it reads) of the last step's layout
        self._combined: dict = {}  # adapters (by id) -> their slots side by side, a few kept

    def open_row(self, handle, budget: int) -> OnnxRow:
        if budget > self.b.context_length:
            raise EngineError(f"{budget} tokens exceed the bundle's context length {self.b.context_length}")
        n = len(self.rows)
        self._grow(n + 1, budget)
        row = OnnxRow(self, handle, budget, n)
        self.zero_states(row)
        self.rows.append(row)
        self._decode = None
        return row

    def close_row(self, row: OnnxRow) -> None:
        """Free `row`: the last row moves into its place (its cache copied), or, when it was the
        last row of all, the whole buffer is freed."""
        i, last = row.index, len(self.rows) - 1
        if i < 0 or self.rows[i] is not row:
            return  # closed already
        if i != last:
            moved = self.rows[last]
            for buf in self.kv:
                buf[i, :, : moved.length] = buf[last, :, : moved.length]
            for buf in self.states:
                buf[i] = buf[last]
            moved.index, self.rows[i] = i, moved
        self.rows.pop()
        row.index = -1
        self._decode = None
        if not self.rows:
            self.close()

    def close(self) -> None:
        for row in self.rows:
            row.index = -1
        self.rows, self.kv, self.states, self._decode, self._combined = [], [], [], None, {}
        self.capacity = self.positions = 0

    def _grow(self, rows: int, budget: int) -> None:
        """Make the buffer hold `rows` rows of at least `budget` positions (copying what is
        cached): rows double, positions round up to POSITION_STEP within the context length."""
        if rows <= self.capacity and budget <= self.positions:
            return
        b = self.b
        capacity = max(rows, min(2 * self.capacity, rows + 8)) if rows > self.capacity else self.capacity
        positions = max(self.positions, min(-(-budget // POSITION_STEP) * POSITION_STEP, b.context_length))
        new = [np.zeros((capacity, b.kv_shapes[i][0], positions, b.kv_shapes[i][1]), b.dtype)
               for i in b.kv_layers for _ in range(2)]
        for old, buf in zip(self.kv, new):
            for row in self.rows:
                buf[row.index, :, : row.length] = old[row.index, :, : row.length]
        states = [np.zeros((capacity, *shape[1:]), b.dtype) for _, shape in b.states]
        for old, buf in zip(self.states, states):
            buf[: len(self.rows)] = old[: len(self.rows)]
        self.kv, self.states, self.capacity, self.positions, self._decode = new, states, capacity, positions, None

    def zero_states(self, row: OnnxRow) -> None:
        for buf in self.states:
            buf[row.index] = 0

    # ---- running -----------------------------------------------------------------------------------
    def prefill(self, row: OnnxRow, ids: list[int], all_logits: bool = False) -> np.ndarray:
        """Run `ids` after `row`'s cached tokens, alone, over its row of the buffer; float32
        logits [len(ids) or 1, vocab]."""
        b, n = self.b, len(ids)
        if row.index < 0:
            raise EngineError("this row has ended")
        if n == 0:
            raise EngineError("empty input: nothing to run")
        if row.length + n > row.budget:
            raise EngineError(f"sequence of {row.length + n} tokens exceeds the buffer of {row.budget}")
        io = b.session.io_binding()
        if row.handle is not None:
            b.bind_adapter(io, row.handle)
        self._bind_kv(io, row.index, row.index + 1)
        present = self._bind_states(io, row.index, row.index + 1)
        io.bind_cpu_input(INPUT_IDS, np.asarray(ids, np.int64).reshape(1, n))
        io.bind_cpu_input(ATTENTION_MASK, np.ones((1, row.length + n), np.int64))
        kept = n if all_logits or not b.keeps_logits else 1
        if b.keeps_logits:
            b.bind_kept_logits(io, 0 if kept == n else 1)
        logits = np.empty((1, kept, b.vocab_size), b.dtype)
        io.bind_ortvalue_output(LOGITS, b.ort.OrtValue.ortvalue_from_numpy(logits))
        with b.step_lock:
            b.session.run_with_iobinding(io)
        for buf, new in zip(self.states, present):
            buf[row.index] = new[0]
        row.length += n
        return logits[0].astype(np.float32, copy=False)

    def step(self, rows: list[OnnxRow], tokens: list[int]) -> np.ndarray:
        """A view the next step overwrites. Rows of the buffer not in `rows` (a newcomer whose
        prompt is still running) ride along with a placeholder token at their next position,
        which their next prompt chunk overwrites; their logits are dropped."""
        for row in rows:
            if row.index < 0:
                raise EngineError("this row has ended")
            if row.length + 1 > row.budget:
                raise EngineError(f"sequence of {row.length + 1} tokens exceeds the buffer of {row.budget}")
        m = max(r.index for r in rows) + 1
        stepped = {r.index for r in rows}
        handles = tuple(self.rows[i].handle if i in stepped else None for i in range(m))
        key = (m, tuple(map(id, handles)))
        if self._decode is None or self._decode[0] != key:
            self._decode = (key, *self._decode_binding(m, handles))
        _, io, logits, present, _ = self._decode
        ids = np.zeros((m, 1), np.int64)
        for row, token in zip(rows, tokens):
            ids[row.index, 0] = token
        lengths = np.array([r.length + 1 for r in self.rows[:m]])
        io.bind_cpu_input(INPUT_IDS, ids)
        io.bind_cpu_input(ATTENTION_MASK, (np.arange(lengths.max()) < lengths[:, None]).astype(np.int64))
        with self.b.step_lock:
            self.b.session.run_with_iobinding(io)
        ran = [r.index for r in rows]
        for buf, new in zip(self.states, present):
            buf[ran] = new[ran]  # rows riding along keep their state
        for row in rows:
            row.length += 1
        return logits[[r.index for r in rows], 0].astype(np.float32, copy=False)

    def _bind_kv(self, io, start: int, stop: int) -> None:
        """Bind rows start..stop-1 of every layer's buffer as past and present (zero-copy views)."""
        ort = self.b.ort
        for j, i in enumerate(self.b.kv_layers):
            past_key, past_value, present_key, present_value = kv_names(i)
            for buf, past, present in ((self.kv[2 * j], past_key, present_key),
                                       (self.kv[2 * j + 1], past_value, present_value)):
                v = ort.OrtValue.ortvalue_from_numpy(buf[start:stop])
                io.bind_ortvalue_input(past, v)
                io.bind_ortvalue_output(present, v)

    def _bind_states(self, io, start: int, stop: int) -> list[np.ndarray]:
        """Bind rows start..stop-1 of every state buffer as the past state (zero-copy views) and
        a new array per state as the present one; return those arrays."""
        ort, present = self.b.ort, []
        for ((past_name, present_name), _), buf in zip(self.b.states, self.states):
            out = np.empty_like(buf[start:stop])
            io.bind_ortvalue_input(past_name, ort.OrtValue.ortvalue_from_numpy(buf[start:stop]))
            io.bind_ortvalue_output(present_name, ort.OrtValue.ortvalue_from_numpy(out))
            present.append(out)
        return present

    def _decode_binding(self, m: int, handles: tuple):
        """The IOBinding of a decode step over rows 0..m-1 on `handles` (None: the base), the
        logits and present states arrays it writes, and the arrays its OrtValues read (CPU
        OrtValues do not own them)."""
        b = self.b
        io = b.session.io_binding()
        self._bind_kv(io, 0, m)
        present = self._bind_states(io, 0, m)
        distinct = list({id(h): h for h in handles if h is not None}.values())
        keep: list = []
        if len(distinct) == 1 and None not in handles:
            b.bind_adapter(io, distinct[0])  # every row on one adapter: as one call binds it
        elif distinct:
            keep = self._bind_side_by_side(io, distinct, handles)
            b.bind_slot_path(io)
        if b.keeps_logits:
            b.bind_kept_logits(io, 1)
        logits = np.empty((m, 1, b.vocab_size), b.dtype)
        io.bind_ortvalue_output(LOGITS, b.ort.OrtValue.ortvalue_from_numpy(logits))
        return io, logits, present, keep

    def _bind_side_by_side(self, io, adapters: list, handles: tuple) -> list:
        """Bind each slot's A and B with the adapters' ranks side by side, and its row mask;
        return the arrays the bound values read."""
        key = tuple(map(id, adapters))
        cached = self._combined.get(key)
        if cached is None or any(a is not h for a, h in zip(cached[0], adapters)):
            ort = self.b.ort
            slots = side_by_side(adapters, self.b.slot_of)
            values = {m: (ort.OrtValue.ortvalue_from_numpy(s.a), ort.OrtValue.ortvalue_from_numpy(s.b))
                      for m, s in slots.items()}
            cached = self._combined[key] = (tuple(adapters), slots, values)
            while len(self._combined) > 4:
                self._combined.pop(next(iter(self._combined)))
        _, slots, values = cached
        keep = [cached]
        for module, slot in slots.items():
            mask = np.zeros((len(handles), sum(slot.ranks)), self.b.dtype)
            start = 0
            for adapter, rank in zip(adapters, slot.ranks):
                mask[[i for i, h in enumerate(handles) if h is adapter], start: start + rank] = 1
                start += rank
            mask = mask.reshape(len(handles), *([1] * (slot.a.ndim - 1)), -1)  # [rows, 1, r] or [rows, 1, 1, r]
            io.bind_ortvalue_input(slot.a_name, values[module][0])
            io.bind_ortvalue_input(slot.b_name, values[module][1])
            io.bind_ortvalue_input(row_mask(module), self.b.ort.OrtValue.ortvalue_from_numpy(mask))
            keep.append(mask)
        return keep
