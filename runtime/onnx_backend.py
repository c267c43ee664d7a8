"""ONNX backend: one onnxruntime session for the base; adapters as bound slot tensors.

Ownership: the backend owns the InferenceSession (created once, freed with the backend). Each
loaded adapter owns its memory-mapped parameters (`OnnxAdapter`, freed when unloaded and no call
uses it). Each generate/score call owns a `_Sequence`: its IOBinding and its KV-cache buffers,
freed when the call ends, so calls on different threads never share state.

Why the runtime binds adapter tensors itself: onnxruntime's `RunOptions.add_active_adapter`
is ignored by `run_with_iobinding` (onnxruntime warns so), and IO binding is what lets the KV
cache live in one preallocated buffer shared by past and present. Binding the adapter file's
parameters (read with `AdapterFormat.read_adapter`, zero-copy views of the mapped file) is the
same operation the adapter API performs, per call, with no copy of base weights.

Prompt-learning adapters (prompt tuning, P-tuning, prefix tuning) carry a KV-cache prefix
(`prefix.{layer}.key/value`, see edgepeft.runtime_contract.prefix_names) instead of slot tensors:
each `_Sequence` copies it into the first P positions of its own KV buffers and starts at length
P, so the real tokens run at positions P.. with the mask covering P + tokens, as in PEFT.
"""

from __future__ import annotations

import contextlib
import os
import threading

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgepeft.bundle import Bundle
from edgepeft.errors import AdapterError, AdapterMismatch, BundleError, EngineError, require
from edgepeft.limits import MAX_ADAPTER_FILE_BYTES, MAX_RANK
from edgepeft.runtime.devices import pick_onnx
from edgepeft.runtime_contract import (ADAPTERS_ACTIVE, ATTENTION_MASK, INPUT_IDS, LOGITS, LOGITS_TO_KEEP,
                                       fingerprint_version, is_prefix_param, kv_names, prefix_names, slot_family,
                                       slot_inputs, slot_params)

PARALLEL = 4  # default bound on rows decoding together (llama.cpp server's --parallel)
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass
class OnnxAdapter:
    """A loaded adapter: its parameters as OrtValues over the memory-mapped file."""

    path: Path
    params: dict  # slot input name -> OrtValue
    keepalive: object  # the AdapterFormat that owns the mapping
    # Prompt-learning kinds: per layer (key, value) [kv_heads, P, head_dim], numpy views of the
    # adapter's OrtValues; copied into each sequence's KV cache. Empty for slot adapters.
    prefix: list = field(default_factory=list)

    @property
    def prefix_length(self) -> int:
        return int(self.prefix[0][0].shape[1]) if self.prefix else 0


