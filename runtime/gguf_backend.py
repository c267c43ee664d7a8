"""GGUF backend over llama-cpp-python's low-level API.

Ownership, llama.h style: the backend owns one `llama_model` (weights, loaded once) and a small
pool of `llama_context`s (each its own KV cache), freed in `close()`. A call takes a context from
the pool for its whole duration, so concurrent calls run side by side instead of waiting for one
another's streams; the pool grows on demand up to `parallel` contexts (llama.cpp server's
`--parallel`), and a call waits only when all of them are busy. Each context is created only when
concurrency needs it, so one caller at a time costs one KV cache.

Each loaded adapter is a `llama_adapter_lora` handle initialised once from its file
(`llama_adapter_lora_init`) and owned by the model; it is freed on unload, after every context
that applies it has let go of it. A call selects its adapter on its context with
`llama_set_adapters_lora` (with scale), clears that context's KV cache and decodes. Switching
adapters changes which handles the context applies; no weight is copied.

Batching (`batcher()`, for the engine's continuous-batching scheduler): llama.cpp applies LoRA
adapters per context, never per token, so what one `llama_decode` can batch is the rows that share
an adapter set (the same adapters, or none, or the same combination). Such rows live as separate
sequence ids (one per row) in one multi-sequence context and decode together, one token each,
in one `llama_decode`. Rows with different adapter sets are in different contexts and are
interleaved: one `llama_decode` per adapter set per step. Mixing adapters inside one
`llama_decode` is not possible on this backend.

The batcher's contexts are its own (not the pool's), made when a row first needs one: each holds
up to `parallel` sequences in one unified KV cache of context_length cells (the same size as a
pool context), and a row reserves its budget (prompt + generated positions) of those cells, so
rows on one adapter set share one cache as long as their budgets fit it; a row that does not fit
opens another context for the same set. At most `parallel` batcher contexts exist at once (with
the scheduler's at most `parallel` rows, a row always finds one). llama.cpp allocates a context's
cache when it is made, so rows on k different adapter sets hold k caches, each sized for the
context, not for the rows' lengths; --max-context bounds each. A context whose rows have all
ended stays, idle, for the next row (of any adapter set: its adapters are switched), until the
batcher closes (the scheduler closes its batcher when it has been idle for a while).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgepeft.bundle import Bundle
from edgepeft.errors import AdapterError, BundleError, EngineError, require
from edgepeft.llama_log import quiet_llama_cpp

from .gguf_check import check_adapter_gguf, check_base_gguf
from edgepeft.runtime.devices import llama_cpp_problem, pick_gguf

BATCH = 512  # tokens per llama_decode; longer inputs are decoded in chunks
PARALLEL = 4  # default bound on contexts (concurrent calls); each costs a KV cache when created


@dataclass
class GgufAdapter:
    path: Path
    handle: object  # llama_adapter_lora_p
    scale: float = 1.0
    freed: bool = False  # set under the context lock; a call never applies a freed handle


@dataclass(frozen=True)
class GgufCombo:
    """Several adapters applied together (each with its own scale)."""

    parts: tuple

    @property
    def path(self) -> Path:
        return Path("+".join(a.path.name for a in self.parts))


class GgufBackend:
    name = "gguf"

    def __init__(self, bundle: Bundle, device: str = "auto", threads: int | None = None,
                 n_gpu_layers: int | None = None, context_length: int | None = None,
                 parallel: int | None = None):
        broken = llama_cpp_problem()
        if broken:
            raise EngineError(broken)
        llama_cpp = require("llama_cpp", "gguf")
        self.llama_cpp = llama_cpp
        info = bundle.backends.get("gguf")
        if info is None:
            raise BundleError(f"{bundle.root}: has no GGUF base (export with --format gguf)")
        quiet_llama_cpp(llama_cpp)
        path = bundle.file(info["model"])
        # Checked in Python before llama.cpp parses anything (see gguf_check).
        self.fingerprint = bundle.fingerprint
        self.arch, self.base_shapes = check_base_gguf(path, bundle.base)
        choice = pick_gguf(bool(llama_cpp.llama_supports_gpu_offload()), device, n_gpu_layers)
        n_gpu_layers, self.device_note = choice.gpu_layers, choice.note
        self.device = choice.device
        self.providers = [f"llama.cpp ({'GPU offload %d layers' % n_gpu_layers if n_gpu_layers else 'CPU'})"]
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise BundleError(f"{path}: llama.cpp cannot load it (corrupt or unsupported GGUF)")
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        # llama.cpp allocates the whole KV cache up front: default to at most 4096 tokens;
        # context_length (--max-context) bounds it further.
        self.context_length = min(int(info["context_length"]), int(context_length or 4096))
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = self.context_length
        # llama.cpp reserves logits for n_batch rows: keep it small and decode long inputs in chunks.
        cparams.n_batch = cparams.n_ubatch = min(BATCH, self.context_length)
        n_threads = threads or max(1, os.cpu_count() or 1)
        cparams.n_threads = cparams.n_threads_batch = n_threads
        if info.get("quant") == "F32":
            # An F32 base asks for full precision: llama.cpp's defaults (F16 KV cache, flash
            # attention rounding Q to F16) would cost ~1e-3 of the logit range, more under a
            # strong adapter. Quantized bases keep llama.cpp's defaults (speed, as llama-cli).
            cparams.type_k = cparams.type_v = 0  # GGML_TYPE_F32
            cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self._cparams, self._path = cparams, path
        self.parallel = int(parallel or PARALLEL)
        self._model_lock = threading.Lock()  # adapter init/free on the model
        self._pool = threading.Condition()
        self._contexts: list[_Context] = []  # every context made, in use or free
        self._idle: list[_Context] = []
        self._making = 0  # contexts being created outside the pool lock
        # One decode at a time across contexts when two decodes' threads would not fit the cores
        # (or on a GPU): each llama_decode already uses its threads, and overlapping ones only
        # fight over the cores. Held per step, never across a call's tokens.
        fits = not n_gpu_layers and 2 * n_threads <= (os.cpu_count() or 1)
        self._step_lock = contextlib.nullcontext() if fits else threading.Lock()
        # Batchers (continuous batching) and the adapters freed while a batcher row still applies
        # them (see free_adapter); both under _batch_lock.
        self._batch_lock = threading.RLock()
        self._batchers: list[_GgufBatcher] = []
        self._deferred: list[GgufAdapter] = []
        # One context up front: a base that cannot get one fails at open, not at the first call.
        self._idle.append(self._new_context())

    def _new_context(self) -> "_Context":
        llama_cpp = self.llama_cpp
        ctx = llama_cpp.llama_init_from_model(self.model, self._cparams)
        if not ctx:
            if not self._contexts:
                llama_cpp.llama_model_free(self.model)
                self.model = None
            raise EngineError(f"{self._path}: llama.cpp could not create a context of {self.context_length} tokens")
        c = _Context(ctx, llama_cpp.llama_batch_init(min(BATCH, self.context_length), 0, 1))
        with self._pool:
            self._contexts.append(c)
        return c

    def _acquire(self) -> "_Context":
        """A free context, a new one while fewer than `parallel` exist, or wait for one."""
        with self._pool:
            while not self._idle and len(self._contexts) + self._making >= self.parallel:
                self._pool.wait()
            if self._idle:
                c = self._idle.pop()
                c.lock.acquire()
                return c
            self._making += 1
        try:
            c = self._new_context()
        finally:
            with self._pool:
                self._making -= 1
                self._pool.notify()
        c.lock.acquire()
        return c

    def _release(self, c: "_Context") -> None:
        c.lock.release()
        with self._pool:
            self._idle.append(c)
            self._pool.notify()

    # ---- adapters ------------------------------------------------------------------------------
    def load_adapter(self, path: Path) -> GgufAdapter:
        path = Path(path)
        if not path.is_file():
            raise AdapterError(f"{path}: adapter file not found")
        check_adapter_gguf(path, self.arch, self.fingerprint, self.base_shapes)
        with self._model_lock:
            handle = self.llama_cpp.llama_adapter_lora_init(self.model, str(path).encode())
        if not handle:
            raise AdapterError(f"{path}: llama.cpp refused it (not a LoRA GGUF for this base's architecture and shapes)")
        return GgufAdapter(path, handle)

    def combine(self, adapters: list[GgufAdapter], names: list[str]) -> "GgufCombo":
        """Several LoRA adapters active together: llama.cpp applies a list of adapters natively."""
        return GgufCombo(tuple(adapters))

    def free_adapter(self, adapter: GgufAdapter) -> None:
        # Marked first, so that no call starts applying it; then every context that applies it
        # drops it, each once the call on it (if any) has ended; then llama.cpp frees it.
        adapter.freed = True
        with self._pool:
            contexts = list(self._contexts)
        for c in contexts:
            with c.lock:
                if any(a is adapter for a in c.active):
                    self._set_adapter(c, None)
        # Batcher contexts: idle ones drop it now; one whose rows still apply it keeps it until
        # its last row closes (a row keeps the adapter it started with, as a call does), and only
        # then is the handle freed (_free_deferred). Never freed while a live context applies it.
        with self._batch_lock:
            if any(a is adapter for a in self._deferred):
                return  # already freed once, waiting for rows
            in_use = False
            for b in list(self._batchers):
                in_use |= b._drop_adapter(adapter)
            if in_use:
                self._deferred.append(adapter)
                return
        with self._model_lock:
            self.llama_cpp.llama_adapter_lora_free(adapter.handle)

    def _free_deferred(self) -> None:
        """Free the deferred adapters that no batcher context applies any more."""
        with self._batch_lock:
            done = [a for a in self._deferred if not any(b._applies(a) for b in self._batchers)]
            self._deferred = [a for a in self._deferred if not any(a is d for d in done)]
        for a in done:
            with self._model_lock:
                self.llama_cpp.llama_adapter_lora_free(a.handle)

    def _set_adapter(self, c: "_Context", adapter: "GgufAdapter | GgufCombo | None") -> None:
        """Make `adapter` (or none, or a combination) context `c`'s LoRA set. Caller holds c.lock."""
        key = () if adapter is None else adapter.parts if isinstance(adapter, GgufCombo) else (adapter,)
        for a in key:
            if a.freed:
                raise BundleError(f"adapter {a.path.name} was unloaded while this call waited for it")
        if key == c.active:
            return
        llama_cpp = self.llama_cpp
        if not key:
            rc = llama_cpp.llama_set_adapters_lora(c.ctx, None, 0, None)
        else:
            handles = (llama_cpp.llama_adapter_lora_p_ctypes * len(key))(*[a.handle for a in key])
            scales = (ctypes.c_float * len(key))(*[a.scale for a in key])
            rc = llama_cpp.llama_set_adapters_lora(c.ctx, handles, len(key), scales)
        if rc != 0:
            raise EngineError(f"llama.cpp could not apply adapter {adapter.path if adapter else ''} (code {rc})")
        c.active = key

    def switch_to(self, adapter: GgufAdapter | None) -> None:
        """Select `adapter` on a context (what each call does first); measured by demo/bench."""
        c = self._acquire()
        try:
            self._set_adapter(c, adapter)
        finally:
            self._release(c)

    # ---- running -------------------------------------------------------------------------------
    def sequence(self, adapter: GgufAdapter | None, max_len: int) -> "_GgufSequence":
        if max_len > self.context_length:
            raise EngineError(f"{max_len} tokens exceed the GGUF context length {self.context_length}")
        return _GgufSequence(self, adapter, max_len)

    def batcher(self) -> "_GgufBatcher":
        """A multi-sequence batcher (continuous batching; see the module docstring)."""
        if not getattr(self, "model", None):
            raise EngineError("the GGUF backend is closed")
        b = _GgufBatcher(self)
        with self._batch_lock:
            self._batchers.append(b)
        return b

    def close(self) -> None:
        llama_cpp = self.llama_cpp
        for b in list(getattr(self, "_batchers", [])):
            b.close()
        for c in getattr(self, "_contexts", []):
            if c.ctx:
                llama_cpp.llama_batch_free(c.batch)
                llama_cpp.llama_free(c.ctx)
                c.ctx = None
        self._contexts, self._idle = [], []
        if getattr(self, "model", None):
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


