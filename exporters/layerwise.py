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
reimplemented here. Each sequence runs alone (batch 1), so each layer computes exactly what the
whole model computes for that sequence.
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


class Layerwise:
    """The base's decoder layers run layer-major over `sequences` (token id lists).

    After construction, `hidden` holds each sequence's input to the first layer; run() takes them
    through every layer; normed() gives the final norm of the result (what the head reads)."""

    def __init__(self, base, sequences: list[list[int]]):
        self.torch = torch = require("torch", "export")
        self.base, self.inner = base, base.model.model
        self.layers = list(self.inner.layers[: base.config.num_hidden_layers])
        self.hidden: list = []
        self.calls: list[list[tuple]] = []

        def capture(i, hidden_states, *args, **kwargs):
            if i == 0:
                self.hidden.append(hidden_states)
            self.calls[-1].append((args, kwargs))
            return hidden_states

        with torch.no_grad(), materialized(base, *_outer(self.inner)), _forwards(self.layers, capture):
            for ids in sequences:
                self.calls.append([])
                self.inner(input_ids=torch.tensor([ids]), use_cache=False)

    def run(self, progress=QUIET, weights=None) -> None:
        """Every sequence through every decoder layer, one layer in memory at a time. `weights`
        (optional) is a context manager factory weights(index, layer) entered around each layer
        once it is materialized (the sensitivity search swaps in rounded weights there)."""
        for i, layer in enumerate(progress.items(self.layers, unit="layers")):
            with self.torch.no_grad(), materialized(self.base, layer):
                with weights(i, layer) if weights else _nothing():
                    self.hidden = [self._call(layer, h, *self.calls[t][i]) for t, h in enumerate(self.hidden)]

    @staticmethod
    def _call(layer, hidden, args, kwargs):
        out = layer(hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out  # transformers 4.x layers return tuples

    def normed(self) -> list:
        """Each sequence's last hidden state after the model's final norm: the head's input. The
        model's own forward applies it, with the layers standing in for what run() computed."""
        torch, done = self.torch, iter(self.hidden)
        embedding = self.inner.get_input_embeddings()
        out = []
        with torch.no_grad(), materialized(self.base, *_outer(self.inner, skip=[embedding])), \
                _forwards(self.layers, lambda i, h, *a, **k: next(done) if i == 0 else h):
            for h in self.hidden:
                out.append(self.inner(inputs_embeds=torch.zeros_like(h), use_cache=False).last_hidden_state)
        return out


@contextmanager
def _nothing():
    yield
