"""GGUF backend over llama-cpp-python's low-level API.

Ownership, llama.h style: the backend owns one `llama_model` (weights, loaded once) and one
`llama_context` (KV cache), freed in `close()`. Each loaded adapter is a `llama_adapter_lora`
handle initialised once from its file (`llama_adapter_lora_init`) and owned by the model; it is
freed on unload. A call takes the context's lock for its whole duration (a llama.cpp context
serves one sequence at a time), selects its adapter with `llama_set_adapters_lora` (with scale),
clears the KV cache and decodes. Switching adapters changes which handles the context applies;
no weight is copied.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepeft.bundle import Bundle
from edgepeft.errors import AdapterError, BundleError, EngineError, require
from edgepeft.llama_log import quiet_llama_cpp

from .gguf_check import check_adapter_gguf, check_base_gguf
from edgepeft.runtime.devices import pick_gguf

BATCH = 512  # tokens per llama_decode; longer inputs are decoded in chunks


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
                 n_gpu_layers: int | None = None, context_length: int | None = None):
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
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise EngineError(f"{path}: llama.cpp could not create a context of {self.context_length} tokens")
        self.lock = threading.Lock()
        self._active: tuple = ()
        self._batch = llama_cpp.llama_batch_init(min(BATCH, self.context_length), 0, 1)

    # ---- adapters ------------------------------------------------------------------------------
    def load_adapter(self, path: Path) -> GgufAdapter:
        path = Path(path)
        if not path.is_file():
            raise AdapterError(f"{path}: adapter file not found")
        check_adapter_gguf(path, self.arch, self.fingerprint, self.base_shapes)
        with self.lock:
            handle = self.llama_cpp.llama_adapter_lora_init(self.model, str(path).encode())
        if not handle:
            raise AdapterError(f"{path}: llama.cpp refused it (not a LoRA GGUF for this base's architecture and shapes)")
        return GgufAdapter(path, handle)

    def combine(self, adapters: list[GgufAdapter], names: list[str]) -> "GgufCombo":
        """Several LoRA adapters active together: llama.cpp applies a list of adapters natively."""
        return GgufCombo(tuple(adapters))

    def free_adapter(self, adapter: GgufAdapter) -> None:
        with self.lock:
            if any(a is adapter for a in self._active):
                self._set_adapter(None)
            adapter.freed = True
            self.llama_cpp.llama_adapter_lora_free(adapter.handle)

    def _set_adapter(self, adapter: "GgufAdapter | GgufCombo | None") -> None:
        """Make `adapter` (or none, or a combination) the context's LoRA set. Caller holds the lock."""
        key = () if adapter is None else adapter.parts if isinstance(adapter, GgufCombo) else (adapter,)
        for a in key:
            if a.freed:
                raise BundleError(f"adapter {a.path.name} was unloaded while this call waited for it")
        if key == self._active:
            return
        llama_cpp = self.llama_cpp
        if not key:
            rc = llama_cpp.llama_set_adapters_lora(self.ctx, None, 0, None)
        else:
            handles = (llama_cpp.llama_adapter_lora_p_ctypes * len(key))(*[a.handle for a in key])
            scales = (ctypes.c_float * len(key))(*[a.scale for a in key])
            rc = llama_cpp.llama_set_adapters_lora(self.ctx, handles, len(key), scales)
        if rc != 0:
            raise EngineError(f"llama.cpp could not apply adapter {adapter.path if adapter else ''} (code {rc})")
        self._active = key

    def switch_to(self, adapter: GgufAdapter | None) -> None:
        """Select `adapter` on the context (what each call does first); measured by demo/bench."""
        with self.lock:
            self._set_adapter(adapter)

    # ---- running -------------------------------------------------------------------------------
    def sequence(self, adapter: GgufAdapter | None, max_len: int) -> "_GgufSequence":
        if max_len > self.context_length:
            raise EngineError(f"{max_len} tokens exceed the GGUF context length {self.context_length}")
        return _GgufSequence(self, adapter, max_len)

    def close(self) -> None:
        llama_cpp = self.llama_cpp
        if getattr(self, "ctx", None):
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class _GgufSequence:
    """One call on the shared context: holds its lock from enter to exit."""

    def __init__(self, backend: GgufBackend, adapter: GgufAdapter | None, max_len: int):
        self.backend, self.adapter, self.max_len, self.length = backend, adapter, max_len, 0

    def __enter__(self):
        b = self.backend
        b.lock.acquire()
        try:
            b._set_adapter(self.adapter)
            b.llama_cpp.llama_memory_clear(b.llama_cpp.llama_get_memory(b.ctx), True)
        except BaseException:
            b.lock.release()
            raise
        return self

    def __exit__(self, *exc):
        self.backend.lock.release()

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
        b, llama_cpp = self.backend, self.backend.llama_cpp
        n = len(ids)
        batch = b._batch
        batch.n_tokens = n
        for i, tok in enumerate(ids):
            batch.token[i] = int(tok)
            batch.pos[i] = self.length + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = all_rows or (want_logits and i == n - 1)
        rc = llama_cpp.llama_decode(b.ctx, batch)
        if rc != 0:
            raise EngineError(f"llama.cpp decode failed (code {rc})")
        self.length += n
        if not want_logits:
            return None
        rows = n if all_rows else 1
        ptr = llama_cpp.llama_get_logits(b.ctx)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(rows, b.n_vocab)).copy()
