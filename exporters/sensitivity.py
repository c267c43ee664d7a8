"""Which MatMuls int4 keeps at 8 bits, by measured sensitivity.

A fixed list of 8-bit tensors (llama.cpp's Q4_K_M widens v and down) spends width where it buys
little: most tensors gain almost nothing from 8 bits and a few gain most (docs/experiments.md
has the measurements). So the export measures it. The float model runs teacher-forced over the
built-in calibration text (calibration.py; never verify's or the task checks' prompts) with
every base MatMul at its 4-bit rounding, which gives KL(float || all 4-bit). Then each candidate
in turn is put back at 8 bits; the KL it saves is its gain. Candidates are ranked by gain per
extra byte, and the shortest prefix of that ranking whose mix, measured the same way, reaches
the target (`--int4-target-kl`) stays at 8 bits: gains measured alone do not add up, so the mix
itself is measured. A head that the exact head recomputes stays float in the simulation and
4-bit in the graph: it is not a candidate.

Each measurement runs the base a decoder layer at a time over every calibration text at once
(layerwise.py), so a base whose weights stay in its checkpoint is measured without holding the
float32 model.

Activations are not rounded to int8 here, although accuracy_level 4 computes that way: what
matters is the ranking, and a simulation that did round them matched the real bundles closely
(docs/experiments.md).

Torch is what the exporter already has; onnxruntime has no per-tensor sensitivity tool, and its
mixed-precision quantizers pick by rule, not by measurement.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from edgepeft.errors import require

from .calibration import _token_batches
from .checkpoint import materialized
from .layerwise import Layerwise
from .onnx_quant import dequantize_int4, rtn_8bit

# A calibration KL to aim at (`--int4-target-kl`): candidates are added in order of gain per extra
# byte until the mix's measured KL is at most it. The default sits just above the KL the fixed
# 8-bit groups reach on the built-in base (figures in docs/experiments.md): a search given no target
# keeps about their fidelity.
EIGHT_BIT_KL = 0.09


class Simulation:
    """The float model with its base MatMuls at their int4 rounding (`blocks`, as importance_blocks
    makes them), scored teacher-forced on the calibration text against the float model itself.
    `weights` are the graph's float weights [K, N] by MatMul node; MatMuls in `frozen` stay float
    (a head the exact head recomputes).

    Each measurement runs the base a decoder layer at a time over every calibration text
    (layerwise.py): the layer's float weights are read once, its MatMuls' rounded weights are
    dequantized into it, the texts go through, and all of it is dropped. The base may be lazy
    (its weights in the checkpoint) or loaded whole: its weights are what they were after each
    measurement. Use as a context manager (nothing is left to restore on exit)."""

    def __init__(self, base, info: dict, blocks: dict[str, tuple], weights: dict[str, np.ndarray],
                 block_size: int, frozen: set[str] = frozenset()):
        self.torch = torch = require("torch", "export")
        self.base, self.model, self.members, self.block_size = base, base.model, info["members"], block_size
        self.weights, self.blocks = weights, blocks
        self.nodes = [n for n in blocks if n not in frozen]
        paths = {id(m): name for name, m in self.model.named_modules()}
        self.head = self.model.get_output_embeddings()
        units = [paths[id(layer)] for layer in self.model.model.layers] + [paths[id(self.head)]]
        self.by_unit = {u: [n for n in self.nodes if self.members[n][0] == u or self.members[n][0].startswith(u + ".")]
                        for u in units}
        self.paths = paths
        self.run = Layerwise(base, _token_batches(base, int(base.dims["vocab_size"])))
        self.start = list(self.run.hidden)
        # References in fp16 above 64k tokens (Gemma's vocabulary is 262k): positions x vocabulary.
        ref_dtype = torch.float16 if base.dims["vocab_size"] > 65536 else torch.float32
        self.refs: list[list] = []

        def keep(b, j, logp):
            if j == 0:
                self.refs.append([])
            self.refs[b].append(logp.to(ref_dtype))

        self._log_probs(None, keep)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def _split(self, node: str, w_kn: np.ndarray) -> dict:
        """The node's weight [K, N] cut back into its torch modules' weights [out, in]."""
        out, offset = {}, 0
        for path in self.members[node]:
            mod = self.model.get_submodule(path)
            rows = mod.weight.shape[0]
            out[path] = self.torch.from_numpy(np.ascontiguousarray(w_kn[:, offset:offset + rows].T)).to(mod.weight.dtype)
            offset += rows
        return out

    def _rounded(self, node: str, eight: bool) -> dict:
        w = self.weights[node]
        return self._split(node, rtn_8bit(w, self.block_size) if eight else dequantize_int4(*self.blocks[node], w.shape[0]))

    @contextmanager
    def _mix(self, unit, eight_bit):
        """The MatMuls of `unit` (a decoder layer or the head, materialized) at their rounding."""
        saved = []
        for node in (self.by_unit[self.paths[id(unit)]] if eight_bit is not None else ()):
            for path, t in self._rounded(node, node in eight_bit).items():
                mod = self.model.get_submodule(path)
                saved.append((mod, mod.weight.data))
                mod.weight.data = t
        try:
            yield
        finally:
            for mod, t in reversed(saved):
                mod.weight.data = t

    def _log_probs(self, eight_bit: set[str] | None, consume, chunk: int = 256) -> None:
        """consume(batch, part, log-probabilities) for each batch's real positions, in parts of
        `chunk` rows, the model run with `eight_bit` at 8 bits and the other MatMuls at 4 (None:
        the float model). Parts, because positions x vocabulary is large (Gemma's is 262k)."""
        torch = self.torch
        self.run.hidden = list(self.start)
        self.run.run(weights=lambda _i, layer: self._mix(layer, eight_bit))
        cap = getattr(self.base.config, "final_logit_softcapping", None)
        with torch.no_grad(), materialized(self.base, self.head), self._mix(self.head, eight_bit):
            for b, rows in enumerate(self.run.normed()):
                for j, part in enumerate(rows.split(chunk)):
                    # what the causal LM's forward does after its inner model: the head, then
                    # Gemma 2's (and 3's, when set) final soft-cap
                    z = self.head(part)
                    if cap:
                        z = torch.tanh(z / cap) * cap
                    consume(b, j, torch.log_softmax(z.float(), -1))

    def kl(self, eight_bit: set[str]) -> float:
        """Mean KL(float || mix) over the calibration positions, with `eight_bit` at 8 bits and the
        other MatMuls at 4."""
        acc = [0.0, 0]

        def add(b, j, logp):
            r = self.refs[b][j].float()
            acc[0] += float((r.exp() * (r - logp)).sum())
            acc[1] += r.shape[0]

        self._log_probs(set(eight_bit), add)
        return acc[0] / max(1, acc[1])


def choose(sim: Simulation, candidates: list[str], extra_bytes: dict[str, int],
           target: float = EIGHT_BIT_KL) -> tuple[list[str], dict]:
    """int4's 8-bit MatMuls and what was measured: each candidate's gain alone (KL with every MatMul
    at 4 bits minus KL with that one at 8), then the shortest prefix of the candidates, by gain per
    extra byte, whose mix measures at most `target` (bisected: the KL falls as the prefix grows)."""
    kl_4bit = sim.kl(set())
    if kl_4bit <= target:  # every MatMul at 4 bits is close enough: nothing to measure
        return [], {"kl_4bit": kl_4bit, "kl_mix": kl_4bit, "gains": {}}
    gains = {n: kl_4bit - sim.kl({n}) for n in candidates}
    order = [n for n in sorted(candidates, key=lambda n: gains[n] / max(1, extra_bytes[n]), reverse=True)
             if gains[n] > 0]
    measured = {0: kl_4bit}
    if order:
        lo, hi = 0, len(order)  # kl(order[:lo]) > target; kl(order[:hi]) <= target, or hi is all of them
        measured[hi] = sim.kl(set(order))
        while hi - lo > 1:
            mid = (lo + hi) // 2
            measured[mid] = sim.kl(set(order[:mid]))
            lo, hi = (lo, mid) if measured[mid] <= target else (mid, hi)
        chosen = order[:hi]
    else:
        chosen = []
    return chosen, {"kl_4bit": kl_4bit, "kl_mix": measured[len(chosen)], "gains": gains}
