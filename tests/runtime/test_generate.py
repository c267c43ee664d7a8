"""The one generation loop's parts: typed timings, the stop string on the last step, and text
decoded incrementally in time linear in the output."""

import random

import pytest

from edgepeft.runtime import Engine, Timings
from edgepeft.runtime.tokenizer import IncrementalDecoder


@pytest.fixture(scope="module")
def engine(llama_bundle):
    return Engine.open(llama_bundle.root, threads=1)


def test_timings_are_typed_and_rates_come_from_their_fields(engine):
    t = engine.complete("the weather", max_new_tokens=12, ignore_eos=True).timings
    assert isinstance(t, Timings) and t.prompt_tokens == len(engine.encode_prompt("the weather"))
    assert t.decode_tokens == 12 and t.decode_s > 0 and t.prefill_s > 0
    assert t.decode_tokens_per_s == pytest.approx(11 / t.decode_s)
    assert 0 < t.decode_step_s <= t.decode_s
    assert set(t.to_json()) == {"load_s", "prefill_s", "prefill_tokens_per_s", "decode_tokens", "decode_s",
                                "decode_tokens_per_s", "decode_step_s"}


def test_the_last_step_names_the_stop_string_that_ended_the_text(engine):
    full = engine.generate("the weather", adapter="all", max_new_tokens=40)
    stop = next(full[i:i + 3] for i in range(5, len(full) - 3) if full[i:i + 3].strip())
    pieces = list(engine.stream_pieces("the weather", adapter="all", max_new_tokens=40, stop=["\x00", stop]))
    assert pieces[-1].stop_string == stop and pieces[-1].finish_reason == "stop"
    assert isinstance(pieces[-1].timings, Timings) and all(p.timings is None for p in pieces[:-1])
    free = list(engine.stream_pieces("the weather", adapter="all", max_new_tokens=5, ignore_eos=True))
    assert free[-1].stop_string is None and free[-1].finish_reason == "length"


class CountingTokenizer:
    """Decodes ids as letters, counting how many ids it was asked to decode in all."""

    def __init__(self):
        self.decoded = 0

    def decode(self, ids):
        self.decoded += len(ids)
        return "".join(chr(97 + i % 26) for i in ids)


def test_incremental_decoding_decodes_each_token_a_bounded_number_of_times():
    tok = CountingTokenizer()
    decoder, n = IncrementalDecoder(tok), 2000
    text = "".join(decoder.push(i) for i in range(n)) + decoder.flush()
    assert text == tok.decode(list(range(n)))
    assert tok.decoded < 6 * n  # decoding the whole output at each token would be n * n / 2


def test_incremental_pieces_join_to_the_whole_decode_with_multibyte_characters(engine):
    rng = random.Random(0)
    vocab = engine.tokenizer.tok.get_vocab_size()
    for _ in range(5):
        ids = [rng.randrange(vocab) for _ in range(60)]
        decoder = IncrementalDecoder(engine.tokenizer)
        text = "".join(decoder.push(i) for i in ids) + decoder.flush()
        assert text == engine.tokenizer.decode(ids)
