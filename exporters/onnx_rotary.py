"""The decoder's rotary tables, from the model's own rotary modules.

Every rope variant transformers implements (llama3, linear, dynamic at load, yarn) comes out
exactly as in PyTorch because the tables are the module's output, not a re-derivation. Per
family (exporters/archs): one "global" table, plus a "local" one for families whose
sliding-window layers rotate with their own base (Gemma 3's rotary_emb_local); partial rotary
(Phi-4-mini) keeps the first rotary_dim/2 frequencies, which GroupQueryAttention reads as the
rotary width.

LongRoPE (Phi-3.5 / Phi-4-mini): transformers rotates with the short factors while a sequence
fits the original context and with the long ones once it is longer, deciding on each forward
from the longest position (the cache keeps what earlier steps rotated). The graph holds both
tables stacked and gathers one per call from the total length, which is the same decision. At the step where a generation first passes the original context,
transformers also recomputes the whole cache with the long factors (Phi3ForCausalLM's
prepare_inputs_for_generation); the manifest records that point (backends.onnx.longrope_switch)
and the runtime re-runs the sequence there too.
"""

from __future__ import annotations

import numpy as np

from edgepeft.errors import UnsupportedModel

from .hf_config import FULL, SLIDING, rotary_call
from .onnx_slots import Graph, to_numpy


def _table(torch, module, positions: int, half: int) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        pos = torch.arange(positions).unsqueeze(0)
        cos, sin = module(torch.zeros(1, dtype=torch.float32), pos)
    return to_numpy(cos[0, :, :half]), to_numpy(sin[0, :, :half])


def add_rotary_tables(g: Graph, torch, model, needed: dict[str, int], ctx: int,
                      total: str) -> tuple[dict[str, tuple[str, str]], list[str], int | None]:
    """Initializers (and, for LongRoPE, the operators choosing between two tables) for each
    table in `needed` ({"global" or "local": its rotary width}). Returns {table: (cos, sin)}, the
    names of the operators added, which run before the base path's If (they read only the total
    length), and the LongRoPE switch point (the original context) or None."""
    out, ops, switch = {}, [], None
    for key in sorted(needed):
        half = needed[key] // 2
        module = rotary_call(model, FULL if key == "global" else SLIDING)
        if module is None:
            raise UnsupportedModel(f"{type(model).__name__} has no rotary table for its sliding-window layers")
        prefix = "rotary" if key == "global" else f"rotary.{key}"
        rotary = model.model.rotary_emb
        config = getattr(rotary, "config", None)
        original = getattr(config, "original_max_position_embeddings", None) or getattr(
            config, "max_position_embeddings", None)  # transformers' own fallback
        if key != "global" or getattr(rotary, "rope_type", None) != "longrope" or original is None or ctx <= original:
            cos, sin = _table(torch, module, ctx, half)
            out[key] = (g.init(f"{prefix}.cos_cache", cos), g.init(f"{prefix}.sin_cache", sin))
            continue
        long_cos, long_sin = _table(torch, module, ctx, half)  # ctx > original: the long factors
        short_cos, short_sin = _table(torch, module, original, half)
        # Rows past the original context of the short table are never read (those positions
        # only occur once the long table is chosen); they repeat the long rows.
        short_cos = np.concatenate([short_cos, long_cos[original:]])
        short_sin = np.concatenate([short_sin, long_sin[original:]])
        limit = g.init(f"{prefix}.original_context", np.array(original, np.int32), cast=False)
        first = len(g.nodes)
        longer = g.node("Greater", [total, limit], 1, f"/{prefix}/Greater")
        which = g.node("Cast", [longer], 1, f"/{prefix}/Cast", to=7)  # int64 index: 0 short, 1 long
        axis0 = g.init(f"{prefix}.axis0", np.array([0], np.int64), cast=False)
        which = g.node("Squeeze", [which, axis0], 1, f"/{prefix}/Squeeze")  # a scalar index keeps [ctx, half]
        names = []
        for part, short, long in (("cos", short_cos, long_cos), ("sin", short_sin, long_sin)):
            both = g.init(f"{prefix}.{part}_caches", np.stack([short, long]))
            names.append(g.node("Gather", [both, which], 1, f"/{prefix}/{part}/Gather", axis=0))
        out[key] = (names[0], names[1])
        ops += [n.name for n in g.nodes[first:]]
        switch = int(original)
    return out, ops, switch
