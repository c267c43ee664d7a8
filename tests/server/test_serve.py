"""`edgepeft serve` on both backends, driven with the official openai client: every adapter, the
base and a combination, chat and completions, streaming and not, give what Engine.generate gives
for the same prompt; usage, finish reasons, stop strings, seeds, metrics, cancelled streams."""

from __future__ import annotations

import json
import time
from pathlib import Path

import openai
import pytest

from edgepeft.runtime import Engine
from conftest import Server, http, sse_events

MODELS = [None, "qv", "all", "mixed", "qv+mixed"]  # None: the base
PROMPT = "the weather today"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
N = 12


@pytest.fixture(scope="module", params=["onnx", "gguf"])
def served(serve_bundle, request):
    server = Server(serve_bundle.root, request.param)
    engine = Engine.open(serve_bundle.root, backend=request.param)
    yield server, engine
    server.close()


def base_name(served) -> str:
    return served[0].client().models.list().data[0].id


def model_id(served, adapter):
    return adapter or base_name(served)


def test_models_lists_the_base_then_each_adapter_with_the_base_as_parent(served, serve_bundle):
    data = served[0].client().models.list().data
    base = data[0]
    assert base.id == Path(serve_bundle.base["source"]).name  # named after the base's source
    assert base.parent is None
    assert [m.id for m in data[1:]] == ["all", "mixed", "qv"]
    assert all(m.parent == base.id and m.object == "model" for m in data[1:])


@pytest.mark.parametrize("adapter", MODELS)
def test_greedy_chat_equals_engine_generate_streaming_and_not(served, adapter):
    server, engine = served
    client, model = server.client(), model_id(served, adapter)
    want = engine.complete(MESSAGES, adapter=adapter, max_new_tokens=N)
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=N, temperature=0)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == want.stop_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, len(want.tokens))
    assert r.usage.total_tokens == want.prompt_tokens + len(want.tokens)
    assert r.model == model and r.object == "chat.completion"
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_completion_tokens=N,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + [want.stop_reason]
    assert len({c.id for c in chunks}) == 1


@pytest.mark.parametrize("adapter", MODELS)
def test_greedy_completions_equal_engine_generate_streaming_and_not(served, adapter):
    server, engine = served
    client, model = server.client(), model_id(served, adapter)
    want = engine.complete(PROMPT, adapter=adapter, max_new_tokens=N)
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0)
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == want.stop_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, len(want.tokens))
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.stop_reason
    # A prompt given as token ids runs those ids.
    ids = engine.encode_prompt(PROMPT)
    assert client.completions.create(model=model, prompt=ids, max_tokens=N, temperature=0).choices[0].text == want.text


def test_streams_end_with_a_usage_chunk_when_asked_then_done(served):
    server, engine = served
    body = {"model": "qv", "messages": MESSAGES, "max_tokens": N, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    status, kind, events = sse_events(server.url + "/v1/chat/completions", body)
    assert status == 200 and kind.startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    last = chunks[-1]
    want = engine.complete(MESSAGES, adapter="qv", max_new_tokens=N)
    assert last["choices"] == [] and last["usage"] == {
        "prompt_tokens": want.prompt_tokens, "completion_tokens": len(want.tokens),
        "total_tokens": want.prompt_tokens + len(want.tokens)}
    # Without stream_options there is no usage field at all, as OpenAI's streams.
    body.pop("stream_options")
    chunks = [json.loads(e) for e in sse_events(server.url + "/v1/chat/completions", body)[2] if e != "[DONE]"]
    assert all("usage" not in c for c in chunks) and chunks[-1]["choices"][0]["finish_reason"]


def test_stop_strings_end_the_text_before_them(served):
    server, engine = served
    full = engine.generate(PROMPT, adapter="all", max_new_tokens=40)
    stop = next(full[i:i + 2] for i in range(4, len(full) - 2) if full[i:i + 2].strip())
    cut = full[: full.index(stop)]
    client = server.client()
    r = client.completions.create(model="all", prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop, "\x00\x01"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    chunks = list(client.completions.create(model="all", prompt=PROMPT, max_tokens=40, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut and chunks[-1].choices[0].finish_reason == "stop"
    assert engine.generate(PROMPT, adapter="all", max_new_tokens=40, stop=stop) == cut


def test_seeded_sampling_is_reproducible(served):
    client = served[0].client()
    kw = dict(model="mixed", prompt=PROMPT, max_tokens=N, temperature=1.0, top_p=0.9)
    a = client.completions.create(seed=7, **kw).choices[0].text
    assert a == client.completions.create(seed=7, **kw).choices[0].text
    assert any(client.completions.create(seed=s, **kw).choices[0].text != a for s in range(8, 14))


def test_a_stream_closed_early_ends_and_the_server_goes_on(served):
    """The client closes after the first chunk. The tiny model may have finished by then, so the
    request counts as cancelled (status 499) or as completed (200), never both; test_cancel.py has
    a stream that is surely still generating."""
    server, engine = served
    client = server.client()

    def counts():
        total = lambda status: server.metric("edgepeft_requests_total", endpoint="/v1/completions",  # noqa: E731
                                             model="qv", status=status)
        return total("200"), total("499"), server.metric("edgepeft_requests_cancelled_total", model="qv")

    before = counts()
    stream = client.completions.create(model="qv", prompt=PROMPT, max_tokens=200, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    assert server.wait_for_metric("edgepeft_requests_running", 0) == 0
    for _ in range(100):
        after = counts()
        if after != before:
            break
        time.sleep(0.05)
    ok, cancelled, counted = (a - b for a, b in zip(after, before))
    assert ok + cancelled == 1 and counted == cancelled
    want = engine.generate(PROMPT, adapter="qv", max_new_tokens=N)
    assert client.completions.create(model="qv", prompt=PROMPT, max_tokens=N, temperature=0).choices[0].text == want


def test_metrics_count_requests_and_tokens_per_adapter(served):
    server, engine = served
    client = server.client()
    sent = server.metric("edgepeft_requests_total", endpoint="/v1/completions", model="mixed", status="200")
    tokens = server.metric("edgepeft_generation_tokens_total", model="mixed")
    ttft = server.metric("edgepeft_time_to_first_token_seconds_count", model="mixed")
    r = client.completions.create(model="mixed", prompt=PROMPT, max_tokens=5, temperature=0)
    assert server.metric("edgepeft_requests_total", endpoint="/v1/completions", model="mixed", status="200") == sent + 1
    assert server.metric("edgepeft_generation_tokens_total", model="mixed") == tokens + r.usage.completion_tokens
    assert server.metric("edgepeft_time_to_first_token_seconds_count", model="mixed") == ttft + 1
    assert server.metric("edgepeft_adapters_resident") == 3
    text = http("GET", server.url + "/metrics").text
    assert "# TYPE edgepeft_request_latency_seconds histogram" in text


def test_health_and_adapter_loading_off_by_default(served):
    server = served[0]
    assert http("GET", server.url + "/health").json() == {"status": "ok"}
    r = http("POST", server.url + "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"})
    assert r.status_code == 404 and "--allow-adapter-loading" in r.json()["error"]["message"]


def test_unknown_model_is_a_404_in_openai_shape(served):
    with pytest.raises(openai.NotFoundError) as e:
        served[0].client().completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
