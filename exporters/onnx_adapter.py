"""Adapter -> onnxruntime adapter file (.onnx_adapter), written with onnxruntime.AdapterFormat.

Each adapted module contributes A = lora_A^T [in, r] and B = scale * lora_B^T [r, out] to the
slot of its packed group (q/k/v, o, gate/up, down); the scale (alpha/r, alpha/sqrt(r) for rsLoRA,
per-module alpha_pattern) is folded into B so the graph needs no scale input.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgepeft.errors import AdapterMismatch, UnsupportedAdapter, require
from edgepeft.files import atomic_path
from edgepeft.kinds import AdapterSpec, needs_full_slots
from edgepeft.kinds.spec import ScaleModule
from edgepeft.runtime_contract import ADAPTERS_ACTIVE, fingerprint_version

from .onnx_prompt import KINDS as PROMPT_KINDS, prefix_tensors


def _parts(slot: dict) -> list[dict]:
    """The linear layers a slot covers (one for bundles whose slots are not packed)."""
    return slot.get("parts") or [{"module": slot["module"], "target": slot.get("target", slot["module"].rsplit(".", 1)[-1]),
                                  "offset": 0, "out": slot["out"]}]


def _resolve(base):
    """`base` is a loaded BaseModel or a function that loads it (only when a kind needs it)."""
    if base is None:
        raise UnsupportedAdapter("this adapter needs the base weights at export, and none were given")
    return base() if callable(base) else base


def _base_param(base, module: str, param: str) -> np.ndarray | None:
    t = getattr(_resolve(base).model.get_submodule(module), param, None)
    return None if t is None else t.detach().float().cpu().numpy()


def adapter_tensors(spec: AdapterSpec, onnx_info: dict, base=None) -> dict[str, np.ndarray]:
    """The slot tensors for `spec` on a base whose ONNX slots are `onnx_info['slots']`.

    A slot packs several linear layers that share an input (q/k/v, gate/up); the adapter's
    LoRA modules in it become one batched A/B pair (see _batched), so that the slot computes
    [x A_1 B_1, x A_2 B_2, ...] in the group's output columns.
    With the base's full slot set, each group also has an output scale, a bias and (down_proj)
    an input scale: DoRA's magnitude / row-norm term (computed here, from the base weights), IA3's
    vectors and trained biases go there. `base` (BaseModel or a loader) is needed for DoRA and for
    biases of layers that have a base bias."""
    if spec.kind not in ("lora", "dora", "ia3"):
        raise UnsupportedAdapter(f"{spec.path}: kind {spec.kind} cannot be swapped on ONNX")
    slots = onnx_info["slots"]
    if not slots:
        raise UnsupportedAdapter(f"{spec.path}: this bundle's ONNX base has no adapter slots (exported with --merge "
                                 "or --slots none); re-export the base with --slots lora (or full) to hot-swap it")
    owner = {part["module"]: (slot, part) for slot in slots for part in _parts(slot)}
    targets = sorted({p["target"] for s in slots for p in _parts(s)})
    dtype = np.float16 if onnx_info.get("dtype") == "fp16" else np.float32

    def find(name: str):
        if name not in owner:
            raise UnsupportedAdapter(
                f"{spec.path}: module {name} has no adapter slot in the ONNX base (slots cover {', '.join(targets)})"
            )
        return owner[name]

    if needs_full_slots(spec):
        if not all("scale_out" in s for s in slots if not s.get("embedding")):
            what = "bias tuning" if spec.kind == "lora" else spec.kind.upper() if spec.kind == "ia3" else "DoRA"
            raise UnsupportedAdapter(
                f"{spec.path}: {what} needs the base's scale and bias slots, and this bundle's ONNX base was "
                "exported without them; re-export the base with --slots full"
            )
    for name, saved in spec.saved_base.items():
        weight = _base_param(base, name, "weight")
        if weight is None or weight.shape != saved.shape or not np.allclose(weight, saved, atol=1e-6):
            raise AdapterMismatch(f"{spec.path}: the adapter saved its own {name} weights and they differ from the "
                                  "base's (a resized or retrained embedding is not an adapter; use --merge)")

    out: dict[str, np.ndarray] = {}
    grouped: dict[str, list] = {}
    vectors: dict[str, np.ndarray] = {}  # slot vector name -> value, for the ones an adapter changes

    def vector(slot: dict, key: str) -> np.ndarray:
        name = slot[key]
        if name not in vectors:
            if key == "bias":
                vectors[name] = (np.concatenate([_base_param(base, p["module"], "bias") if slot["has_bias"] else
                                                 np.zeros(p["out"], np.float32) for p in _parts(slot)])
                                 if slot["has_bias"] else np.zeros(slot["out"], np.float32))
            else:
                vectors[name] = np.ones(slot["in"] if key == "scale_in" else slot["out"], np.float32)
        return vectors[name]

    for name, mod in spec.modules.items():
        slot, part = find(name)
        cols = slice(part["offset"], part["offset"] + part["out"])
        if isinstance(mod, ScaleModule):
            if mod.on_input:
                if "scale_in" not in slot or len(_parts(slot)) != 1 or mod.vector.shape != (slot["in"],):
                    raise UnsupportedAdapter(f"{spec.path}: IA3 input scaling of {name} is only supported on down_proj")
                vector(slot, "scale_in")[:] = mod.vector
                continue
            if mod.vector.shape != (part["out"],):
                raise AdapterMismatch(f"{spec.path}: IA3 vector of {name} has {mod.vector.size} values, the layer "
                                      f"has {part['out']} outputs (adapter trained for another base?)")
            vector(slot, "scale_out")[cols] *= mod.vector
            if slot.get("has_bias"):  # PEFT scales the layer's whole output, bias included
                vector(slot, "bias")[cols] *= mod.vector
            continue
        if (mod.in_features, mod.out_features) != (slot["in"], part["out"]):
            raise AdapterMismatch(
                f"{spec.path}: module {name} is {mod.in_features}->{mod.out_features} but the base's is "
                f"{slot['in']}->{part['out']} (adapter trained for another base?)"
            )
        if slot.get("embedding") and (mod.magnitude is not None or mod.bias is not None):
            raise UnsupportedAdapter(f"{spec.path}: DoRA or lora_bias on the embedding is not supported")
        if mod.magnitude is not None:
            # DoRA: y = m / ||W + s B A||_row * (x W^T + s x A^T B^T) + b, the norm taken per output.
            weight = _base_param(base, name, "weight") + np.float32(mod.scale) * (mod.b @ mod.a)
            vector(slot, "scale_out")[cols] = mod.magnitude / np.linalg.norm(weight, axis=1)
        if mod.bias is not None:
            vector(slot, "bias")[cols] += np.float32(mod.scale) * mod.bias
        grouped.setdefault(slot["A"], []).append((slot, part, mod))
    for name, trained in spec.biases.items():
        slot, part = find(name)
        if trained.shape != (part["out"],):
            raise AdapterMismatch(f"{spec.path}: bias of {name} has {trained.size} values, the layer has {part['out']}")
        vector(slot, "bias")[part["offset"]:part["offset"] + part["out"]] = trained

    for members in grouped.values():
        slot = members[0][0]
        members.sort(key=lambda m: m[1]["offset"])
        a, b = (_batched if "chunk" in slot else _block_diagonal)(slot, members)
        out[slot["A"]] = a.astype(dtype)
        out[slot["B"]] = b.astype(dtype)
    out.update({name: v.astype(dtype) for name, v in vectors.items()})
    return out


def _batched(slot: dict, members: list) -> tuple[np.ndarray, np.ndarray]:
    """A [parts, in, r] and B [chunks, r, chunk] of a packed group's batched slot (see
    onnx_graph.linear): part p's A_p in A[p], and its B_p cut into the chunks that read part p.
    r is the largest member rank; a smaller rank, or a member the adapter leaves out, is zeros."""
    parts = [p["module"] for p in _parts(slot)]
    chunk, chunks = slot["chunk"], slot["chunks"]
    rank = max(mod.rank for _, _, mod in members)
    a = np.zeros((len(parts), slot["in"], rank), np.float32)
    b = np.zeros((len(chunks), rank, chunk), np.float32)
    for _, part, mod in members:
        p = parts.index(part["module"])
        a[p, :, :mod.rank] = mod.a.T
        bt = (mod.b * np.float32(mod.scale)).T  # [rank, out of this member]
        for j, c in enumerate(c for c, q in enumerate(chunks) if q == p):
            b[c, :mod.rank] = bt[:, j * chunk:(j + 1) * chunk]
    return a, b


def _block_diagonal(slot: dict, members: list) -> tuple[np.ndarray, np.ndarray]:
    """A = [A_1 | A_2 ...] (ranks concatenated) [in, r] and a block-diagonal B [r, out]: the
    layout of single-module slots, and of packed slots in bundles exported before batched slots
    (their manifest slots have no "chunk")."""
    rank = sum(mod.rank for _, _, mod in members)
    a = np.zeros((slot["in"], rank), np.float32)
    b = np.zeros((rank, slot["out"]), np.float32)
    r0 = 0
    for _, part, mod in members:
        a[:, r0:r0 + mod.rank] = mod.a.T
        b[r0:r0 + mod.rank, part["offset"]:part["offset"] + part["out"]] = (mod.b * np.float32(mod.scale)).T
        r0 += mod.rank
    return a, b


def export_adapter_onnx(spec: AdapterSpec, onnx_info: dict, fingerprint: str, dest: Path, base=None) -> None:
    """Write `spec` as an onnxruntime adapter file at `dest` (atomically). `base` (the loaded
    BaseModel, or a function returning it) is used by kinds computed from the base (prompt tuning)."""
    ort = require("onnxruntime", "onnx")
    if spec.kind in PROMPT_KINDS:  # KV-cache prefix tensors instead of slot tensors
        tensors = prefix_tensors(spec, onnx_info, base)
    else:
        tensors = adapter_tensors(spec, onnx_info, base)
    if onnx_info.get("base_path") and spec.kind not in PROMPT_KINDS:
        tensors[ADAPTERS_ACTIVE] = np.ones(1, np.float32)  # run the slots (onnx_graph.add_base_path)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(fingerprint_version(fingerprint))
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in tensors.items()})
    with atomic_path(dest) as tmp:
        fmt.export_adapter(str(tmp))
