"""The Engine: generation loop, sampling, stop tokens, chat template, threads."""

import threading

import numpy as np
import pytest

from edgepeft.errors import BundleError, EngineError, InvalidArgument
from edgepeft.runtime import Engine


@pytest.fixture(scope="module", params=["onnx", "gguf"])
def engine(llama_bundle, request):
    return Engine.open(llama_bundle.root, backend=request.param)


def test_open_loads_every_bundled_adapter_once(engine):
    assert sorted(engine.adapters) == ["all", "mixed", "qv"]


def test_kv_cache_decode_matches_teacher_forced_scores(engine):
    """Each greedy token is the argmax of the full-sequence logits at its position."""
    result = engine.complete("hello world", adapter="mixed", max_new_tokens=16)
    ids = engine.encode_prompt("hello world") + result.tokens
    logits = engine.score(ids, adapter="mixed")
    n = len(ids) - len(result.tokens)
    assert result.tokens == [int(t) for t in logits[n - 1 : -1].argmax(-1)]


def test_stream_yields_the_same_text_as_generate(engine):
    pieces = list(engine.stream("the weather", adapter="qv", max_new_tokens=20))
    assert len(pieces) > 1
    assert "".join(pieces) == engine.generate("the weather", adapter="qv", max_new_tokens=20)


def test_sampling_is_reproducible_with_a_seed_and_varies_without(engine):
    kw = dict(adapter="all", max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.95)
    a = engine.complete("abc", seed=3, **kw).tokens
    assert a == engine.complete("abc", seed=3, **kw).tokens
    assert any(engine.complete("abc", seed=s, **kw).tokens != a for s in range(4, 9))


@pytest.mark.parametrize("backend", ["onnx", "gguf"])
def test_generation_stops_before_a_stop_token(llama_bundle, backend):
    engine = Engine.open(llama_bundle.root, backend=backend)
    free = engine.complete("hello", max_new_tokens=8)
    assert free.stop_reason == "length" and len(free.tokens) == 8
    third = free.tokens[2]
    cut = free.tokens.index(third)  # the first time that token appears
    engine.tokenizer.eos_ids = {third}
    stopped = engine.complete("hello", max_new_tokens=8)
    assert stopped.stop_reason == "stop" and stopped.tokens == free.tokens[:cut]


def test_chat_prompt_uses_the_models_template(engine):
    ids = engine.encode_prompt("hi", chat=True)
    assert engine.tokenizer.tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert engine.tokenizer.tok.token_to_id("<|im_end|>") in engine.tokenizer.stop_ids(chat=True)


def test_unknown_adapter_and_overlong_requests_fail_clearly(engine):
    with pytest.raises(BundleError, match="no adapter named 'nope'"):
        engine.generate("x", adapter="nope")
    with pytest.raises(EngineError, match="context length"):
        engine.score(list(range(10)) * 1000)
    with pytest.raises(InvalidArgument, match="outside the vocabulary"):
        engine.score([1, 2, 10**6])


def test_concurrent_calls_each_get_their_own_adapter(engine):
    prompts = ["one two", "three four", "five six"]
    names = [None, "qv", "all", "mixed"]
    want = {(p, n): engine.complete(p, adapter=n, max_new_tokens=12).tokens for p in prompts for n in names}
    jobs = [(p, n) for p in prompts for n in names] * 4
    got, errors = {}, []

    def worker(chunk):
        try:
            for p, n in chunk:
                got.setdefault((p, n), []).append(engine.complete(p, adapter=n, max_new_tokens=12).tokens)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(jobs[i::6],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for key, runs in got.items():
        assert all(r == want[key] for r in runs), key


def test_score_without_adapter_equals_base_after_adapter_calls(engine):
    ids = engine.encode_prompt("repeatable")
    before = engine.score(ids)
    engine.score(ids, adapter="all")
    np.testing.assert_array_equal(engine.score(ids), before)


@pytest.mark.parametrize("backend", ["onnx", "gguf"])
def test_adapters_load_and_unload_while_other_threads_generate(llama_bundle, backend):
    """Calls keep getting their own adapter's output while another thread churns the registry."""
    engine = Engine.open(llama_bundle.root, backend=backend)
    want = {n: engine.complete("steady", adapter=n, max_new_tokens=6).tokens for n in (None, "qv", "all")}
    errors, stop = [], threading.Event()

    def churn():
        path = engine.bundle.adapter_path("mixed", backend)
        while not stop.is_set():
            engine.load_adapter("mixed", path)
            engine.unload_adapter("mixed")

    def call(name):
        try:
            for _ in range(10):
                assert engine.complete("steady", adapter=name, max_new_tokens=6).tokens == want[name]
        except Exception as e:  # surfaced below
            errors.append(e)

    churner = threading.Thread(target=churn)
    churner.start()
    workers = [threading.Thread(target=call, args=(n,)) for n in want for _ in range(2)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    churner.join()
    assert not errors, errors[0]


def test_reloading_an_adapter_under_the_same_name_replaces_it(llama_bundle):
    engine = Engine.open(llama_bundle.root, backend="gguf")
    ids = engine.encode_prompt("swap")
    engine.load_adapter("qv", engine.bundle.adapter_path("all", "gguf"))
    np.testing.assert_array_equal(engine.score(ids, adapter="qv"), engine.score(ids, adapter="all"))


def test_scoring_longer_than_one_llama_batch_matches_onnx(tiny_llama, tmp_path):
    from edgepeft.exporters import export_bundle
    from edgepeft.runtime.gguf_backend import BATCH

    bundle = export_bundle(str(tiny_llama), tmp_path / "long", formats="onnx,gguf", onnx_quant="fp32",
                           gguf_quant="F32", context_length=BATCH * 2, quiet=True)
    ids = [(i * 7919) % 200 + 3 for i in range(BATCH + 37)]
    onnx_logits = Engine.open(bundle.root).score(ids)
    gguf_logits = Engine.open(bundle.root, backend="gguf").score(ids)
    assert gguf_logits.shape == onnx_logits.shape == (len(ids), onnx_logits.shape[1])
    assert np.abs(gguf_logits - onnx_logits).max() / np.ptp(onnx_logits) <= 1e-3
