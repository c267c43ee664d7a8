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
from edgepeft.runtime.devices import pick_gguf

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
        with self._model_lock:
            self.llama_cpp.llama_adapter_lora_free(adapter.handle)

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

    def close(self) -> None:
        llama_cpp = self.llama_cpp
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
