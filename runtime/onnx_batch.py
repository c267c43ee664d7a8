"""Batched decoding on the ONNX backend: rows of different lengths, each on its own adapter (or
none), in one forward pass.

The decoder's inputs already have a batch axis; what a batch needs from the runtime:

- One KV buffer per layer for all rows, [rows, kv_heads, positions, head_dim], serving as past
  and present (GroupQueryAttention writes in place). Row i's length is its attention mask's row
  sum: GroupQueryAttention reads per-row lengths (seqlens_k) from it, writes each row's new key
  and value at that row's own position and applies rotary at that position. The buffer grows
  (rows, positions) as rows join, to what the rows ask for (prompt + max tokens, within
  --max-context), and is freed when the last row leaves. A leaving row's slot is refilled by the
  last row (one copy of that row's cache), so the rows in use are always 0..n-1.
- Adapters: bases exported with row masks (the manifest's "row_masks"; exporters/onnx_slots.py)
  bind the batch's adapters' ranks side by side in every slot, A = [A_1 | A_2 ...] and
  B = [B_1; B_2 ...], and a per-slot row mask that keeps row i's own columns. Each adapter's
  weights are read once per step for the whole batch, not once per row, and a row reads no
  other weights than its adapter's and the base's; the only extra work is the zero columns'
  multiply-adds (rank x rows, small beside the base). Rows all on one adapter bind it as one
  call does; rows all on the base run the slot-free base path.
- A newcomer's prompt runs alone (batch 1) over its own row of the buffer, in chunks the
  scheduler interleaves with the others' decode steps (runtime/scheduler.py).

What does not batch here, and runs as one call on its own (Engine falls back): bundles without
row masks (exported before them), adapters with scale or bias slots (DoRA, IA3, bias tuning:
their scales multiply whole outputs, which no row mask can separate), prompt-learning adapters
(their virtual tokens), LongRoPE bases (one rotary table per step for all rows) and devices other
than the CPU (the buffer is host memory).
"""

from __future__ import annotations

import numpy as np

from edgepeft.errors import EngineError
from edgepeft.runtime_contract import (ADAPTERS_ACTIVE, ATTENTION_MASK, INPUT_IDS, LOGITS, LOGITS_TO_KEEP,
                                       kv_names, row_mask, slot_family, slot_inputs)

POSITION_STEP = 64  # the buffer's positions grow in steps of this many


class _Row:
    """One row of the batch: its adapter, its place in the buffer and its cached length."""

    def __init__(self, handle, budget: int, index: int):
        self.handle, self.budget, self.index, self.length = handle, budget, index, 0


