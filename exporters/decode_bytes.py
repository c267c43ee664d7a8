"""The weight bytes one decode step reads, per backend file: at 1B-4B a CPU decode reads every
weight once per token, so these bytes bound its speed (tokens/s x bytes = memory bandwidth).

Counted: every weight, except tables read by row (the token embedding, rotary caches), of which
a step reads the rows it gathers. Not counted: the KV cache, which grows with the context, and
the adapter, which bench reports apart.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from edgepeft.errors import require

EXACT_HEAD_GATHER = "/lm_head/exact/"  # onnx_graph's exact head gathers its top-k rows of the table


def _reads_rows(node, name: str) -> bool:
    """Whether `node` reads `name` a row at a time: a Gather's table, or GroupQueryAttention's
    rotary caches (inputs 7 and 8, read at the step's position)."""
    if node.op_type == "Gather":
        return node.input[0] == name
    return node.op_type == "GroupQueryAttention" and name in node.input[7:9]


def onnx_decode_bytes(proto, exact_head_top_k: int = 0) -> int:
    """Bytes of `proto`'s initializers that one decode step (one token) reads."""
    onnx = require("onnx", "export")
    consumers: dict[str, list] = {}

    def walk(graph):  # the base path's If branches hold most nodes: read the subgraphs too
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    walk(sub)

    walk(proto.graph)
    total = 0
    for init in proto.graph.initializer:
        size = math.prod(init.dims) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
        users = consumers.get(init.name, [])
        gathers = [n for n in users if _reads_rows(n, init.name)]
        if users and len(gathers) == len(users) and init.dims:  # a table read by row
            rows = sum(exact_head_top_k if n.name.startswith(EXACT_HEAD_GATHER) else 1 for n in gathers)
            size = min(size, size // init.dims[0] * rows)
        total += size
    return int(total)


def gguf_decode_bytes(path: Path) -> int:
    """Bytes of the GGUF's tensors that one decode step reads: token_embd by one row, unless the
    file has no output.weight (a tied head: llama.cpp reads the whole table as the head)."""
    gguf = require("gguf", "export")
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    total = 0
    for name, t in tensors.items():
        size = int(t.n_bytes)
        if name == "token_embd.weight" and "output.weight" in tensors:
            size //= int(t.shape[-1])  # gguf-py lists dims innermost first: [hidden, vocab]
        total += size
    return total
