"""The backend contract (runtime/backend.py): both backends and their states implement it, the
Engine runs on a backend that implements only its required methods, and a state that can drop
its last tokens gives what a fresh state gives."""

import numpy as np
import pytest

from edgepeft.errors import EngineError
from edgepeft.runtime import Engine
from edgepeft.runtime.backend import Backend, Batcher, SequenceState

VOCAB = 7


class Countdown(SequenceState):
    """A state whose next-token logits point at (last token + 1) % VOCAB."""

    def __init__(self, max_len: int):
        self.max_len, self.length, self.closed = max_len, 0, False

    def forward(self, ids, all_logits=False):
        if self.length + len(ids) > self.max_len:
            raise EngineError("full")
        self.length += len(ids)
        rows = [np.eye(VOCAB, dtype=np.float32)[(t + 1) % VOCAB] for t in ids]
        return np.stack(rows if all_logits else rows[-1:])

    def reset(self):
        self.length = 0

    def close(self):
        self.closed = True


class Minimal(Backend):
    """Only what the contract requires; every capability keeps its default."""

    name, context_length, parallel, device, providers = "onnx", 64, 4, "cpu", ["test"]

    def __init__(self):
        self.states = []

    def load_adapter(self, path):
        raise AssertionError("not used")

    def combine(self, adapters, names):
        raise AssertionError("not used")

    def open_sequence(self, adapter, max_len):
        self.states.append(Countdown(max_len))
        return self.states[-1]

    def switch_to(self, adapter):
        pass


@pytest.fixture(scope="module", params=["onnx", "gguf"])
def engine(llama_bundle, request):
    return Engine.open(llama_bundle.root, backend=request.param, threads=1)


def test_both_backends_and_their_states_implement_the_contract(engine):
    be = engine.backend
    assert isinstance(be, Backend) and be.can_batch(None)
    with be.open_sequence(engine.adapter_handle("qv"), 8) as seq:
        assert isinstance(seq, SequenceState) and seq.length == 0
    batcher = be.batcher()
    try:
        assert isinstance(batcher, Batcher) and isinstance(batcher.open_row(None, 8), SequenceState)
    finally:
        batcher.close()


def test_the_engine_runs_on_a_backend_with_only_the_required_methods(llama_bundle):
    backend = Minimal()
    engine = Engine(llama_bundle, backend, load_seconds=0.0)
    assert engine.device_note is None and engine.virtual_tokens(None) == 0
    out = engine.complete([3], max_new_tokens=5, ignore_eos=True)
    assert out.tokens == [4, 5, 6, 0, 1] and out.stop_reason == "length"
    assert [t for p in engine.stream_pieces([3], max_new_tokens=3, ignore_eos=True) for t in p.token_ids] == [4, 5, 6]
    assert engine.score([1, 2]).argmax(-1).tolist() == [2, 3]
    assert all(s.closed for s in backend.states)  # every call closed the state it opened
    with pytest.raises(EngineError, match="does not batch"):
        backend.batcher()
    with pytest.raises(EngineError, match="cannot drop"):
        backend.states[0].trim(1)
    assert not backend.states[0].can_trim()


def test_a_trimmed_state_continues_as_a_fresh_one(engine):
    """Drop the last tokens, run others: the logits equal a state that never ran the dropped ones."""
    be, handle = engine.backend, engine.adapter_handle("all")
    ids, other = [5, 17, 99, 3, 42, 8], [61, 7]
    with be.open_sequence(handle, 16) as fresh:
        want = fresh.forward(ids[:4] + other, all_logits=True)[-len(other):].copy()
    with be.open_sequence(handle, 16) as seq:
        seq.forward(ids)
        assert seq.can_trim()
        seq.trim(2)
        assert seq.length == 4
        got = seq.forward(other, all_logits=True)
        with pytest.raises(EngineError):
            seq.trim(7)
    assert np.abs(got - want).max() < 1e-4
    batcher = be.batcher()
    try:
        row = batcher.open_row(handle, 16)
        row.forward(ids)
        row.trim(2)
        assert np.abs(row.forward(other, all_logits=True) - want).max() < 1e-4
    finally:
        batcher.close()


def test_a_reset_state_runs_from_its_start(engine):
    be = engine.backend
    with be.open_sequence(None, 16) as seq:
        first = seq.forward([5, 17, 99])[-1].copy()
        seq.forward([1, 2])
        seq.reset()
        assert seq.length == 0
        assert np.abs(seq.forward([5, 17, 99])[-1] - first).max() < 1e-4
