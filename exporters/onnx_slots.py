"""The decoder's projections and their adapter slots, and the graph they are added to.

Every packed group y = x W^T (+ b) becomes y = x W^T (+ b) + (x A) B, where A [in, r] and B [r, out]
are graph inputs with rank-0 initializers as defaults (empty slots multiply by empty matrices and
add exact zeros), and onnxruntime's adapter files (or bound OrtValues) override them per run
without touching the base weights. One slot per group, not per layer, because each slot costs a
few small operators per token. A packed group's slot is batched: A [parts, in, r] (one x A_p per
member) and B [chunks, r, chunk], the group's output cut into equal chunks, so no zeros are
stored between members (see Projections.lora and edgepeft/kinds/slots.py). The embedding has a LoRA slot
too (x += A[ids] B).

Every LoRA slot multiplies x A by a row mask (runtime_contract.row_mask; default ones), so that
one batch can hold rows on different adapters: the runtime binds the batch's adapters' ranks side
by side (A = [A_1 | A_2 ...], as for adapters active together) and each row's mask keeps only its
own adapter's columns. Each adapter's weights are read once per step for the whole batch, not
once per row; the manifest's "row_masks" says a base has them (runtime/onnx_batch.py).

slot_set "full" adds, per group, an output scale (ones), an overridable bias (the base's, or
zeros) and, on down_proj, an input scale (ones):
    y = ((x * s_in) W^T + (x * s_in) A B) * s_out + bias
which is what IA3 (scales on k/v outputs and the down_proj input), DoRA (a per-output magnitude
scale, computed at export) and bias tuning / lora_bias (a new bias) need. "lora" leaves them out,
which decodes faster. "none" has no slot at all, for bases with an adapter
merged in (--merge), where empty slots would only cost decode speed.

Slot input names come from edgepeft.runtime_contract. What later export steps need to know about
the operators (which are slot operators, which MatMul computes which projection) is recorded
here as they are added, not read back from their names.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edgepeft.errors import require
from edgepeft.runtime_contract import INPUT_IDS, row_mask, slot_inputs

from .onnx_base_path import FEEDS, PASSES

SLOT_SETS = ("full", "lora", "none")
EMBEDDING = "model.embed_tokens"  # the embedding's module, and its slot's


def slot_names(module: str) -> tuple[str, str]:
    """Graph input names of a linear layer's LoRA slot (A, B)."""
    names = slot_inputs(module)
    return names["A"], names["B"]


def to_numpy(t) -> np.ndarray:
    """A torch tensor as float32 numpy."""
    return t.detach().float().cpu().numpy()


@dataclass
class Graph:
    """A graph's parts in build order, and what later steps need to know about its operators."""

    np_dtype: type
    onnx_dtype: int
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    lora_nodes: list = field(default_factory=list)  # slot MatMuls: the quantizer leaves them float
    slot_ops: dict = field(default_factory=dict)  # slot operator -> PASSES or FEEDS: the base path drops them
    base_matmuls: dict = field(default_factory=dict)  # MatMul node -> torch module that reads its input
    projections: dict = field(default_factory=dict)  # MatMul node -> its projection group
    members: dict = field(default_factory=dict)  # MatMul node -> the torch modules packed in it, in column order
    # called with (node, module, group, weight [K, N]) for each base MatMul: it keeps the weight
    # (quantized) and the graph stores none; None: the weight is a float initializer
    quantizer: Callable | None = None
    external: object = None  # an onnx_external.ExternalData for the tables written as they are made

    def __post_init__(self):
        self.h = require("onnx", "export").helper
        self._consts: set[str] = set()

    def init(self, name: str, arr: np.ndarray, cast: bool = True) -> str:
        nh = require("onnx", "export").numpy_helper
        if cast:
            arr = arr.astype(self.np_dtype)
        self.inits.append(nh.from_array(np.ascontiguousarray(arr), name))
        return name

    def const(self, name: str, values) -> str:
        """An int64 constant, added once however many operators read it."""
        if name not in self._consts:
            self._consts.add(name)
            self.init(name, np.array(values, np.int64), cast=False)
        return name

    def add_input(self, name: str, elem_type: int, shape: list) -> None:
        self.inputs.append(self.h.make_tensor_value_info(name, elem_type, shape))

    def node(self, op: str, inputs: list[str], outputs: list[str] | int, name: str, domain: str = "",
             slot: str | None = None, **attrs):
        """Add an operator; `slot` (PASSES or FEEDS) marks one of a slot's operators."""
        if isinstance(outputs, int):
            outputs = [f"{name}/out{i}" for i in range(outputs)]
        self.nodes.append(self.h.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))
        if slot:
            self.slot_ops[name] = slot
            if op == "MatMul":
                self.lora_nodes.append(name)
        return outputs[0] if len(outputs) == 1 else outputs


