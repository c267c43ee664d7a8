"""ONNX backend: one onnxruntime session for the base; adapters as bound slot tensors.

Ownership: the backend owns the InferenceSession (created once, freed with the backend). Each
loaded adapter owns its memory-mapped parameters (runtime/onnx_adapter.py; freed when unloaded
and no call uses it). Each sequence (`OnnxSequence`) owns its IOBinding and its KV cache, freed
at `close()`, so calls on different threads never share state. In a hybrid family (LFM2, Qwen3.5), the
sequence owns each convolution or DeltaNet layer's states beside the attention layers' KV cache
(the graph's entry `kv` says which layers have which: `layers` and `states`); such a state
cannot drop its last tokens, so those sequences do not trim (a shared prefix is recomputed).

The runtime binds adapter tensors itself because onnxruntime's `RunOptions.add_active_adapter`
is ignored by `run_with_iobinding`, and IO binding is what lets the KV cache live in one
preallocated buffer that serves as past and present.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import numpy as np

from edgepeft.bundle import Bundle
from edgepeft.errors import BundleError, EngineError, require
from edgepeft.runtime.devices import pick_onnx
from edgepeft.runtime_contract import (ADAPTERS_ACTIVE, ATTENTION_MASK, INPUT_IDS, LOGITS, LOGITS_TO_KEEP, kv_names, kv_shape,
                                       slot_params, state_names)

from .backend import Backend, SequenceState
from .onnx_adapter import OnnxAdapter, combine, read_adapter

PARALLEL = 4  # default bound on rows decoding together (llama.cpp server's --parallel)
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OnnxBackend(Backend):
    name = "onnx"

    def __init__(self, bundle: Bundle, device: str = "auto", threads: int | None = None,
                 max_context: int | None = None, parallel: int | None = None):
        ort = self.ort = require("onnxruntime", "onnx")
        info = self.info = bundle.backends.get("onnx")
        if info is None:
            raise BundleError(f"{bundle.root}: has no ONNX base (export with --format onnx)")
        self.fingerprint = bundle.fingerprint
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
        so.log_severity_level = 3  # overridable slot initializers make onnxruntime warn once each
        choice = pick_onnx(ort.get_available_providers(), device)
        self.providers, self.device_note = choice.providers, choice.note
        path = bundle.file(info["model"])
        try:
            self.session = ort.InferenceSession(str(path), so, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise BundleError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from None
        # Where IO-bound tensors (KV cache, logits) live; other providers copy what they need.
        self.device = "cuda" if choice.device in ("cuda", "tensorrt") else "cpu"
        inputs = {i.name: i for i in self.session.get_inputs()}
        kv = info["kv"]
        # A hybrid's attention layers have a KV cache, its other layers their states instead.
        self.kv_layers = list(kv.get("layers", range(kv["num_layers"])))
        self.states = [(state_names(st["layer"], st["name"]), (1, *st["shape"])) for st in kv.get("states", [])]
        self.dtype = _ORT_TYPES[inputs[kv_names(self.kv_layers[0])[0]].type]
        self.vocab_size = int(next(o for o in self.session.get_outputs() if o.name == LOGITS).shape[-1])
        # Slots have defaults, so onnxruntime lists them as overridable initializers; the
        # manifest's slots say which modules have one.
        overridable = {i.name: i.shape for i in self.session.get_overridable_initializers()}
        self.slot_of = slot_params(s["module"] for s in info.get("slots", []))  # input -> (module, role)
        self.slots = {n: shape for n, shape in overridable.items() if n in self.slot_of}
        self.base_path = ADAPTERS_ACTIVE in overridable  # a slot-free path runs unless a call selects the slots
        self._active = ort.OrtValue.ortvalue_from_numpy(np.ones(1, np.float32))
        self.keeps_logits = LOGITS_TO_KEEP in overridable  # logits for the last n positions only
        self._keep = {n: ort.OrtValue.ortvalue_from_numpy(np.array([n], np.int64)) for n in (0, 1)}
        self.num_layers, self.kv_heads, self.head_dim = kv["num_layers"], kv["num_kv_heads"], kv["head_dim"]
        # Each KV layer's (KV heads, head size): layers may differ (Gemma 4's global layers).
        self.kv_shapes = {i: kv_shape(kv, i) for i in self.kv_layers}
        self.context_length = min(int(info["context_length"]), int(max_context or info["context_length"]))
        # LongRoPE bases: past this position the long factors apply, and a sequence recomputes
        # its cache with them, as transformers' generate does (exporters/onnx_rotary.py).
        self.rope_switch = info.get("longrope_switch")
        # On the CPU, one forward at a time when two would not fit the cores: each already uses
        # the intra-op threads. Held per step, never across a call's tokens.
        oversubscribed = not threads or 2 * int(threads) > (os.cpu_count() or 1)
        self.step_lock = threading.Lock() if self.device == "cpu" and oversubscribed else contextlib.nullcontext()
        self.parallel = int(parallel or PARALLEL)

    # ---- adapters ------------------------------------------------------------------------------
    def load_adapter(self, path: Path) -> OnnxAdapter:
        return read_adapter(self, path)

    def combine(self, adapters: list[OnnxAdapter], names: list[str]) -> OnnxAdapter:
        return combine(self.ort, adapters, names, self.slot_of)

    def virtual_tokens(self, adapter: OnnxAdapter | None) -> int:
        return adapter.prefix_length if adapter is not None else 0

    def bind_adapter(self, io, adapter: OnnxAdapter) -> None:
        """Bind `adapter`'s tensors as the slot inputs of `io` and select the slot path: the
        whole cost of switching adapters between calls (no base weight is touched)."""
        for name, value in adapter.params.items():
            io.bind_ortvalue_input(name, value)
        if adapter.params:
            self.bind_slot_path(io)

    def bind_slot_path(self, io) -> None:
        """Select the path with slots on a base that also has a slot-free one."""
        if self.base_path:
            io.bind_ortvalue_input(ADAPTERS_ACTIVE, self._active)

    def bind_kept_logits(self, io, n: int) -> None:
        """Ask for the logits of the last `n` positions only (0: all), where the graph can."""
        io.bind_ortvalue_input(LOGITS_TO_KEEP, self._keep[n])

    def switch_to(self, adapter: OnnxAdapter | None) -> None:
        """Binding the adapter's tensors, and for prompt-learning kinds copying its KV prefix."""
        io = self.session.io_binding()
        if adapter is not None:
            self.bind_adapter(io, adapter)
            for key, value in adapter.prefix:
                np.copyto(np.empty_like(key), key)
                np.copyto(np.empty_like(value), value)

    # ---- running -------------------------------------------------------------------------------
    def open_sequence(self, adapter: OnnxAdapter | None, max_len: int) -> "OnnxSequence":
        if max_len > self.context_length:
            raise EngineError(f"{max_len} tokens exceed the bundle's context length {self.context_length}")
        if max_len <= self.virtual_tokens(adapter):
            raise EngineError(f"a buffer of {max_len} positions leaves no room after the adapter's "
                              f"{self.virtual_tokens(adapter)} virtual tokens")
        return OnnxSequence(self, adapter, max_len)

    def can_batch(self, adapter: OnnxAdapter | None) -> bool:
        """Rows batch on a CPU base exported with row masks and without LongRoPE (one rotary
        table per step), on plain LoRA adapters (a row mask cannot separate what a scale or a
        prefix does to a whole output); everything else runs alone. A hybrid base's rows carry
        their per-layer states in the batcher (runtime/onnx_batch.py)."""
        return (bool(self.info.get("row_masks")) and self.rope_switch is None and self.device == "cpu"
                and (adapter is None or adapter.lora_only))

    def batcher(self):
        from .onnx_batch import OnnxBatcher

        return OnnxBatcher(self)


