"""What a server needs from the Engine: typed stream pieces (text, token ids, finish reason,
usage), stop strings, a stream that frees its sequence when closed, and calls that never wait on
another call's open stream."""

from __future__ import annotations

import threading

import pytest

from edgepeft.errors import InvalidArgument
from edgepeft.runtime import Engine
from edgepeft.runtime import StreamPiece
from edgepeft.runtime.generate import StopStrings


@pytest.fixture(scope="module", params=["onnx", "gguf"])
def engine(llama_bundle, request):
    return Engine.open(llama_bundle.root, backend=request.param)


def test_pieces_carry_the_ids_and_end_with_finish_reason_and_usage(engine):
    want = engine.complete("the weather", adapter="qv", max_new_tokens=20)
    pieces = list(engine.stream_pieces("the weather", adapter="qv", max_new_tokens=20))
    assert all(isinstance(p, StreamPiece) for p in pieces)
    assert [t for p in pieces for t in p.token_ids] == want.tokens
    assert "".join(p.text for p in pieces) == want.text
    assert [p.finish_reason for p in pieces[:-1]] == [None] * (len(pieces) - 1)
    assert pieces[-1].finish_reason == want.stop_reason
    assert pieces[-1].usage.prompt_tokens == want.prompt_tokens
    assert pieces[-1].usage.completion_tokens == len(want.tokens)
    assert all(p.usage is None for p in pieces[:-1])


def test_token_ids_as_the_prompt_run_those_ids(engine):
    ids = engine.encode_prompt("the weather")
    assert engine.generate(ids, adapter="all", max_new_tokens=8) == engine.generate("the weather", adapter="all",
                                                                                    max_new_tokens=8)


def test_a_stop_string_ends_the_text_before_it_in_every_api(engine):
    full = engine.generate("the weather", adapter="all", max_new_tokens=40)
    stop = next(full[i:i + 3] for i in range(5, len(full) - 3) if full[i:i + 3].strip())
    cut = full[: full.index(stop)]
    result = engine.complete("the weather", adapter="all", max_new_tokens=40, stop=[stop])
    assert (result.text, result.stop_reason) == (cut, "stop")
    assert len(result.tokens) < 40
    assert "".join(engine.stream("the weather", adapter="all", max_new_tokens=40, stop=stop)) == cut
    pieces = list(engine.stream_pieces("the weather", adapter="all", max_new_tokens=40, stop=["\x00", stop]))
    assert "".join(p.text for p in pieces) == cut and pieces[-1].finish_reason == "stop"
    # A stop string that never appears changes nothing.
    assert engine.generate("the weather", adapter="all", max_new_tokens=40, stop="\x00\x00") == full


@pytest.mark.parametrize("pieces, stops, out", [
    (["hel", "lo wor", "ld"], ["lo w"], ("hel", True)),
    (["ab", "c", "d"], ["cd"], ("ab", True)),          # across pieces: "c" held back
    (["ab", "c", "e"], ["cd"], ("abce", False)),       # held back, then released
    (["xSTO", "P"], ["STOP", "TOPS"], ("x", True)),
    (["a", "b"], [], ("ab", False)),
])
def test_stop_strings_hold_back_only_what_could_start_one(pieces, stops, out):
    cut, text, hit = StopStrings(stops), "", False
    for p in pieces:
        emitted, hit = cut.push(p)
        text += emitted
        if hit:
            break
    if not hit:
        text += cut.flush()
    assert (text, hit) == out


@pytest.mark.parametrize("stop", [3, ["a", 1], ["s"] * 17])
def test_bad_stop_values_are_refused(engine, stop):
    with pytest.raises(InvalidArgument):
        engine.generate("x", stop=stop)


def _in_thread(fn, timeout=120):
    """fn() in a thread: its result, or None if it did not finish in `timeout` seconds."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(timeout)
    return out[0] if out else None


def test_an_open_stream_does_not_block_another_call(engine):
    """A stream held open between tokens (a slow or gone client) holds no lock other calls need."""
    want = engine.generate("other", adapter="mixed", max_new_tokens=6)
    stream = engine.stream_pieces("the weather", adapter="qv", max_new_tokens=50)
    next(stream)  # its sequence is live now
    assert _in_thread(lambda: engine.generate("other", adapter="mixed", max_new_tokens=6)) == want
    stream.close()


def test_a_closed_stream_frees_its_sequence(llama_bundle):
    """With one llama.cpp context, a call can run only if the closed stream gave it back."""
    engine = Engine.open(llama_bundle.root, backend="gguf", parallel=1)
    want = engine.generate("other", max_new_tokens=6)
    for close in (lambda s: s.close(), lambda s: None):  # closed, or dropped (garbage)
        stream = engine.stream_pieces("the weather", adapter="qv", max_new_tokens=50)
        next(stream)
        close(stream)
        del stream
        assert _in_thread(lambda: engine.generate("other", max_new_tokens=6)) == want


def test_gguf_calls_beyond_parallel_wait_their_turn(llama_bundle, monkeypatch):
    """parallel=1: a second call waits until the first one's row has left the batch (the
    scheduler runs at most `parallel` rows), then runs and gives its own output."""
    from edgepeft.runtime.gguf_batch import GgufBatcher

    widths, real = [], GgufBatcher.step
    monkeypatch.setattr(GgufBatcher, "step", lambda self, rows, tokens: widths.append(len(rows)) or real(self, rows, tokens))
    want = Engine.open(llama_bundle.root, backend="gguf", batching=False).generate("other", max_new_tokens=6)
    engine = Engine.open(llama_bundle.root, backend="gguf", parallel=1)
    stream = engine.stream_pieces("the weather", max_new_tokens=40, ignore_eos=True)
    next(stream)
    assert _in_thread(lambda: engine.generate("other", max_new_tokens=6)) == want
    assert widths and max(widths) == 1
    stream.close()


def test_parallel_and_threads_must_be_positive(llama_bundle):
    for kw in ({"parallel": 0}, {"threads": 0}, {"threads": -1}):
        with pytest.raises(InvalidArgument):
            Engine.open(llama_bundle.root, backend="gguf", **kw)