class Projections:
    """Adds projections with their slots (of `slot_set`) to a Graph; `slots` lists them for the
    manifest, in the format adapter exporters read."""

    def __init__(self, g: Graph, slot_set: str):
        self.g, self.slot_set, self.full = g, slot_set, slot_set == "full"
        self.slots: list[dict] = []

    def linear(self, x: str, prefix: str | None, group: str, parent, members: tuple[str, ...],
               in_scale: bool = False, refine: Callable[[str, str], str] | None = None) -> str:
        """One MatMul for `members` (linear layers of `parent` that read the same input, their
        outputs concatenated), plus one LoRA slot for the whole group; with full slots also an
        output scale, an overridable bias and (in_scale) an input scale:
            y = ((x * s_in) W^T + (x * s_in) A B) * s_out + bias
        refine(x, y), if given, rewrites the base MatMul's output before the slot adds to it."""
        g = self.g
        mods = [getattr(parent, m) for m in members]
        module = f"{prefix}.{group}" if prefix else group
        name = f"/{prefix}/{group}" if prefix else f"/{group}"
        reading = getattr(g.quantizer, "reading", None)  # optional: a plain callable quantizer has none
        if reading:
            reading(group)
        # [out_total, in]; one member's weight as it is (a copy of a tied head would be as large as the table)
        w = to_numpy(mods[0].weight) if len(mods) == 1 else np.concatenate([to_numpy(m.weight) for m in mods], axis=0)
        fan_in, fan_out = w.shape[1], w.shape[0]
        has_bias = any(m.bias is not None for m in mods)
        bias = np.concatenate([to_numpy(m.bias) if m.bias is not None else np.zeros(m.weight.shape[0], np.float32)
                               for m in mods]) if has_bias else np.zeros(fan_out, np.float32)
        names = slot_inputs(module)
        slot = {"module": module, "in": int(fan_in), "out": int(fan_out), "has_bias": has_bias}
        if self.full and in_scale:
            slot["scale_in"] = self.vector(names["scale_in"], fan_in, np.ones(fan_in))
            x = g.node("Mul", [x, slot["scale_in"]], 1, f"{name}/ScaleIn", slot=PASSES)
        reads = f"{prefix}.{members[0]}" if prefix else members[0]
        if g.quantizer:
            g.quantizer(f"{name}/MatMul", reads, group, w.T)
        y = g.node("MatMul", [x, f"{module}.weight_T" if g.quantizer else g.init(f"{module}.weight_T", w.T)], 1,
                   f"{name}/MatMul")
        del w
        g.base_matmuls[f"{name}/MatMul"] = reads
        g.projections[f"{name}/MatMul"] = group
        g.members[f"{name}/MatMul"] = [f"{prefix}.{m}" if prefix else m for m in members]
        if refine:
            y = refine(x, y)
        if self.slot_set == "none":  # a base without hot-swap (merged adapters): the plain projection
            return g.node("Add", [y, g.init(f"{module}.bias", bias)], 1, f"{name}/BiasAdd") if has_bias else y
        y = g.node("Add", [y, self.lora(x, module, name, mods, slot)], 1, f"{name}/lora/Add", slot=PASSES)
        if self.full:
            slot["scale_out"] = self.vector(names["scale_out"], fan_out, np.ones(fan_out))
            y = g.node("Mul", [y, slot["scale_out"]], 1, f"{name}/ScaleOut", slot=PASSES)
            slot["bias"] = self.vector(names["bias"], fan_out, bias)
            # A base bias stays on the base path; an all-zero default is only the slot's.
            y = g.node("Add", [y, slot["bias"]], 1, f"{name}/BiasAdd", slot=None if has_bias else PASSES)
        elif has_bias:
            y = g.node("Add", [y, g.init(f"{module}.bias", bias)], 1, f"{name}/BiasAdd")
        parts, offset = [], 0
        for member, m in zip(members, mods):
            parts.append({"module": f"{prefix}.{member}" if prefix else member, "target": member,
                          "offset": offset, "out": int(m.weight.shape[0])})
            offset += int(m.weight.shape[0])
        self.slots.append({**slot, "A": names["A"], "B": names["B"], "parts": parts})
        return y

    def lora(self, x: str, module: str, name: str, mods: list, slot: dict) -> str:
        """x A B of the group's LoRA slot, with rank-0 defaults (an empty slot adds exact zeros).

        A packed group's slot is batched, so that no weight is stored for the zeros a
        block-diagonal B would hold between members: A [parts, in, r] gives one x A_p per member;
        the group's output columns are cut into equal chunks (the gcd of the members' widths),
        chunk c reading part chunks[c]; B [chunks, r, chunk]. Records the chunks in `slot`."""
        g, dt = self.g, self.g.onnx_dtype
        a_name, b_name = slot_names(module)
        rank, fan_in, fan_out = f"rank.{module}", slot["in"], slot["out"]
        if len(mods) == 1:
            g.add_input(a_name, dt, [fan_in, rank])
            g.add_input(b_name, dt, [rank, fan_out])
            g.init(a_name, np.zeros((fan_in, 0)))
            g.init(b_name, np.zeros((0, fan_out)))
            xa = g.node("MatMul", [x, a_name], 1, f"{name}/lora/MatMulA", slot=FEEDS)  # [batch, seq, r]
            xa = self.rows(xa, module, name, 3)
            return g.node("MatMul", [xa, b_name], 1, f"{name}/lora/MatMulB", slot=FEEDS)
        outs = [int(m.weight.shape[0]) for m in mods]
        chunk = math.gcd(*outs)
        chunks = [p for p, o in enumerate(outs) for _ in range(o // chunk)]
        g.add_input(a_name, dt, [len(mods), fan_in, rank])
        g.add_input(b_name, dt, [len(chunks), rank, chunk])
        g.init(a_name, np.zeros((len(mods), fan_in, 0)))
        g.init(b_name, np.zeros((len(chunks), 0, chunk)))
        # [batch, 1, seq, in] x [parts, in, r] -> [batch, parts, seq, r]: every row of a batch
        x = g.node("Unsqueeze", [x, self.axis1()], 1, f"{name}/lora/Unsqueeze", slot=FEEDS)
        xa = g.node("MatMul", [x, a_name], 1, f"{name}/lora/MatMulA", slot=FEEDS)
        xa = self.rows(xa, module, name, 4)
        if len(chunks) != len(mods):
            xa = g.node("Gather", [xa, g.init(f"{module}.lora_chunks", np.array(chunks, np.int64), cast=False)],
                        1, f"{name}/lora/Gather", slot=FEEDS, axis=1)
        xab = g.node("MatMul", [xa, b_name], 1, f"{name}/lora/MatMulB", slot=FEEDS)  # [batch, chunks, seq, chunk]
        xab = g.node("Transpose", [xab], 1, f"{name}/lora/Transpose", slot=FEEDS, perm=[0, 2, 1, 3])
        shape = g.init(f"{module}.lora_shape", np.array([0, 0, fan_out], np.int64), cast=False)
        slot.update(chunk=chunk, chunks=chunks)
        return g.node("Reshape", [xab, shape], 1, f"{name}/lora/Reshape", slot=FEEDS)

    def rows(self, xa: str, module: str, name: str, ndim: int) -> str:
        """x A times the slot's row mask (runtime_contract.row_mask): in a batch of rows on
        different adapters, the slot holds their ranks side by side and each row keeps its own
        adapter's columns only. Default ones: one adapter for the whole call."""
        mask = row_mask(module)
        self.g.add_input(mask, self.g.onnx_dtype, ["mask_batch"] + [1] * (ndim - 2) + [f"mask_rank.{module}"])
        self.g.init(mask, np.ones([1] * ndim))
        return self.g.node("Mul", [xa, mask], 1, f"{name}/lora/Rows", slot=FEEDS)

    def axis1(self) -> str:
        if not any(i.name == "const.lora_axis1" for i in self.g.inits):
            self.g.init("const.lora_axis1", np.array([1], np.int64), cast=False)
        return "const.lora_axis1"

    def embedding_slot(self, x: str, vocab: int, hidden: int) -> str:
        """Embedding LoRA (PEFT's lora_embedding_A/B): x += A[ids] B, A [vocab, r], B [r, hidden]."""
        g = self.g
        a_name, b_name = slot_names(EMBEDDING)
        g.add_input(a_name, g.onnx_dtype, [vocab, f"rank.{EMBEDDING}"])
        g.add_input(b_name, g.onnx_dtype, [f"rank.{EMBEDDING}", hidden])
        g.init(a_name, np.zeros((vocab, 0)))
        g.init(b_name, np.zeros((0, hidden)))
        xa = g.node("Gather", [a_name, INPUT_IDS], 1, "/embed/lora/GatherA", slot=FEEDS)
        xa = self.rows(xa, EMBEDDING, "/embed", 3)
        xab = g.node("MatMul", [xa, b_name], 1, "/embed/lora/MatMulB", slot=FEEDS)
        x = g.node("Add", [x, xab], 1, "/embed/lora/Add", slot=PASSES)
        self.slots.append({"module": EMBEDDING, "embedding": True, "in": int(vocab), "out": int(hidden),
                           "has_bias": False, "A": a_name, "B": b_name,
                           "parts": [{"module": EMBEDDING, "target": "embed_tokens", "offset": 0, "out": int(hidden)}]})
        return x

    def vector(self, name: str, size: int, default: np.ndarray) -> str:
        """A scale or bias slot: a graph input of `size` values whose default is `default`."""
        self.g.add_input(name, self.g.onnx_dtype, [size])
        return self.g.init(name, default)