class OnnxBackend:
    name = "onnx"

    def __init__(self, bundle: Bundle, device: str = "auto", threads: int | None = None,
                 max_context: int | None = None, parallel: int | None = None):
        ort = require("onnxruntime", "onnx")
        self.ort = ort
        info = bundle.backends.get("onnx")
        if info is None:
            raise BundleError(f"{bundle.root}: has no ONNX base (export with --format onnx)")
        self.info = info
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
        # Where IO-bound tensors (KV cache, logits) live: on the GPU for CUDA/TensorRT, else in
        # host memory (other providers copy what they need).
        self.device = "cuda" if choice.device in ("cuda", "tensorrt") else "cpu"
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.dtype = _ORT_TYPES[inputs[kv_names(0)[0]].type]
        self.vocab_size = int(next(o for o in self.session.get_outputs() if o.name == LOGITS).shape[-1])
        # Slots have defaults (rank-0 LoRA pairs, ones for scales, the base bias), so onnxruntime
        # lists them as overridable initializers; the manifest's slots say which modules have one.
        overridable = self.session.get_overridable_initializers()
        self.slot_of = slot_params(s["module"] for s in info.get("slots", []))  # input -> (module, role)
        self.slots = {i.name: i.shape for i in overridable if i.name in self.slot_of}
        # Bases with a slot-free path run it unless a call binds the flag (onnx_base_path.add_base_path).
        self.base_path = any(i.name == ADAPTERS_ACTIVE for i in overridable)
        self._active = ort.OrtValue.ortvalue_from_numpy(np.ones(1, np.float32))
        # Bases with logits_to_keep compute only the rows a call asks for (1 for a prompt's prefill).
        self.keeps_logits = any(i.name == LOGITS_TO_KEEP for i in overridable)
        self._keep = {n: ort.OrtValue.ortvalue_from_numpy(np.array([n], np.int64)) for n in (0, 1)}
        kv = info["kv"]
        self.num_layers, self.kv_heads, self.head_dim = kv["num_layers"], kv["num_kv_heads"], kv["head_dim"]
        # --max-context bounds every call's KV cache (prompt + generated tokens).
        self.context_length = min(int(info["context_length"]), int(max_context or info["context_length"]))
        # LongRoPE bases: the position past which the long factors apply (Engine re-runs the
        # sequence there, as transformers does); None for every other base.
        self.rope_switch = info.get("longrope_switch")
        # On the CPU, one run at a time when two runs' threads would not fit the cores: each run
        # already uses the intra-op threads, and overlapping runs of concurrent calls only fight
        # over the cores (benchmarks/results/serve_load.md). Held per step (one forward), never
        # across a call's tokens. Devices with their own queues run calls freely.
        oversubscribed = not threads or 2 * int(threads) > (os.cpu_count() or 1)
        self.step_lock = threading.Lock() if self.device == "cpu" and oversubscribed else contextlib.nullcontext()
        self.parallel = int(parallel or PARALLEL)  # rows that decode together (runtime/onnx_batch.py)

    def batcher(self):
        """Rows of concurrent calls in one forward pass (runtime/onnx_batch.py), or None where
        this base cannot batch: exported before row masks, LongRoPE, or not on the CPU."""
        if not self.info.get("row_masks") or self.rope_switch is not None or self.device != "cpu":
            return None
        from .onnx_batch import OnnxBatcher

        return OnnxBatcher(self)

    # ---- adapters ------------------------------------------------------------------------------
    def load_adapter(self, path: Path) -> OnnxAdapter:
        path = Path(path)
        if not path.is_file():
            raise AdapterError(f"{path}: adapter file not found")
        if path.stat().st_size > MAX_ADAPTER_FILE_BYTES:
            raise AdapterError(f"{path}: {path.stat().st_size} bytes, over the limit of {MAX_ADAPTER_FILE_BYTES}")
        try:
            fmt = self.ort.AdapterFormat.read_adapter(str(path))
            params = fmt.get_parameters()
        except Exception as e:
            raise AdapterError(f"{path}: not an onnxruntime adapter file ({str(e).splitlines()[0][:160]})") from None
        if fmt.get_model_version() != fingerprint_version(self.fingerprint):
            raise AdapterMismatch(f"{path}: exported for another base model (fingerprint differs)")
        want = "tensor(float16)" if self.dtype == np.float16 else "tensor(float)"
        prefix = self._read_prefix(path, params, want)
        # The file's path flag (if any) is the runtime's to set: bind_adapter sets it for slot adapters.
        params = {n: v for n, v in params.items() if not is_prefix_param(n) and n != ADAPTERS_ACTIVE}
        if params and not self.slots:
            raise AdapterMismatch(f"{path}: this base has no adapter slots (exported with --merge or --slots none)")
        for name, value in params.items():
            shape = self.slots.get(name)
            if shape is None:
                raise AdapterMismatch(f"{path}: parameter {name!r} has no slot in this base")
            got = value.shape()
            fixed = [(i, d) for i, d in enumerate(shape) if isinstance(d, int)]
            if len(got) != len(shape) or any(got[i] != d for i, d in fixed) or value.data_type() != want:
                raise AdapterMismatch(f"{path}: parameter {name!r} is {value.data_type()}{got}, slot is {shape}")
        # The rank is A's last axis and B's second last: A [in, r], B [r, out] for one module;
        # A [parts, in, r], B [chunks, r, chunk] for a packed group (see exporters/onnx_graph.py).
        for module in [m for m, role in map(self.slot_of.get, params) if role == "A"]:
            names = slot_inputs(module)
            rank = params[names["A"]].shape()[-1]
            if rank > 3 * MAX_RANK:  # bundles from before batched slots concatenate up to 3 modules' ranks
                raise AdapterMismatch(f"{path}: slot of {module} has rank {rank}, over the limit of {3 * MAX_RANK}")
            if names["B"] not in params or rank != params[names["B"]].shape()[-2]:
                raise AdapterMismatch(f"{path}: slot of {module} has mismatched A/B ranks")
        return OnnxAdapter(path=path, params=params, keepalive=fmt, prefix=prefix)

    def _read_prefix(self, path: Path, params: dict, want: str) -> list:
        """Validate an adapter file's `prefix.*` parameters; return per-layer (key, value) arrays."""
        names = sorted(n for n in params if is_prefix_param(n))
        if not names:
            return []
        expected = [n for i in range(self.num_layers) for n in prefix_names(i)]
        if sorted(expected) != names:
            extra = sorted(set(names) - set(expected))
            raise AdapterMismatch(
                f"{path}: KV prefix has {'unexpected parameter ' + repr(extra[0]) if extra else 'missing layers'}; "
                f"this base has {self.num_layers} layers (adapter exported for another base?)"
            )
        lengths, prefix = set(), []
        for i in range(self.num_layers):
            pair = []
            for name in prefix_names(i):
                value = params[name]
                got = value.shape()
                if (len(got) != 3 or got[0] != self.kv_heads or got[2] != self.head_dim
                        or value.data_type() != want):
                    raise AdapterMismatch(f"{path}: parameter {name!r} is {value.data_type()}{got}, this base's KV "
                                          f"cache is {want}[{self.kv_heads}, P, {self.head_dim}]")
                lengths.add(got[1])
                pair.append(value.numpy())
            prefix.append(tuple(pair))
        if len(lengths) != 1:
            raise AdapterMismatch(f"{path}: KV prefix lengths differ across layers ({sorted(lengths)})")
        p = lengths.pop()
        if not 0 < p < self.context_length:
            raise AdapterMismatch(f"{path}: KV prefix of {p} positions does not fit the context length "
                                  f"{self.context_length}")
        return prefix

    @staticmethod
    def prefix_length(adapter: OnnxAdapter | None) -> int:
        """Cache positions `adapter` occupies before the real tokens (virtual tokens)."""
        return adapter.prefix_length if adapter is not None else 0

    def combine(self, adapters: list[OnnxAdapter], names: list[str]) -> OnnxAdapter:
        """Several LoRA adapters active together, as PEFT's multiple active LoRA adapters: their
        updates add up, which in each slot is A = [A_1 | A_2], B = [B_1; B_2] (ranks
        concatenated; per part and chunk in a batched slot). Only plain LoRA slots combine: prefixes, scales and biases do not add up."""
        for adapter, name in zip(adapters, names):
            if adapter.prefix:
                raise EngineError(f"adapter {name!r} adds virtual tokens; PEFT cannot activate it together with "
                                  "other adapters (use one at a time)")
            other = sorted({slot_family(role) for _, role in map(self.slot_of.get, adapter.params)} - {"lora"})
            if other:
                raise EngineError(f"adapter {name!r} sets {other[0]} slots (DoRA, IA3 or bias tuning); only plain "
                                  "LoRA adapters can be active together")
        arrays: dict[str, list] = {}
        for adapter in adapters:
            for pname, value in adapter.params.items():
                arrays.setdefault(pname, []).append(value.numpy())
        combined = {}
        for module in [m for m, role in map(self.slot_of.get, arrays) if role == "A"]:
            names = slot_inputs(module)  # the rank is A's last axis, B's second last (batched slots too)
            a_name, b_name = names["A"], names["B"]
            combined[a_name] = np.ascontiguousarray(np.concatenate(arrays[a_name], axis=-1))
            combined[b_name] = np.ascontiguousarray(np.concatenate(arrays[b_name], axis=-2))
        params = {n: self.ort.OrtValue.ortvalue_from_numpy(a) for n, a in combined.items()}
        return OnnxAdapter(path=Path("+".join(names)), params=params, keepalive=combined)

    def bind_adapter(self, io, adapter: OnnxAdapter) -> None:
        """Bind `adapter`'s tensors as the slot inputs of `io`, and select the slot path: this is
        the whole cost of switching adapters between calls (no base weight is touched)."""
        for name, value in adapter.params.items():
            io.bind_ortvalue_input(name, value)
        if adapter.params and self.base_path:
            io.bind_ortvalue_input(ADAPTERS_ACTIVE, self._active)

    def switch_to(self, adapter: OnnxAdapter | None) -> None:
        """What changing the adapter costs a call: binding its tensors, and for prompt-learning
        kinds copying the KV prefix into the call's cache (measured by demo/bench)."""
        io = self.session.io_binding()
        if adapter is not None:
            self.bind_adapter(io, adapter)
            for key, value in adapter.prefix:
                np.copyto(np.empty_like(key), key)
                np.copyto(np.empty_like(value), value)

    # ---- running -------------------------------------------------------------------------------
    def sequence(self, adapter: OnnxAdapter | None, max_len: int) -> "_Sequence":
        """A sequence of at most `max_len` cache positions, the adapter's prefix included."""
        if max_len > self.context_length:
            raise EngineError(f"{max_len} tokens exceed the bundle's context length {self.context_length}")
        if max_len <= self.prefix_length(adapter):
            raise EngineError(f"a buffer of {max_len} positions leaves no room after the adapter's "
                              f"{self.prefix_length(adapter)} virtual tokens")
        return _Sequence(self, adapter, max_len)