class OnnxBatcher:
    """The rows of one scheduler (runtime/scheduler.py) on an OnnxBackend. Used from one thread."""

    def __init__(self, backend):
        self.b = backend
        self.rows: list[_Row] = []
        self.kv: list[np.ndarray] = []  # per layer: key, value [capacity, kv_heads, positions, head_dim]
        self.capacity = self.positions = 0
        self._decode = None  # (key, IOBinding, logits array) of the last decode step's layout
        self._combined: dict = {}  # adapters (by id) -> their slots side by side, a few kept

    # ---- what joins ------------------------------------------------------------------------------
    def can_batch(self, handle) -> bool:
        """Whether a row on `handle` (an OnnxAdapter, a combination, or None) can join a batch."""
        if handle is None:
            return True
        if handle.prefix:
            return False
        return all(slot_family(self.b.slot_of[name][1]) == "lora" for name in handle.params)

    def open_row(self, handle, budget: int) -> _Row:
        """A row for at most `budget` cache positions, on `handle`."""
        if budget > self.b.context_length:
            raise EngineError(f"{budget} tokens exceed the bundle's context length {self.b.context_length}")
        n = len(self.rows)
        self._grow(n + 1, budget)
        row = _Row(handle, budget, n)
        self.rows.append(row)
        self._decode = None
        return row

    def close_row(self, row: _Row) -> None:
        """Free `row`: the last row moves into its place (its cache copied), or, when it was the
        last row of all, the whole buffer is freed."""
        i, last = row.index, len(self.rows) - 1
        if self.rows[i] is not row:
            return  # closed already
        if i != last:
            moved = self.rows[last]
            for buf in self.kv:
                buf[i, :, : moved.length] = buf[last, :, : moved.length]
            moved.index, self.rows[i] = i, moved
        self.rows.pop()
        row.index = -1
        self._decode = None
        if not self.rows:
            self.close()

    def close(self) -> None:
        self.rows, self.kv, self._decode, self._combined = [], [], None, {}
        self.capacity = self.positions = 0

    def _grow(self, rows: int, budget: int) -> None:
        """Make the buffer hold `rows` rows of at least `budget` positions (copying what is
        cached): rows double, positions round up to POSITION_STEP within the context length."""
        if rows <= self.capacity and budget <= self.positions:
            return
        b = self.b
        capacity = max(rows, min(2 * self.capacity, rows + 8)) if rows > self.capacity else self.capacity
        positions = max(self.positions, min(-(-budget // POSITION_STEP) * POSITION_STEP, b.context_length))
        shape = (capacity, b.kv_heads, positions, b.head_dim)
        new = [np.zeros(shape, b.dtype) for _ in range(2 * b.num_layers)]
        for old, buf in zip(self.kv, new):
            for row in self.rows:
                buf[row.index, :, : row.length] = old[row.index, :, : row.length]
        self.kv, self.capacity, self.positions, self._decode = new, capacity, positions, None

    # ---- running -----------------------------------------------------------------------------------
    def prefill(self, row: _Row, ids: list[int]) -> np.ndarray:
        """Run `ids` after `row`'s cached tokens, alone, over its row of the buffer; return the
        last position's logits (float32 [vocab])."""
        b, ort, n = self.b, self.b.ort, len(ids)
        if row.length + n > row.budget:
            raise EngineError(f"sequence of {row.length + n} tokens exceeds the buffer of {row.budget}")
        io = b.session.io_binding()
        if row.handle is not None:
            b.bind_adapter(io, row.handle)
        self._bind_kv(io, row.index, row.index + 1)
        io.bind_cpu_input(INPUT_IDS, np.asarray(ids, np.int64).reshape(1, n))
        io.bind_cpu_input(ATTENTION_MASK, np.ones((1, row.length + n), np.int64))
        kept = 1 if b.keeps_logits else n
        if b.keeps_logits:
            io.bind_ortvalue_input(LOGITS_TO_KEEP, b._keep[1])
        logits = np.empty((1, kept, b.vocab_size), b.dtype)
        io.bind_ortvalue_output(LOGITS, ort.OrtValue.ortvalue_from_numpy(logits))
        with b.step_lock:
            b.session.run_with_iobinding(io)
        row.length += n
        return logits[0, -1].astype(np.float32)

    def step(self, rows: list[_Row], tokens: list[int]) -> np.ndarray:
        """One token for each of `rows`, in one forward pass; float32 logits [len(rows), vocab]
        (a view the next step overwrites). Rows of the buffer not in `rows` (a newcomer whose
        prompt is still running) ride along with a placeholder token at their next position,
        which their next prompt chunk overwrites; their logits are dropped."""
        for row in rows:
            if row.length + 1 > row.budget:
                raise EngineError(f"sequence of {row.length + 1} tokens exceeds the buffer of {row.budget}")
        m = max(r.index for r in rows) + 1
        stepped = {r.index for r in rows}
        handles = tuple(self.rows[i].handle if i in stepped else None for i in range(m))
        key = (m, tuple(map(id, handles)))
        if self._decode is None or self._decode[0] != key:
            self._decode = (key, *self._decode_binding(m, handles))
        _, io, logits, _ = self._decode
        ids = np.zeros((m, 1), np.int64)
        for row, token in zip(rows, tokens):
            ids[row.index, 0] = token
        lengths = np.array([r.length + 1 for r in self.rows[:m]])
        io.bind_cpu_input(INPUT_IDS, ids)
        io.bind_cpu_input(ATTENTION_MASK, (np.arange(lengths.max()) < lengths[:, None]).astype(np.int64))
        with self.b.step_lock:
            self.b.session.run_with_iobinding(io)
        for row in rows:
            row.length += 1
        return logits[[r.index for r in rows], 0].astype(np.float32, copy=False)

    def _bind_kv(self, io, start: int, stop: int) -> None:
        """Bind rows start..stop-1 of every layer's buffer as past and present (zero-copy views)."""
        ort = self.b.ort
        for i in range(self.b.num_layers):
            past_key, past_value, present_key, present_value = kv_names(i)
            for buf, past, present in ((self.kv[2 * i], past_key, present_key),
                                       (self.kv[2 * i + 1], past_value, present_value)):
                v = ort.OrtValue.ortvalue_from_numpy(buf[start:stop])
                io.bind_ortvalue_input(past, v)
                io.bind_ortvalue_output(present, v)

    def _decode_binding(self, m: int, handles: tuple):
        """The IOBinding of a decode step over rows 0..m-1 on `handles` (None: the base), and
        the logits array it writes."""
        b, ort = self.b, self.b.ort
        io = b.session.io_binding()
        self._bind_kv(io, 0, m)
        distinct = list({id(h): h for h in handles if h is not None}.values())
        keep: list = []  # arrays the bound OrtValues read (CPU OrtValues do not own them)
        if len(distinct) == 1 and None not in handles:
            b.bind_adapter(io, distinct[0])  # every row on one adapter: as one call binds it
        elif distinct:
            inputs, keep = self._side_by_side(distinct, handles)
            for name, value in inputs.items():
                io.bind_ortvalue_input(name, value)
            if b.base_path:
                io.bind_ortvalue_input(ADAPTERS_ACTIVE, b._active)
        if b.keeps_logits:
            io.bind_ortvalue_input(LOGITS_TO_KEEP, b._keep[1])
        logits = np.empty((m, 1, b.vocab_size), b.dtype)
        io.bind_ortvalue_output(LOGITS, ort.OrtValue.ortvalue_from_numpy(logits))
        return io, logits, keep

    def _side_by_side(self, adapters: list, handles: tuple) -> dict:
        """Slot inputs for rows on several adapters: each slot's A and B with the adapters' ranks
        side by side (as combine() does for adapters active together), and its row mask."""
        key = tuple(map(id, adapters))
        cached = self._combined.get(key)
        if cached is None or any(a is not h for a, h in zip(cached[0], adapters)):
            cached = (tuple(adapters), self._concatenate(adapters))
            self._combined[key] = cached
            while len(self._combined) > 4:
                self._combined.pop(next(iter(self._combined)))
        ort, dtype = self.b.ort, self.b.dtype
        out, keep = {}, [cached]
        for module, (a_name, b_name, a, bm, ranks, arrays) in cached[1].items():
            mask = np.zeros((len(handles), sum(ranks)), dtype)
            start = 0
            for adapter, rank in zip(adapters, ranks):
                rows = [i for i, h in enumerate(handles) if h is adapter]
                mask[rows, start: start + rank] = 1
                start += rank
            mask = mask.reshape(len(handles), *([1] * (arrays[0].ndim - 1)), -1)  # [rows, 1, r] or [rows, 1, 1, r]
            out[a_name], out[b_name] = a, bm
            out[row_mask(module)] = ort.OrtValue.ortvalue_from_numpy(mask)
            keep.append(mask)
        return out, keep

    def _concatenate(self, adapters: list) -> dict:
        """{module: (A name, B name, A OrtValue, B OrtValue, per-adapter ranks)} for every slot any
        of `adapters` sets; an adapter without that slot takes rank 0 there."""
        slots: dict = {}
        for adapter in adapters:
            for name in adapter.params:
                module, role = self.b.slot_of[name]
                if role == "A":
                    slots[module] = slot_inputs(module)
        ort, out = self.b.ort, {}
        for module, names in slots.items():
            a_parts, b_parts, ranks = [], [], []
            for adapter in adapters:
                if names["A"] in adapter.params:
                    a_parts.append(adapter.params[names["A"]].numpy())
                    b_parts.append(adapter.params[names["B"]].numpy())
                    ranks.append(a_parts[-1].shape[-1])
                else:
                    ranks.append(0)
            a = np.ascontiguousarray(np.concatenate(a_parts, axis=-1))
            bm = np.ascontiguousarray(np.concatenate(b_parts, axis=-2))
            # The arrays stay with their OrtValues: on the CPU an OrtValue reads the array's memory.
            out[module] = (names["A"], names["B"], ort.OrtValue.ortvalue_from_numpy(a),
                           ort.OrtValue.ortvalue_from_numpy(bm), ranks, (a, bm))
        return out