@dataclass(eq=False)
class _Context:
    """One llama_context of the pool: its KV cache, its batch, the LoRA set it applies."""

    ctx: object
    batch: object
    active: tuple = ()
    lock: threading.Lock = field(default_factory=threading.Lock)  # held by the call using it


class _GgufSequence:
    """One call on a context of the pool: holds it from enter to exit."""

    def __init__(self, backend: GgufBackend, adapter: GgufAdapter | None, max_len: int):
        self.backend, self.adapter, self.max_len, self.length = backend, adapter, max_len, 0
        self.c: _Context | None = None

    def __enter__(self):
        b = self.backend
        c = b._acquire()
        try:
            b._set_adapter(c, self.adapter)
            b.llama_cpp.llama_memory_clear(b.llama_cpp.llama_get_memory(c.ctx), True)
        except BaseException:
            b._release(c)
            raise
        self.c = c
        return self

    def __exit__(self, *exc):
        c, self.c = self.c, None
        if c is not None:
            self.backend._release(c)

    def forward(self, ids, all_logits: bool = False) -> np.ndarray:
        """Decode `ids` after what is cached; logits [len(ids) or 1, vocab]."""
        n = len(ids)
        if n == 0:
            raise EngineError("empty input: nothing to run")
        if self.length + n > self.max_len:
            raise EngineError(f"sequence of {self.length + n} tokens exceeds the buffer of {self.max_len}")
        chunks = [ids[i : i + BATCH] for i in range(0, n, BATCH)]
        rows = [self._decode(c, all_logits or i == len(chunks) - 1, all_logits) for i, c in enumerate(chunks)]
        return np.concatenate([r for r in rows if r is not None]) if all_logits else rows[-1]

    def _decode(self, ids, want_logits: bool, all_rows: bool) -> np.ndarray | None:
        b, llama_cpp, c = self.backend, self.backend.llama_cpp, self.c
        if c is None:
            raise EngineError("this sequence has ended")
        n = len(ids)
        batch = c.batch
        batch.n_tokens = n
        for i, tok in enumerate(ids):
            batch.token[i] = int(tok)
            batch.pos[i] = self.length + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = all_rows or (want_logits and i == n - 1)
        with b._step_lock:
            rc = llama_cpp.llama_decode(c.ctx, batch)
        if rc != 0:
            raise EngineError(f"llama.cpp decode failed (code {rc})")
        self.length += n
        if not want_logits:
            return None
        rows = n if all_rows else 1
        ptr = llama_cpp.llama_get_logits(c.ctx)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(rows, b.n_vocab)).copy()


