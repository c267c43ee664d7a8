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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepeft.bundle import Bundle
from edgepeft.errors import AdapterError, AdapterMismatch, BundleError, EngineError, require
from edgepeft.runtime_contract import fingerprint_version

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def pick_providers(ort, device: str) -> list[str]:
    """Execution providers for `device` among those the installed onnxruntime offers."""
    available = ort.get_available_providers()
    wanted = {"cpu": ["CPUExecutionProvider"],
              "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
    if device == "auto":
        return wanted["cuda"] if "CUDAExecutionProvider" in available else wanted["cpu"]
    if device not in wanted:
        raise EngineError(f"device {device!r} is not supported by the ONNX backend (use auto, cpu, cuda)")
    if wanted[device][0] not in available:
        raise EngineError(f"device {device!r} needs {wanted[device][0]}, which this onnxruntime lacks")
    return wanted[device]


@dataclass
class OnnxAdapter:
    """A loaded adapter: its parameters as OrtValues over the memory-mapped file."""

    path: Path
    params: dict  # slot input name -> OrtValue
    keepalive: object  # the AdapterFormat that owns the mapping


class OnnxBackend:
    name = "onnx"

    def __init__(self, bundle: Bundle, device: str = "auto", threads: int | None = None):
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
        self.providers = pick_providers(ort, device)
        path = bundle.file(info["model"])
        try:
            self.session = ort.InferenceSession(str(path), so, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise BundleError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from None
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.dtype = _ORT_TYPES[inputs["past_key_values.0.key"].type]
        # Slots have rank-0 defaults, so onnxruntime lists them as overridable initializers.
        self.slots = {i.name: i.shape for i in self.session.get_overridable_initializers()
                      if i.name.startswith("lora.")}
        kv = info["kv"]
        self.num_layers, self.kv_heads, self.head_dim = kv["num_layers"], kv["num_kv_heads"], kv["head_dim"]
        self.context_length = int(info["context_length"])

    # ---- adapters ------------------------------------------------------------------------------
    def load_adapter(self, path: Path) -> OnnxAdapter:
        path = Path(path)
        if not path.is_file():
            raise AdapterError(f"{path}: adapter file not found")
        try:
            fmt = self.ort.AdapterFormat.read_adapter(str(path))
            params = fmt.get_parameters()
        except Exception as e:
            raise AdapterError(f"{path}: not an onnxruntime adapter file ({str(e).splitlines()[0][:160]})") from None
        if fmt.get_model_version() != fingerprint_version(self.fingerprint):
            raise AdapterMismatch(f"{path}: exported for another base model (fingerprint differs)")
        want = "tensor(float16)" if self.dtype == np.float16 else "tensor(float)"
        for name, value in params.items():
            shape = self.slots.get(name)
            if shape is None:
                raise AdapterMismatch(f"{path}: parameter {name!r} has no slot in this base")
            got = value.shape()
            fixed = [(i, d) for i, d in enumerate(shape) if isinstance(d, int)]
            if len(got) != 2 or any(got[i] != d for i, d in fixed) or value.data_type() != want:
                raise AdapterMismatch(f"{path}: parameter {name!r} is {value.data_type()}{got}, slot is {shape}")
        for a_name in [n for n in params if n.endswith(".A")]:
            b_name = a_name[:-2] + ".B"
            if b_name not in params or params[a_name].shape()[1] != params[b_name].shape()[0]:
                raise AdapterMismatch(f"{path}: slot {a_name[:-2]} has mismatched A/B ranks")
        return OnnxAdapter(path=path, params=params, keepalive=fmt)

    @staticmethod
    def bind_adapter(io, adapter: OnnxAdapter) -> None:
        """Bind `adapter`'s tensors as the slot inputs of `io`: this is the whole cost of
        switching adapters between calls (no base weight is touched)."""
        for name, value in adapter.params.items():
            io.bind_ortvalue_input(name, value)

    def switch_to(self, adapter: OnnxAdapter | None) -> None:
        """What changing the adapter costs a call: binding its tensors (measured by demo/bench)."""
        io = self.session.io_binding()
        if adapter is not None:
            self.bind_adapter(io, adapter)

    # ---- running -------------------------------------------------------------------------------
    def sequence(self, adapter: OnnxAdapter | None, max_len: int) -> "_Sequence":
        if max_len > self.context_length:
            raise EngineError(f"{max_len} tokens exceed the bundle's context length {self.context_length}")
        return _Sequence(self, adapter, max_len)


class _Sequence:
    """One generation's state: IO binding with the adapter bound, and a KV cache preallocated to
    `max_len` that serves as both past and present (GroupQueryAttention writes in place)."""

    def __init__(self, backend: OnnxBackend, adapter: OnnxAdapter | None, max_len: int):
        ort, b = backend.ort, backend
        self.backend, self.max_len, self.length = backend, max_len, 0
        self.io = b.session.io_binding()
        if adapter is not None:
            backend.bind_adapter(self.io, adapter)
        self.io.bind_output("logits", b.device)
        self.kv = []
        shape = [1, b.kv_heads, max_len, b.head_dim]
        for i in range(b.num_layers):
            for part in ("key", "value"):
                v = ort.OrtValue.ortvalue_from_shape_and_type(shape, b.dtype, b.device, 0)
                self.io.bind_ortvalue_input(f"past_key_values.{i}.{part}", v)
                self.io.bind_ortvalue_output(f"present.{i}.{part}", v)
                self.kv.append(v)
        self.mask = np.ones((1, max_len), np.int64)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.io = self.kv = None  # release the KV buffers now, not at garbage collection

    def forward(self, ids, all_logits: bool = True) -> np.ndarray:
        """Run `ids` after what is cached; return logits [len(ids), vocab] as float32 (the graph
        computes every position, so all_logits changes nothing here)."""
        n = len(ids)
        if n == 0:
            raise EngineError("empty input: nothing to run")
        if self.length + n > self.max_len:
            raise EngineError(f"sequence of {self.length + n} tokens exceeds the buffer of {self.max_len}")
        self.io.bind_cpu_input("input_ids", np.asarray(ids, np.int64).reshape(1, n))
        self.io.bind_cpu_input("attention_mask", self.mask[:, : self.length + n])
        # Unallocated each run: the logits' shape follows the input length (prefill vs decode).
        self.io.bind_output("logits", self.backend.device)
        self.backend.session.run_with_iobinding(self.io)
        self.length += n
        return self.io.get_outputs()[0].numpy()[0].astype(np.float32, copy=False)