class OnnxSequence(SequenceState):
    """One sequence: an IO binding with its adapter bound, and a KV cache preallocated to
    `max_len` that serves as past and present (GroupQueryAttention writes in place)."""

    def __init__(self, backend: OnnxBackend, adapter: OnnxAdapter | None, max_len: int):
        ort, b = backend.ort, backend
        self.backend, self.max_len, self.adapter = backend, max_len, adapter
        self.io = b.session.io_binding()
        if adapter is not None:
            backend.bind_adapter(self.io, adapter)
        step = np.empty((1, 1, b.vocab_size), b.dtype)
        self.step_logits = (step, ort.OrtValue.ortvalue_from_numpy(step))
        self.kv, self.host_kv = [], []
        prefix = adapter.prefix if adapter is not None else []
        for i in b.kv_layers:
            shape = [1, b.kv_shapes[i][0], max_len, b.kv_shapes[i][1]]
            past_key, past_value, present_key, present_value = kv_names(i)
            for j, (past, present) in enumerate(((past_key, present_key), (past_value, present_value))):
                if prefix:
                    # Written on the host, then wrapped: zero-copy on the CPU (the array stays
                    # alive in host_kv), one copy to a GPU.
                    host = np.zeros(shape, b.dtype)
                    host[0, :, : adapter.prefix_length] = prefix[i][j]
                    v = ort.OrtValue.ortvalue_from_numpy(host, b.device, 0)
                    self.host_kv.append(host)
                else:
                    v = ort.OrtValue.ortvalue_from_shape_and_type(shape, b.dtype, b.device, 0)
                self.io.bind_ortvalue_input(past, v)
                self.io.bind_ortvalue_output(present, v)
                self.kv.append(v)
        # Each state in two buffers, past and present, swapped after every run: the graph reads
        # the past state while it writes the present one.
        self.states = [[names, ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, b.dtype), b.device, 0),
                        ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, b.dtype), b.device, 0)]
                       for names, shape in b.states]
        self._bind_states()
        self.mask = np.ones((1, max_len), np.int64)
        self.start = backend.virtual_tokens(adapter)  # real tokens start after the virtual ones
        self.length = self.start
        self.ids: list[int] = []  # what the cache holds after the virtual tokens (for the LongRoPE switch)
        self.keep = 0  # logits_to_keep as bound: unbound, the graph's default 0 (all positions)

    def close(self) -> None:
        # the buffers go now, not at collection
        self.io = self.kv = self.host_kv = self.step_logits = self.states = None

    def reset(self) -> None:
        self.length, self.ids = self.start, []
        for _, past, _ in self.states or []:  # a sequence starts from zero states
            past.update_inplace(np.zeros(past.shape(), self.backend.dtype))

    def can_trim(self) -> bool:
        return not self.states  # a convolution or recurrent state cannot give back the tokens it has taken in

    def _bind_states(self) -> None:
        for (past_name, present_name), past, present in self.states:
            self.io.bind_ortvalue_input(past_name, past)
            self.io.bind_ortvalue_output(present_name, present)

    def _swap_states(self) -> None:
        """The state a run wrote becomes the next run's past state."""
        for entry in self.states:
            entry[1], entry[2] = entry[2], entry[1]
        if self.states:
            self._bind_states()

    def trim(self, n: int) -> None:
        if self.states:
            raise EngineError("a sequence with a convolution or recurrent state cannot drop tokens once run")
        if not 0 <= n <= len(self.ids):
            raise EngineError(f"cannot drop {n} tokens from a sequence of {len(self.ids)}")
        self.length -= n
        self.ids = self.ids[: len(self.ids) - n]

    def forward(self, ids, all_logits: bool = False) -> np.ndarray:
        """One-row results (a one-token call, or one kept row) share a buffer that the next such
        call overwrites."""
        n = len(ids)
        if n == 0:
            raise EngineError("empty input: nothing to run")
        if self.io is None:
            raise EngineError("this sequence has ended")
        if self.length + n > self.max_len:
            raise EngineError(f"sequence of {self.length + n} tokens exceeds the buffer of {self.max_len}")
        switch = self.backend.rope_switch
        if switch is not None and self.ids and self.length <= switch < self.length + n:
            dropped, ids = len(self.ids), self.ids + list(ids)  # the whole cache, again, with long factors
            self.reset()
            out = self._run(ids, all_logits)
            return out[dropped:] if all_logits else out
        return self._run(ids, all_logits)

    def _run(self, ids, all_logits: bool) -> np.ndarray:
        n = len(ids)
        self.io.bind_cpu_input(INPUT_IDS, np.asarray(ids, np.int64).reshape(1, n))
        self.io.bind_cpu_input(ATTENTION_MASK, self.mask[:, : self.length + n])
        # Logits land in a host array this sequence owns, reused for every decode step; reading
        # it directly, not through io.get_outputs(), spares wrapping every output each step.
        kept = n
        if self.backend.keeps_logits:
            kept = n if all_logits else 1
            keep = 0 if kept == n else kept
            if keep != self.keep:  # bound only when it changes, not every decode step
                self.backend.bind_kept_logits(self.io, keep)
                self.keep = keep
        if kept == 1:
            logits, value = self.step_logits
        else:
            logits = np.empty((1, kept, self.backend.vocab_size), self.backend.dtype)
            value = self.backend.ort.OrtValue.ortvalue_from_numpy(logits)
        self.io.bind_ortvalue_output(LOGITS, value)
        with self.backend.step_lock:
            self.backend.session.run_with_iobinding(self.io)
        self._swap_states()
        self.length += n
        self.ids.extend(int(t) for t in ids)
        return logits[0].astype(np.float32, copy=False)