def _adapter_key(handle) -> tuple:
    """The adapters a handle applies: () for none, one, or a combination's parts."""
    return () if handle is None else handle.parts if isinstance(handle, GgufCombo) else (handle,)


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


@dataclass(eq=False)
class _BatchContext:
    """One multi-sequence context of a batcher: its rows share its adapter set (`c.active`)."""

    c: _Context
    cells: int  # KV cells (shared by its sequences: unified cache)
    n_batch: int  # most tokens per llama_decode
    free_seqs: list  # sequence ids not held by a row
    rows: list = field(default_factory=list)
    reserved: int = 0  # sum of its rows' budgets (<= cells)


@dataclass(eq=False)
class _GgufRow:
    """One row of a batch: a sequence id in a batcher context, `length` positions cached."""

    bc: _BatchContext | None
    seq: int
    budget: int
    handle: object
    length: int = 0


class _GgufBatcher:
    """Continuous batching on GGUF: rows sharing an adapter set decode in one llama_decode (one
    sequence id per row); different adapter sets are interleaved, one llama_decode per set per step.

    Called from one thread (the scheduler's). The backend's `_batch_lock` guards the contexts and
    rows, since `free_adapter` (any thread) looks at them; decodes hold the backend's step lock."""

    def __init__(self, backend: GgufBackend):
        self.backend = backend
        self.closed = False
        self._contexts: list[_BatchContext] = []
        b = backend
        # KV memory choice: a unified cache per context of context_length cells, shared by up to
        # `parallel` sequences: always room for one full-length row, and for several typical
        # rows (budget = prompt + max new tokens) on one adapter set.
        self._cells = b.context_length
        self._max_contexts = b.parallel

    # ---- rows ----------------------------------------------------------------------------------
    def can_batch(self, handle) -> bool:
        return True  # every adapter kind on GGUF is a LoRA set applied per context

    def open_row(self, handle, budget: int) -> _GgufRow:
        b = self.backend
        budget = int(budget)
        if self.closed:
            raise EngineError("this batcher is closed")
        if budget < 1:
            raise EngineError(f"a row needs a budget of at least 1 position, not {budget}")
        if budget > b.context_length:
            raise EngineError(f"{budget} tokens exceed the GGUF context length {b.context_length}")
        key = _adapter_key(handle)
        with b._batch_lock:
            for a in key:  # under the lock: free_adapter marks first, then looks at our contexts
                if a.freed:
                    raise EngineError(f"adapter {a.path.name} was unloaded before this row started")
            bc = self._place(key, budget)
            if not bc.rows:
                b._set_adapter(bc.c, handle)
                b.llama_cpp.llama_memory_clear(b.llama_cpp.llama_get_memory(bc.c.ctx), True)
            row = _GgufRow(bc, bc.free_seqs.pop(0), budget, handle)
            bc.rows.append(row)
            bc.reserved += budget
        return row

    def _place(self, key: tuple, budget: int) -> _BatchContext:
        """A context for a row of `budget` with adapter set `key`; caller holds _batch_lock."""
        def fits(bc):
            return bool(bc.free_seqs) and bc.reserved + budget <= bc.cells

        live = [bc for bc in self._contexts if bc.rows]
        idle = [bc for bc in self._contexts if not bc.rows]
        for bc in live:  # same set, room left: batch with it
            if _same(bc.c.active, key) and fits(bc):
                return bc
        for bc in idle:  # an idle one already applying the set: no switch
            if _same(bc.c.active, key):
                return bc
        if idle:
            return idle[0]
        if len(self._contexts) >= self._max_contexts:
            raise EngineError(f"the batch is full: {len(self._contexts)} GGUF batch contexts are in use")
        bc = self._new_context()
        self._contexts.append(bc)
        return bc

    def _new_context(self) -> _BatchContext:
        b, llama_cpp = self.backend, self.backend.llama_cpp
        # The backend's parameters (threads, F32 KV and no flash attention for F32 bases, ...),
        # copied field by field (a ctypes struct), with the cache sized for several sequences.
        p = type(b._cparams).from_buffer_copy(b._cparams)
        p.n_seq_max = b.parallel
        p.n_ctx = self._cells
        p.kv_unified = True
        p.n_batch = p.n_ubatch = max(min(BATCH, self._cells), b.parallel)
        ctx = llama_cpp.llama_init_from_model(b.model, p)
        if not ctx:
            raise EngineError(f"{b._path}: llama.cpp could not create a batch context of {self._cells} tokens"
                              f" for {b.parallel} sequences")
        cells = min(self._cells, int(llama_cpp.llama_n_ctx(ctx)))
        c = _Context(ctx, llama_cpp.llama_batch_init(p.n_batch, 0, 1))
        return _BatchContext(c, cells, int(p.n_batch), list(range(b.parallel)))

    def close_row(self, row: _GgufRow) -> None:
        b = self.backend
        with b._batch_lock:
            bc, row.bc = row.bc, None
            if bc is None or bc not in self._contexts:
                return  # closed already (or the batcher closed)
            llama_cpp = b.llama_cpp
            llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(bc.c.ctx), row.seq, -1, -1)
            bc.rows.remove(row)
            bc.reserved -= row.budget
            bc.free_seqs.append(row.seq)
            bc.free_seqs.sort()
            # Its last row gone, the context is idle (reused by the next row of any set); an
            # adapter freed while the rows ran is dropped from it now and freed.
            drop = not bc.rows and any(a.freed for a in bc.c.active)
            if drop:
                b._set_adapter(bc.c, None)
        if drop:
            b._free_deferred()

    # ---- decoding ------------------------------------------------------------------------------
    def _check(self, row: _GgufRow, n: int) -> _BatchContext:
        if self.closed or row.bc is None:
            raise EngineError("this row has ended")
        if row.length + n > row.budget:
            raise EngineError(f"row of {row.length + n} tokens exceeds its budget of {row.budget}")
        return row.bc

    def _decode(self, bc: _BatchContext, entries: list) -> None:
        """One llama_decode of `entries` [(token, pos, seq, want_logits)] on context `bc`."""
        b, llama_cpp = self.backend, self.backend.llama_cpp
        batch = bc.c.batch
        batch.n_tokens = len(entries)
        for i, (tok, pos, seq, want) in enumerate(entries):
            batch.token[i] = int(tok)
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = bool(want)
        with b._step_lock:
            rc = llama_cpp.llama_decode(bc.c.ctx, batch)
        if rc != 0:
            raise EngineError(f"llama.cpp batch decode failed (code {rc})")

    def _logits(self, bc: _BatchContext, i: int) -> np.ndarray:
        b = self.backend
        ptr = b.llama_cpp.llama_get_logits_ith(bc.c.ctx, i)
        if not ptr:
            raise EngineError(f"llama.cpp returned no logits for batch token {i}")
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(b.n_vocab,)).copy()

    def prefill(self, row: _GgufRow, ids) -> np.ndarray:
        ids = [int(t) for t in ids]
        if not ids:
            raise EngineError("empty input: nothing to run")
        bc = self._check(row, len(ids))
        out = None
        for start in range(0, len(ids), bc.n_batch):
            chunk = ids[start : start + bc.n_batch]
            last = start + len(chunk) == len(ids)
            self._decode(bc, [(t, row.length + j, row.seq, last and j == len(chunk) - 1)
                              for j, t in enumerate(chunk)])
            row.length += len(chunk)
            if last:
                out = self._logits(bc, len(chunk) - 1)
        return out

    def step(self, rows: list, tokens: list) -> np.ndarray:
        if len(rows) != len(tokens):
            raise EngineError(f"{len(rows)} rows but {len(tokens)} tokens")
        if len({id(r) for r in rows}) != len(rows):
            raise EngineError("a row appears twice in one step")
        groups: dict[int, tuple[_BatchContext, list]] = {}  # one llama_decode per context
        for i, row in enumerate(rows):
            bc = self._check(row, 1)
            groups.setdefault(id(bc), (bc, []))[1].append(i)
        out = np.empty((len(rows), self.backend.n_vocab), dtype=np.float32)
        for bc, idx in groups.values():
            self._decode(bc, [(tokens[i], rows[i].length, rows[i].seq, True) for i in idx])
            for j, i in enumerate(idx):
                out[i] = self._logits(bc, j)
                rows[i].length += 1
        return out

    # ---- adapters and teardown -----------------------------------------------------------------
    def _applies(self, adapter: GgufAdapter) -> bool:
        return any(any(a is adapter for a in bc.c.active) for bc in self._contexts)

    def _drop_adapter(self, adapter: GgufAdapter) -> bool:
        """free_adapter's part (caller holds _batch_lock): idle contexts stop applying `adapter`;
        True if a context with live rows still applies it (then it is freed after they end)."""
        in_use = False
        for bc in self._contexts:
            if any(a is adapter for a in bc.c.active):
                if bc.rows:
                    in_use = True
                else:
                    self.backend._set_adapter(bc.c, None)
        return in_use

    def close(self) -> None:
        b, llama_cpp = self.backend, self.backend.llama_cpp
        with b._batch_lock:
            if self.closed:
                return
            self.closed = True
            contexts, self._contexts = self._contexts, []
            for bc in contexts:
                for row in bc.rows:
                    row.bc = None
                bc.rows = []
                if bc.c.ctx:
                    llama_cpp.llama_batch_free(bc.c.batch)
                    llama_cpp.llama_free(bc.c.ctx)
                    bc.c.ctx = None
                bc.c.active = ()
            b._batchers = [x for x in b._batchers if x is not self]
        b._free_deferred()