class _Sequence:
    """One generation's state: IO binding with the adapter bound, and a KV cache preallocated to
    `max_len` that serves as both past and present (GroupQueryAttention writes in place)."""

    def __init__(self, backend: OnnxBackend, adapter: OnnxAdapter | None, max_len: int):
        ort, b = backend.ort, backend
        self.backend, self.max_len, self.adapter = backend, max_len, adapter
        self.io = b.session.io_binding()
        if adapter is not None:
            backend.bind_adapter(self.io, adapter)
        step = np.empty((1, 1, b.vocab_size), b.dtype)
        self.step_logits = (step, ort.OrtValue.ortvalue_from_numpy(step))
        self.kv, self.host_kv = [], []
        shape = [1, b.kv_heads, max_len, b.head_dim]
        prefix = adapter.prefix if adapter is not None else []
        for i in range(b.num_layers):
            past_key, past_value, present_key, present_value = kv_names(i)
            for j, (past, present) in enumerate(((past_key, present_key), (past_value, present_value))):
                if prefix:
                    # The prefix is written on the host, then the buffer is wrapped: zero-copy on
                    # CPU (the OrtValue uses this array's memory, kept alive in self.host_kv),
                    # one host-to-device copy on CUDA. The rest of the buffer is written by
                    # GroupQueryAttention before it is read.
                    host = np.zeros(shape, b.dtype)
                    host[0, :, : adapter.prefix_length] = prefix[i][j]
                    v = ort.OrtValue.ortvalue_from_numpy(host, b.device, 0)
                    self.host_kv.append(host)
                else:
                    v = ort.OrtValue.ortvalue_from_shape_and_type(shape, b.dtype, b.device, 0)
                self.io.bind_ortvalue_input(past, v)
                self.io.bind_ortvalue_output(present, v)
                self.kv.append(v)
        self.mask = np.ones((1, max_len), np.int64)
        # Virtual tokens occupy the first P positions: real tokens start at position P.
        self.length = backend.prefix_length(adapter)
        self.keep = 0  # logits_to_keep as bound: unbound, the graph's default 0 (all positions)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.io = self.kv = self.host_kv = self.step_logits = None  # release the buffers now, not at garbage collection

    def restart(self, ids) -> np.ndarray:
        """Recompute the cache from scratch for `ids` (the whole sequence so far, after any
        virtual tokens) and return the last position's logits, as forward(all_logits=False)."""
        self.length = self.backend.prefix_length(self.adapter)
        return self.forward(ids, all_logits=False)

    def forward(self, ids, all_logits: bool = True) -> np.ndarray:
        """Run `ids` after what is cached; return logits as float32, [len(ids), vocab], or with
        all_logits=False at least the last position's (only that one where the graph has
        logits_to_keep). One-row results (a one-token call, or one kept row) share a buffer that
        the next such call overwrites: use them before stepping again."""
        n = len(ids)
        if n == 0:
            raise EngineError("empty input: nothing to run")
        if self.length + n > self.max_len:
            raise EngineError(f"sequence of {self.length + n} tokens exceeds the buffer of {self.max_len}")
        self.io.bind_cpu_input(INPUT_IDS, np.asarray(ids, np.int64).reshape(1, n))
        self.io.bind_cpu_input(ATTENTION_MASK, self.mask[:, : self.length + n])
        # Logits land in a host array this call owns (onnxruntime copies them there from a GPU),
        # one reused for every decode step. Reading it directly, not through io.get_outputs(),
        # matters: that wraps all 2*layers+1 outputs in Python objects each call.
        kept = n
        if self.backend.keeps_logits:
            kept = n if all_logits else 1
            keep = 0 if kept == n else kept  # 0: every position
            if keep != self.keep:  # bound only when it changes, not every decode step
                self.io.bind_ortvalue_input(LOGITS_TO_KEEP, self.backend._keep[keep])
                self.keep = keep
        if kept == 1:
            logits, value = self.step_logits
        else:
            logits = np.empty((1, kept, self.backend.vocab_size), self.backend.dtype)
            value = self.backend.ort.OrtValue.ortvalue_from_numpy(logits)
        self.io.bind_ortvalue_output(LOGITS, value)
        with self.backend.step_lock:
            self.backend.session.run_with_iobinding(self.io)
        self.length += n
        return logits[0].astype(np.float32, copy=False)
