"""Run a base one decoder layer at a time over several sequences, as layer-wise quantizers (GPTQ,
AutoRound) calibrate: every sequence is embedded, then each decoder layer is materialized once
(float32, checkpoint.materialized), every sequence goes through it, its outputs become the next
layer's inputs, and the layer's weights are dropped. Peak memory: one layer's weights and the
sequences' hidden states, where running the model sequence by sequence would read every weight
once per sequence.

The layers themselves are Hugging Face's modules, called with the arguments the model's own
forward gives them (rotary position embeddings, the causal or sliding-window mask of the layer's
kind, Gemma's scaled embedding): those are captured by running the model's forward once per
sequence with each layer's forward replaced by a recorder, so no family's details are
reimplemented here.
"""

from __future__ import annotations

from contextlib import contextmanager

from edgepeft.errors import require

from .checkpoint import materialized
from .progress import QUIET


@contextmanager
def _forwards(layers, fn):
    """Each layer's forward replaced by fn(index, hidden_states, *args, **kwargs) for the duration."""
    for i, layer in enumerate(layers):
        layer.forward = (lambda i_: lambda *a, **k: fn(i_, *a, **k))(i)
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


def _outer(inner, skip=()) -> list:
    """The inner model's modules outside its decoder layers (embedding, final norm, rotary)."""
    return [m for name, m in inner.named_children() if name != "layers" and all(m is not s for s in skip)]


def _batches(inner, sequences: list[list[int]]) -> list[list[int]]:
    """Indices of `sequences` run together: all of them in one batch, unless the rotary embedding
    depends on the batch's length (LongRoPE's switch to its long factors, dynamic NTK scaling),
    where only sequences of the same length share a batch, so each gets its own rotation."""
    types = getattr(getattr(inner, "rotary_emb", None), "rope_type", "default")
    types = types.values() if isinstance(types, dict) else [types]
    if not any(t == "longrope" or "dynamic" in str(t) for t in types):
        return [list(range(len(sequences)))] if sequences else []
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(sequences):
        by_length.setdefault(len(ids), []).append(i)
    return list(by_length.values())


class Layerwise:
    """The base's decoder layers run layer-major over `sequences` (token id lists).

    The sequences run as one batch, padded on the right, with the attention mask the model's own
    forward makes of the padding (causal, sliding window): a real position attends to the same
    positions as it would alone, so its activations are the unbatched ones up to the float rounding
    of a larger matrix product. The built-in calibration text is short: one batch holds it.

    After construction, `hidden` holds each batch's input to the first layer; run() takes them
    through every layer; normed() gives the final norm of the result (what the head reads).
    rows(x) keeps the real positions of an activation of the batch being run."""

    def __init__(self, base, sequences: list[list[int]]):
        self.torch = torch = require("torch", "export")
        self.base, self.inner = base, base.model.model
        self.layers = list(self.inner.layers[: base.config.num_hidden_layers])
        self.hidden: list = []
        self.calls: list[list[tuple]] = []
        self.valid: list = []
        self.at = 0

        def capture(i, hidden_states, *args, **kwargs):
            if i == 0:
                self.hidden.append(hidden_states)
            self.calls[-1].append((args, kwargs))
            return hidden_states

        embedding = self.inner.get_input_embeddings()
        with torch.no_grad(), materialized(base, *_outer(self.inner, skip=[embedding])), \
                _forwards(self.layers, capture):
            for group in _batches(self.inner, sequences):
                seqs = [sequences[i] for i in group]
                width = max(map(len, seqs))
                valid = torch.tensor([[j < len(s) for j in range(width)] for s in seqs])
                ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])  # padding: any id, masked
                self.valid.append(valid)
                self.calls.append([])
                self.inner(inputs_embeds=self._embed(embedding, ids), attention_mask=valid.long(), use_cache=False)

    def _embed(self, embedding, ids):
        """embedding(ids), the embedding module's own forward (Gemma's scale included), given only
        the rows `ids` use: read from the memory-mapped checkpoint and upcast, rather than the
        whole table in float32 (the largest tensor of a small model)."""
        torch = self.torch
        if self.base.tensors is None:
            return embedding(ids)
        used, local = torch.unique(ids, return_inverse=True)
        name = next(n for n, m in self.base.model.named_modules() if m is embedding)
        rows = self.base.stored(f"{name}.weight")[used].float()
        saved, pad = embedding._parameters["weight"], getattr(embedding, "padding_idx", None)
        embedding._parameters["weight"] = torch.nn.Parameter(rows, requires_grad=False)
        embedding.padding_idx = None  # an index into the whole table (it only affects gradients)
        try:
            return embedding(local)
        finally:
            embedding._parameters["weight"], embedding.padding_idx = saved, pad

    def rows(self, x):
        """Activation x [batch, length, features] of the batch being run: its real positions'
        rows [positions, features], sequence by sequence."""
        return x[self.valid[self.at]]

    def run(self, progress=QUIET, weights=None) -> None:
        """Every sequence through every decoder layer, one layer in memory at a time. `weights`
        (optional) is a context manager factory weights(index, layer) entered around each layer
        once it is materialized (the sensitivity search swaps in rounded weights there)."""
        for i, layer in enumerate(progress.items(self.layers, unit="layers")):
            with self.torch.no_grad(), materialized(self.base, layer):
                with weights(i, layer) if weights else _nothing():
                    for b, h in enumerate(self.hidden):
                        self.at = b
                        self.hidden[b] = self._call(layer, h, *self.calls[b][i])

    @staticmethod
    def _call(layer, hidden, args, kwargs):
        out = layer(hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out  # transformers 4.x layers return tuples

    def normed(self) -> list:
        """Each batch's last hidden states after the model's final norm, the head's input, as rows
        [positions, hidden] of its real positions. The model's own forward applies the norm, with
        the layers standing in for what run() computed."""
        torch, done = self.torch, iter(self.hidden)
        embedding = self.inner.get_input_embeddings()
        out = []
        with torch.no_grad(), materialized(self.base, *_outer(self.inner, skip=[embedding])), \
                _forwards(self.layers, lambda i, h, *a, **k: next(done) if i == 0 else h):
            for b, (h, valid) in enumerate(zip(self.hidden, self.valid)):
                self.at = b
                last = self.inner(inputs_embeds=torch.zeros_like(h), attention_mask=valid.long(), use_cache=False)
                out.append(self.rows(last.last_hidden_state))
        return out


@contextmanager
def _nothing():
    yield
