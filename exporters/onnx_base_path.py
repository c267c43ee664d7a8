"""The base path: a decoder with slots wrapped in If(adapters_active), so that calls with no
adapter skip the slot operators.

Empty slots still cost a few small operators per projection each call, even at rank 0. The
else-branch is the same graph without them; both branches read the same outer-scope
initializers, so each weight is stored and prepacked once. Why an If and not a second session:
a second onnxruntime session would load and prepack its own copy of every weight.
"""

from __future__ import annotations

import numpy as np

from edgepeft.errors import require
from edgepeft.runtime_contract import ADAPTERS_ACTIVE, PATH_TAGS, tagged

# How onnx_graph marks a slot operator in info["slot_ops"]: with the slot empty, its output is its
# first input ("passes"), or it only feeds other slot operators ("feeds").
PASSES, FEEDS = "passes", "feeds"


def add_base_path(proto, info: dict):
    """Return `proto` (a decoder with slots, quantized or not) as If(adapters_active): the
    then-branch is the graph as built, the else-branch the same graph without its slot operators
    (info["slot_ops"]), for calls with no adapter active; the operators in info["prelude"] stay
    outside, shared by both. The If adds one Cast and one If per call.

    Slot adapters set the flag (their files carry it as 1, see
    edgepeft.runtime_contract.ADAPTERS_ACTIVE); prompt-learning adapters only fill the KV cache
    and run the base path. Sets info["base_path"], which the manifest records (adapter files
    for such a base carry the flag)."""
    onnx = require("onnx", "export")
    h, TP = onnx.helper, onnx.TensorProto
    g = proto.graph
    outputs = [o.name for o in g.output]
    shared = set(info["prelude"])
    prelude = [n for n in g.node if n.name in shared]
    body = [n for n in g.node if n.name not in shared]
    slots, base = PATH_TAGS["then_branch"], PATH_TAGS["else_branch"]

    g.input.append(h.make_tensor_value_info(ADAPTERS_ACTIVE, TP.FLOAT, [1]))
    g.initializer.append(onnx.numpy_helper.from_array(np.zeros(1, np.float32), ADAPTERS_ACTIVE))
    cond = h.make_node("Cast", [ADAPTERS_ACTIVE], ["/adapters/active"], name="/adapters/Cast", to=TP.BOOL)
    choose = h.make_node("If", ["/adapters/active"], outputs, name="/adapters/If",
                         then_branch=_branch(onnx, g, body, slots, strip={}),
                         else_branch=_branch(onnx, g, body, base, strip=info["slot_ops"]))
    del g.node[:]
    g.node.extend(prelude + [cond, choose])
    info["base_path"] = True
    return proto


def _branch(onnx, g, body: list, tag: str, strip: dict):
    """The subgraph of `body` without the operators in `strip` ({node name: PASSES or FEEDS}),
    each name tagged with `tag`."""
    nodes, alias = [], {}
    for n in body:
        if n.name not in strip:
            nodes.append(onnx.NodeProto.FromString(n.SerializeToString()))
        elif strip[n.name] == PASSES:
            alias[n.output[0]] = n.input[0]
    resolve = lambda v: resolve(alias[v]) if v in alias else v  # noqa: E731
    for n in nodes:
        n.input[:] = [resolve(v) for v in n.input]
    for out in (o.name for o in g.output):  # a graph output written by a dropped operator: its producer writes it
        if out in alias:
            src = resolve(out)
            for n in nodes:
                n.input[:] = [out if v == src else v for v in n.input]
                n.output[:] = [out if v == src else v for v in n.output]
    produced = {v for n in nodes for v in n.output if v}
    rename = {v: tagged(tag, v) for v in produced}  # subgraph values may not shadow the outer graph's
    for n in nodes:
        n.name = tagged(tag, n.name)
        n.input[:] = [rename.get(v, v) for v in n.input]
        n.output[:] = [rename.get(v, v) for v in n.output]
    outs = [onnx.helper.make_tensor_value_info(rename[o.name], o.type.tensor_type.elem_type, None) for o in g.output]
    return onnx.helper.make_graph(nodes, f"{tag}_path", [], outs)
