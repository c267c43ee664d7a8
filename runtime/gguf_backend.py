"""GGUF backend over llama-cpp-python's low-level API.

Ownership, llama.h style: the backend owns one `llama_model` (weights, loaded once), its adapters
and every `llama_context` made on it (runtime/gguf_context.py), all freed in `close()`. A
sequence holds a context of a small pool for its whole life, so concurrent calls run side by side
instead of waiting for one another's streams; the pool grows on demand up to `parallel` contexts
(llama.cpp server's `--parallel`), each only when concurrency needs it, so one caller at a time
costs one KV cache. Switching adapters changes which handles a context applies
(`llama_set_adapters_lora`, with scales); no weight is copied. The batcher (runtime/gguf_batch.py)
makes its own multi-sequence contexts.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import numpy as np

from edgepeft.bundle import Bundle
from edgepeft.errors import AdapterError, BundleError, EngineError, require
from edgepeft.llama_log import quiet_llama_cpp
from edgepeft.runtime.devices import pick_gguf
from edgepeft.native_check import llama_cpp_problem, skip_amx_buffers

from .backend import Backend, SequenceState
from .gguf_check import check_adapter_gguf, check_base_gguf
from .gguf_context import GgufAdapter, GgufCombo, GgufContext, LoraSets

BATCH = 512  # tokens per llama_decode; longer inputs are decoded in chunks
PARALLEL = 4  # default bound on contexts (concurrent calls); each costs a KV cache when created


class GgufBackend(Backend):
    name = "gguf"

    def __init__(self, bundle: Bundle, device: str = "auto", threads: int | None = None,
                 n_gpu_layers: int | None = None, context_length: int | None = None,
                 parallel: int | None = None):
        self.model, self.loras, self._idle = None, None, []  # what close() frees, set before anything can fail
        broken = llama_cpp_problem()
        if broken:
            raise EngineError(broken)
        llama_cpp = self.llama_cpp = require("llama_cpp", "gguf")
        info = bundle.backends.get("gguf")
        if info is None:
            raise BundleError(f"{bundle.root}: has no GGUF base (export with --format gguf)")
        quiet_llama_cpp(llama_cpp)
        skip_amx_buffers(llama_cpp)
        path = self.path = bundle.file(info["model"])
        # Checked in Python before llama.cpp parses anything (see gguf_check).
        self.fingerprint = bundle.fingerprint
        self.arch, self.base_shapes = check_base_gguf(path, bundle.base)
        choice = pick_gguf(bool(llama_cpp.llama_supports_gpu_offload()), device, n_gpu_layers)
        n_gpu_layers, self.device_note, self.device = choice.gpu_layers, choice.note, choice.device
        self.providers = [f"llama.cpp ({'GPU offload %d layers' % n_gpu_layers if n_gpu_layers else 'CPU'})"]
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise BundleError(f"{path}: llama.cpp cannot load it (corrupt or unsupported GGUF)")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        # A hybrid (LFM2's convolutions, Qwen3.5's DeltaNets) or recurrent memory cannot drop a sequence's last
        # positions (llama_memory_seq_rm fails on part of a sequence): its sequences reset whole.
        self.recurrent = bool(llama_cpp.llama_model_is_recurrent(self.model)
                              or llama_cpp.llama_model_is_hybrid(self.model))
        # llama.cpp allocates a context's whole KV cache up front: at most 4096 positions by default.
        self.context_length = min(int(info["context_length"]), int(context_length or 4096))
        cparams = self.cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = self.context_length
        # llama.cpp reserves logits for n_batch rows: keep it small and decode long inputs in chunks.
        cparams.n_batch = cparams.n_ubatch = min(BATCH, self.context_length)
        n_threads = threads or max(1, os.cpu_count() or 1)
        cparams.n_threads = cparams.n_threads_batch = n_threads
        if info.get("quant") == "F32":
            # Full precision for an F32 base: llama.cpp's defaults (F16 KV cache, flash attention
            # rounding Q to F16) add an error a strong adapter makes visible.
            cparams.type_k = cparams.type_v = 0  # GGML_TYPE_F32
            cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.parallel = int(parallel or PARALLEL)
        self.loras = LoraSets(llama_cpp, self.model)
        # One decode at a time across contexts when two decodes' threads would not fit the cores
        # (or on a GPU). Held per step, never across a call's tokens.
        fits = not n_gpu_layers and 2 * n_threads <= (os.cpu_count() or 1)
        self.step_lock = contextlib.nullcontext() if fits else threading.Lock()
        self._pool = threading.Condition()
        self._made = 0  # pool contexts made or being made
        try:  # one context up front: a base that cannot get one fails at open, not at the first call
            self._idle.append(self.new_context())
        except EngineError:
            self.close()
            raise
        self._made = 1

    def new_context(self, sequences: int = 1) -> GgufContext:
        """A context with the backend's parameters for `sequences` sequences sharing one cache of
        context_length cells; owned by the backend (freed in close) until `discard`ed."""
        if not self.model:
            raise EngineError("the GGUF backend is closed")
        p = type(self.cparams).from_buffer_copy(self.cparams)  # a ctypes struct: copied field by field
        if sequences > 1:
            p.n_seq_max, p.kv_unified = sequences, True
            p.n_batch = p.n_ubatch = max(min(BATCH, self.context_length), sequences)
        ctx = self.llama_cpp.llama_init_from_model(self.model, p)
        if not ctx:
            raise EngineError(f"{self.path}: llama.cpp could not create a context of {self.context_length} tokens"
                              + (f" for {sequences} sequences" if sequences > 1 else ""))
        c = GgufContext(self.llama_cpp, ctx, int(p.n_batch), self.n_vocab, self.step_lock, shared=sequences > 1)
        self.loras.add(c)
        return c

    def take_context(self) -> GgufContext:
        """A free pool context, a new one while fewer than `parallel` exist, or wait for one;
        the taker gives it back with `return_context`."""
        with self._pool:
            while not self._idle and self._made >= self.parallel:
                self._pool.wait()
            if self._idle:
                return self._idle.pop()
            self._made += 1
        try:
            return self.new_context()
        except BaseException:
            with self._pool:
                self._made -= 1
                self._pool.notify()
            raise

    def return_context(self, c: GgufContext) -> None:
        """Put `c`, taken with `take_context`, back in the pool for the next sequence."""
        with self._pool:
            self._idle.append(c)
            self._pool.notify()

    # ---- adapters ------------------------------------------------------------------------------
    def load_adapter(self, path: Path) -> GgufAdapter:
        path = Path(path)
        if not path.is_file():
            raise AdapterError(f"{path}: adapter file not found")
        check_adapter_gguf(path, self.arch, self.fingerprint, self.base_shapes)
        return self.loras.load(path)

    def combine(self, adapters: list[GgufAdapter], names: list[str]) -> GgufCombo:
        """llama.cpp applies a list of adapters natively."""
        return GgufCombo(tuple(adapters))

    def free_adapter(self, adapter: GgufAdapter) -> None:
        self.loras.free(adapter)

    def switch_to(self, adapter: GgufAdapter | None) -> None:
        """Select `adapter` on a context, as each call does first."""
        c = self.take_context()
        try:
            self.loras.hold(c, adapter)
            self.loras.release(c)
        finally:
            self.return_context(c)

    # ---- running -------------------------------------------------------------------------------
    def open_sequence(self, adapter: GgufAdapter | None, max_len: int) -> "GgufSequence":
        if max_len > self.context_length:
            raise EngineError(f"{max_len} tokens exceed the GGUF context length {self.context_length}")
        c = self.take_context()
        try:
            self.loras.hold(c, adapter)
        except BaseException:
            self.return_context(c)
            raise
        c.forget()
        return GgufSequence(self, c, max_len)

    def can_batch(self, adapter) -> bool:
        return True  # every adapter kind on GGUF is a LoRA set applied per context

    def batcher(self):
        from .gguf_batch import GgufBatcher

        if not self.model:
            raise EngineError("the GGUF backend is closed")
        return GgufBatcher(self)

    def close(self) -> None:
        loras = self.loras
        for c in list(loras.contexts if loras else []):
            loras.discard(c)
        self._idle = []
        if self.model:
            self.llama_cpp.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class GgufSequence(SequenceState):
    """One sequence on a pool context, held from open to close."""

    def __init__(self, backend: GgufBackend, c: GgufContext, max_len: int):
        self.backend, self.c, self.max_len, self.length = backend, c, max_len, 0

    def close(self) -> None:
        c, self.c = self.c, None
        if c is not None:
            self.backend.loras.release(c)
            self.backend.return_context(c)

    def reset(self) -> None:
        self._context().forget()
        self.length = 0

    def can_trim(self) -> bool:
        return not self.backend.recurrent

    def trim(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise EngineError(f"cannot drop {n} tokens from a sequence of {self.length}")
        if n and self.backend.recurrent and n != self.length:
            raise EngineError("a sequence with a convolution or recurrent state cannot drop part of its tokens")
        self._context().forget(0, self.length - n)
        self.length -= n

    def _context(self) -> GgufContext:
        if self.c is None:
            raise EngineError("this sequence has ended")
        return self.c

    def forward(self, ids, all_logits: bool = False) -> np.ndarray:
        n = len(ids)
        if n == 0:
            raise EngineError("empty input: nothing to run")
        c = self._context()
        if self.length + n > self.max_len:
            raise EngineError(f"sequence of {self.length + n} tokens exceeds the buffer of {self.max_len}")
        out = c.run(ids, self.length, 0, all_logits)
        self.length += n
        return out
