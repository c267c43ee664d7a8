"""The ONNX slot mechanics the weight-delta kinds (lora, dora, ia3) share, as PEFT's kinds share
tuners_utils: finding the slot of a module, the scale and bias vectors a group carries, and packing
the LoRA modules of a group into its A/B pair.

The layout is the graph's (exporters/onnx_graph.py builds the slots and records them in the
manifest): a slot covers the linear layers that share an input (q/k/v, gate/up), each a `part` at
an `offset` in the group's output columns.
"""

from __future__ import annotations

import numpy as np

from ..errors import UnsupportedAdapter
from .protocol import BaseView
from .spec import AdapterSpec, LoraModule


def float_type(onnx_info: dict) -> type:
    """The float type of the ONNX base's graph, which every adapter parameter is written in."""
    return np.float16 if onnx_info.get("dtype") == "fp16" else np.float32


def parts(slot: dict) -> list[dict]:
    """The linear layers a slot covers (one for bundles whose slots are not packed)."""
    return slot.get("parts") or [{"module": slot["module"], "target": slot.get("target", slot["module"].rsplit(".", 1)[-1]),
                                  "offset": 0, "out": slot["out"]}]


class SlotTensors:
    """The slot parameters of one adapter file, gathered module by module, then packed by `tensors()`.

    A kind looks each module's slot up with `find`, changes the group's vectors (`vector`) and
    hands its LoRA modules to `add_lora`; vectors start as the base's (ones, the base bias or
    zeros), so the file carries only the ones the adapter changes."""

    def __init__(self, spec: AdapterSpec, onnx_info: dict, base: BaseView | None):
        self.spec, self.base = spec, base
        self.slots = onnx_info["slots"]
        if not self.slots:
            raise UnsupportedAdapter(f"{spec.path}: this bundle's ONNX base has no adapter slots (exported with --merge "
                                     "or --slots none); re-export the base with --slots lora (or full) to hot-swap it")
        self._owner = {part["module"]: (slot, part) for slot in self.slots for part in parts(slot)}
        self._targets = sorted({p["target"] for s in self.slots for p in parts(s)})
        self._dtype = float_type(onnx_info)
        self._grouped: dict[str, list] = {}  # slot A name -> [(slot, part, LoraModule)]
        self._vectors: dict[str, np.ndarray] = {}  # slot vector name -> value, for the ones an adapter changes

    def require_full(self, what: str) -> None:
        """Refuse a base exported without the scale and bias slots that `what` needs."""
        if not all("scale_out" in s for s in self.slots if not s.get("embedding")):
            raise UnsupportedAdapter(
                f"{self.spec.path}: {what} needs the base's scale and bias slots, and this bundle's ONNX base was "
                "exported without them; re-export the base with --slots full"
            )

    def find(self, name: str) -> tuple[dict, dict]:
        """The slot that covers module `name`, and its part in it."""
        if name not in self._owner:
            raise UnsupportedAdapter(
                f"{self.spec.path}: module {name} has no adapter slot in the ONNX base (slots cover {', '.join(self._targets)})"
            )
        return self._owner[name]

    def base_param(self, module: str, param: str) -> np.ndarray | None:
        if self.base is None:
            raise UnsupportedAdapter("this adapter needs the base weights at export, and none were given")
        return self.base.param(module, param)

    def vector(self, slot: dict, key: str) -> np.ndarray:
        """The slot's `key` vector ("scale_in", "scale_out" or "bias"), to change in place."""
        name = slot[key]
        if name not in self._vectors:
            if key == "bias":
                self._vectors[name] = (np.concatenate([self.base_param(p["module"], "bias") if slot["has_bias"] else
                                                       np.zeros(p["out"], np.float32) for p in parts(slot)])
                                       if slot["has_bias"] else np.zeros(slot["out"], np.float32))
            else:
                self._vectors[name] = np.ones(slot["in"] if key == "scale_in" else slot["out"], np.float32)
        return self._vectors[name]

    def add_lora(self, slot: dict, part: dict, mod: LoraModule) -> None:
        self._grouped.setdefault(slot["A"], []).append((slot, part, mod))

    def tensors(self) -> dict[str, np.ndarray]:
        """Each group's LoRA modules as one A/B pair, then the changed vectors, in the graph's float type."""
        out: dict[str, np.ndarray] = {}
        for members in self._grouped.values():
            slot = members[0][0]
            members.sort(key=lambda m: m[1]["offset"])
            a, b = (_batched if "chunk" in slot else _block_diagonal)(slot, members)
            out[slot["A"]] = a.astype(self._dtype)
            out[slot["B"]] = b.astype(self._dtype)
        out.update({name: v.astype(self._dtype) for name, v in self._vectors.items()})
        return out


def _batched(slot: dict, members: list) -> tuple[np.ndarray, np.ndarray]:
    """A [parts, in, r] and B [chunks, r, chunk] of a packed group's batched slot (see
    exporters/onnx_slots.Projections.linear): part p's A_p in A[p], and its B_p cut into the chunks that read part p.
    r is the largest member rank; a smaller rank, or a member the adapter leaves out, is zeros."""
    names = [p["module"] for p in parts(slot)]
    chunk, chunks = slot["chunk"], slot["chunks"]
    rank = max(mod.rank for _, _, mod in members)
    a = np.zeros((len(names), slot["in"], rank), np.float32)
    b = np.zeros((len(chunks), rank, chunk), np.float32)
    for _, part, mod in members:
        p = names.index(part["module"])
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
