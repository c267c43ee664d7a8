"""ONNX adapters: an adapter file read and checked against the base's slots, and adapters whose
LoRA ranks sit side by side in one slot (active together, or on different rows of a batch).

An adapter file's parameters are zero-copy views of the memory-mapped file, read with
onnxruntime's `AdapterFormat.read_adapter`; binding them is what onnxruntime's own adapter API
does per call. Prompt-learning adapters carry a KV-cache prefix (`prefix.{layer}.key/value`)
instead of slot tensors, copied into each sequence's cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgepeft.errors import AdapterError, AdapterMismatch, EngineError
from edgepeft.limits import MAX_ADAPTER_FILE_BYTES, MAX_RANK
from edgepeft.runtime_contract import (ADAPTERS_ACTIVE, fingerprint_version, is_prefix_param, prefix_names,
                                       slot_family, slot_inputs)


@dataclass
class OnnxAdapter:
    """A loaded adapter: its parameters as OrtValues over the memory-mapped file."""

    path: Path
    params: dict  # slot input name -> OrtValue
    keepalive: object  # what owns the memory the OrtValues read (the AdapterFormat, or arrays)
    # Prompt-learning kinds: per layer (key, value) [kv_heads, P, head_dim], numpy views of the
    # adapter's OrtValues. Empty for slot adapters.
    prefix: list = field(default_factory=list)
    families: frozenset = frozenset()  # slot families it sets: lora, scale, bias

    @property
    def prefix_length(self) -> int:
        return int(self.prefix[0][0].shape[1]) if self.prefix else 0

    @property
    def lora_only(self) -> bool:
        """Plain LoRA: no virtual tokens, no scale or bias slots. Only these add up with others
        in one slot, because a scale multiplies a whole output and a prefix fills the cache."""
        return not self.prefix and self.families <= {"lora"}


@dataclass(frozen=True)
class SideBySide:
    """One slot's A and B with several adapters' ranks concatenated, A = [A_1 | A_2 ...] and
    B = [B_1; B_2 ...] (rank is A's last axis and B's second last, batched slots too)."""

    a_name: str
    b_name: str
    a: np.ndarray
    b: np.ndarray
    ranks: tuple  # each adapter's rank in this slot, in order (0: it has no such slot)


def side_by_side(adapters: list[OnnxAdapter], slot_of: dict) -> dict[str, SideBySide]:
    """{module: SideBySide} for every LoRA slot any of `adapters` sets."""
    modules = {slot_of[name][0] for adapter in adapters for name in adapter.params if slot_of[name][1] == "A"}
    out = {}
    for module in modules:
        names = slot_inputs(module)
        a_parts, b_parts, ranks = [], [], []
        for adapter in adapters:
            if names["A"] in adapter.params:
                a_parts.append(adapter.params[names["A"]].numpy())
                b_parts.append(adapter.params[names["B"]].numpy())
            ranks.append(a_parts[-1].shape[-1] if names["A"] in adapter.params else 0)
        out[module] = SideBySide(names["A"], names["B"], np.ascontiguousarray(np.concatenate(a_parts, axis=-1)),
                                 np.ascontiguousarray(np.concatenate(b_parts, axis=-2)), tuple(ranks))
    return out


def combine(ort, adapters: list[OnnxAdapter], names: list[str], slot_of: dict) -> OnnxAdapter:
    """Several LoRA adapters active together, as PEFT's multiple active adapters: their updates
    add up, which in each slot is their ranks side by side."""
    for adapter, name in zip(adapters, names):
        if adapter.prefix:
            raise EngineError(f"adapter {name!r} adds virtual tokens; PEFT cannot activate it together with "
                              "other adapters (use one at a time)")
        other = sorted(adapter.families - {"lora"})
        if other:
            raise EngineError(f"adapter {name!r} sets {other[0]} slots (DoRA, IA3 or bias tuning); only plain "
                              "LoRA adapters can be active together")
    arrays = {}
    for slot in side_by_side(adapters, slot_of).values():
        arrays[slot.a_name], arrays[slot.b_name] = slot.a, slot.b
    params = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in arrays.items()}
    return OnnxAdapter(Path("+".join(names)), params, keepalive=arrays, families=frozenset({"lora"}))


def read_adapter(backend, path: Path) -> OnnxAdapter:
    """Read and check an adapter file against `backend`'s slots and KV-cache shape."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: adapter file not found")
    if path.stat().st_size > MAX_ADAPTER_FILE_BYTES:
        raise AdapterError(f"{path}: {path.stat().st_size} bytes, over the limit of {MAX_ADAPTER_FILE_BYTES}")
    try:
        fmt = backend.ort.AdapterFormat.read_adapter(str(path))
        params = fmt.get_parameters()
    except Exception as e:
        raise AdapterError(f"{path}: not an onnxruntime adapter file ({str(e).splitlines()[0][:160]})") from None
    if fmt.get_model_version() != fingerprint_version(backend.fingerprint):
        raise AdapterMismatch(f"{path}: exported for another base model (fingerprint differs)")
    want = "tensor(float16)" if backend.dtype == np.float16 else "tensor(float)"
    prefix = _read_prefix(backend, path, params, want)
    # The file's path flag (if any) is the runtime's to set: bind_adapter sets it for slot adapters.
    params = {n: v for n, v in params.items() if not is_prefix_param(n) and n != ADAPTERS_ACTIVE}
    if params and not backend.slots:
        raise AdapterMismatch(f"{path}: this base has no adapter slots (exported with --merge or --slots none)")
    for name, value in params.items():
        shape = backend.slots.get(name)
        if shape is None:
            raise AdapterMismatch(f"{path}: parameter {name!r} has no slot in this base")
        got = value.shape()
        fixed = [(i, d) for i, d in enumerate(shape) if isinstance(d, int)]
        if len(got) != len(shape) or any(got[i] != d for i, d in fixed) or value.data_type() != want:
            raise AdapterMismatch(f"{path}: parameter {name!r} is {value.data_type()}{got}, slot is {shape}")
    # A [in, r], B [r, out] for one module; A [parts, in, r], B [chunks, r, chunk] for a packed group.
    for module in [m for m, role in map(backend.slot_of.get, params) if role == "A"]:
        names = slot_inputs(module)
        rank = params[names["A"]].shape()[-1]
        if rank > 3 * MAX_RANK:  # older bundles concatenate up to 3 modules' ranks in one slot
            raise AdapterMismatch(f"{path}: slot of {module} has rank {rank}, over the limit of {3 * MAX_RANK}")
        if names["B"] not in params or rank != params[names["B"]].shape()[-2]:
            raise AdapterMismatch(f"{path}: slot of {module} has mismatched A/B ranks")
    families = frozenset(slot_family(backend.slot_of[n][1]) for n in params)
    return OnnxAdapter(path=path, params=params, keepalive=fmt, prefix=prefix, families=families)


