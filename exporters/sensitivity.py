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

Activations are not rounded to int8 here, although accuracy_level 4 computes that way: what
matters is the ranking, and a simulation that did round them matched the real bundles closely
(docs/experiments.md).

Torch is what the exporter already has; onnxruntime has no per-tensor sensitivity tool, and its
mixed-precision quantizers pick by rule, not by measurement.
"""
from __future__ import annotations

import numpy as np

from edgepeft.errors import require

from .calibration import _token_batches
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
    (a head the exact head recomputes). Use as a context manager: the model's weights are restored
    on exit."""

    def __init__(self, base, info: dict, blocks: dict[str, tuple], weights: dict[str, np.ndarray],
                 block_size: int, frozen: set[str] = frozenset()):
        self.torch = torch = require("torch", "export")
        self.model, self.members, self.block_size = base.model, info["members"], block_size
        self.weights = weights
        self.nodes = [n for n in blocks if n not in frozen]
        self.four = {n: self._split(n, dequantize_int4(*blocks[n], weights[n].shape[0])) for n in self.nodes}
        self._eight: dict[str, dict] = {}
        self.originals = {path: self.model.get_submodule(path).weight.data for n in self.nodes
                          for path in self.members[n]}
        # One sequence at a time: a batch of them would hold batch x length x vocab logits (Gemma's
        # vocabulary is 262k), and padding would need masking. References in fp16 above 64k tokens.
        self.ids = [torch.tensor([x]) for x in _token_batches(base, int(base.dims["vocab_size"]))]
        ref_dtype = torch.float16 if base.dims["vocab_size"] > 65536 else torch.float32
        with torch.no_grad():
            self.refs = [torch.log_softmax(self.model(input_ids=x).logits[0].float(), -1).to(ref_dtype)
                         for x in self.ids]
        self.current: set[str] = set()
        self._put_all(set())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for path, t in self.originals.items():
            self.model.get_submodule(path).weight.data = t

    def _split(self, node: str, w_kn: np.ndarray) -> dict:
        """The node's weight [K, N] cut back into its torch modules' weights [out, in]."""
        out, offset = {}, 0
        for path in self.members[node]:
            mod = self.model.get_submodule(path)
            rows = mod.weight.shape[0]
            out[path] = self.torch.from_numpy(np.ascontiguousarray(w_kn[:, offset:offset + rows].T)).to(mod.weight.dtype)
            offset += rows
        return out

    def _put(self, node: str, eight: bool) -> None:
        if eight and node not in self._eight:
            self._eight[node] = self._split(node, rtn_8bit(self.weights[node], self.block_size))
        for path, t in (self._eight[node] if eight else self.four[node]).items():
            self.model.get_submodule(path).weight.data = t

    def _put_all(self, eight_bit: set[str]) -> None:
        for n in self.nodes:
            self._put(n, n in eight_bit)
        self.current = set(eight_bit)

    def kl(self, eight_bit: set[str]) -> float:
        """Mean KL(float || mix) over the calibration positions, with `eight_bit` at 8 bits and the
        other MatMuls at 4."""
        torch = self.torch
        for n in self.current ^ set(eight_bit):
            self._put(n, n in eight_bit)
        self.current = set(eight_bit)
        total, count = 0.0, 0
        with torch.no_grad():
            for x, ref in zip(self.ids, self.refs):
                logp = torch.log_softmax(self.model(input_ids=x).logits[0].float(), -1)
                r = ref.float()
                total += float((r.exp() * (r - logp)).sum())
                count += x.shape[1]
        return total / max(1, count)


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