def _read_prefix(backend, path: Path, params: dict, want: str) -> list:
    """Check an adapter file's `prefix.*` parameters; per-layer (key, value) arrays."""
    names = sorted(n for n in params if is_prefix_param(n))
    if not names:
        return []
    layers, heads, dim = backend.num_layers, backend.kv_heads, backend.head_dim
    expected = [n for i in range(layers) for n in prefix_names(i)]
    if sorted(expected) != names:
        extra = sorted(set(names) - set(expected))
        raise AdapterMismatch(
            f"{path}: KV prefix has {'unexpected parameter ' + repr(extra[0]) if extra else 'missing layers'}; "
            f"this base has {layers} layers (adapter exported for another base?)")
    lengths, prefix = set(), []
    for i in range(layers):
        pair = []
        for name in prefix_names(i):
            value = params[name]
            got = value.shape()
            if len(got) != 3 or got[0] != heads or got[2] != dim or value.data_type() != want:
                raise AdapterMismatch(f"{path}: parameter {name!r} is {value.data_type()}{got}, this base's KV "
                                      f"cache is {want}[{heads}, P, {dim}]")
            lengths.add(got[1])
            pair.append(value.numpy())
        prefix.append(tuple(pair))
    if len(lengths) != 1:
        raise AdapterMismatch(f"{path}: KV prefix lengths differ across layers ({sorted(lengths)})")
    p = lengths.pop()
    if not 0 < p < backend.context_length:
        raise AdapterMismatch(f"{path}: KV prefix of {p} positions does not fit the context length "
                              f"{backend.context_length}")
    return prefix
