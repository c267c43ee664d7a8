"""Bad requests to `edgepeft serve`: each gets its 4xx in OpenAI's error shape, and a normal
request right after it succeeds. Also the API key, and loading adapters over HTTP (vLLM's
endpoints) inside --allow-adapter-loading only."""

from __future__ import annotations

import json
import os
import shutil

import openai
import pytest

from edgepeft.exporters import export_bundle
from edgepeft.runtime import Engine
from conftest import Server, http
from factory import make_base

KEY = "sk-test-0123456789"
PROMPT = "the weather today"


@pytest.fixture(scope="module")
def allowed(serve_bundle, llama_adapters, tmp_path_factory):
    """The directory adapters may be loaded from: a copy of qv's files, a file made for another
    base, a PEFT directory; and outside it, a file reached by a symlink and by ../."""
    root = tmp_path_factory.mktemp("allowed")
    inside = root / "adapters"
    inside.mkdir()
    other = make_base(root / "other_base", "llama", seed=42)  # same shapes, other weights
    other_b = export_bundle(str(other), root / "other", {"qv": str(llama_adapters["qv"])}, formats="onnx,gguf",
                            onnx_quant="fp32", gguf_quant="F32", quiet=True)
    outside = root / "outside"
    outside.mkdir()
    for suffix in ("onnx_adapter", "gguf"):
        shutil.copy(serve_bundle.root / f"adapters/qv.{suffix}", inside / f"qv-copy.{suffix}")
        shutil.copy(other_b.root / f"adapters/qv.{suffix}", inside / f"other-base.{suffix}")
        shutil.copy(serve_bundle.root / f"adapters/qv.{suffix}", outside / f"secret.{suffix}")
        os.symlink(outside / f"secret.{suffix}", inside / f"link.{suffix}")
    shutil.copytree(llama_adapters["qv"], inside / "peft-dir")
    return inside


@pytest.fixture(scope="module", params=["onnx", "gguf"])
def served(serve_bundle, allowed, request):
    server = Server(serve_bundle.root, request.param, "--allow-adapter-loading", str(allowed),
                    "--served-model-name", "tiny", env={"EDGEPEFT_API_KEY": KEY})
    yield server, request.param
    server.close()


def post(server, path, body=None, content=None, key=KEY, **headers):
    h = {"Authorization": f"Bearer {key}", **headers} if key else dict(headers)
    return http("POST", server.url + path, body, content, h)


def ok(server, backend):
    """A normal request succeeds."""
    r = server.client(KEY).completions.create(model="qv", prompt=PROMPT, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


GOOD = {"model": "qv", "prompt": PROMPT, "max_tokens": 3}
CORPUS = [
    # name, path, body or raw bytes, status, code, param
    ("malformed JSON", "/v1/completions", b'{"model": "qv", "prompt": ', 400, "invalid_json", None),
    ("not an object", "/v1/completions", b"[1, 2]", 400, None, None),
    ("binary garbage", "/v1/chat/completions", bytes(range(256)), 400, "invalid_json", None),
    ("temperature of the wrong type", "/v1/completions", {**GOOD, "temperature": "hot"}, 400, "invalid_type",
     "temperature"),
    ("negative temperature", "/v1/completions", {**GOOD, "temperature": -1}, 400, "invalid_value", "temperature"),
    ("top_p of 0", "/v1/completions", {**GOOD, "top_p": 0}, 400, "invalid_value", "top_p"),
    ("max_tokens a string", "/v1/completions", {**GOOD, "max_tokens": "10"}, 400, "invalid_type", "max_tokens"),
    ("max_tokens of 0", "/v1/completions", {**GOOD, "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ("max_tokens of 10^9", "/v1/completions", {**GOOD, "max_tokens": 10**9}, 400, "context_length_exceeded",
     "max_tokens"),
    ("a prompt over the context", "/v1/completions", {**GOOD, "prompt": "word " * 400}, 400,
     "context_length_exceeded", "prompt"),
    ("model missing", "/v1/completions", {"prompt": PROMPT}, 400, None, "model"),
    ("model a number", "/v1/completions", {**GOOD, "model": 3}, 400, None, "model"),
    ("unknown model", "/v1/completions", {**GOOD, "model": "nope"}, 404, "model_not_found", "model"),
    ("unknown adapter in a combination", "/v1/completions", {**GOOD, "model": "qv+nope"}, 404, "model_not_found",
     "model"),
    ("n of 2", "/v1/completions", {**GOOD, "n": 2}, 400, "unsupported_parameter", "n"),
    ("logprobs", "/v1/chat/completions", {"model": "qv", "messages": [{"role": "user", "content": "hi"}],
                                          "logprobs": True}, 400, "unsupported_parameter", "logprobs"),
    ("tools", "/v1/chat/completions", {"model": "qv", "messages": [{"role": "user", "content": "hi"}],
                                       "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "unsupported_parameter", "tools"),
    ("an unknown parameter", "/v1/completions", {**GOOD, "temprature": 0}, 400, "unrecognized_parameter",
     "temprature"),
    ("messages missing", "/v1/chat/completions", {"model": "qv"}, 400, None, "messages"),
    ("a tool message", "/v1/chat/completions", {"model": "qv", "messages": [{"role": "tool", "content": "x"}]},
     400, None, "messages[0].role"),
    ("an image part", "/v1/chat/completions", {"model": "qv", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, None, "messages[0].content"),
    ("five stop strings", "/v1/completions", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, None, "stop"),
    ("stop_options without stream", "/v1/completions", {**GOOD, "stream_options": {"include_usage": True}}, 400,
     None, "stream_options"),
    ("a token id outside the vocabulary", "/v1/completions", {**GOOD, "prompt": [1, 2, 10**6]}, 400, None, None),
    ("several prompts", "/v1/completions", {**GOOD, "prompt": ["a", "b"]}, 400, "unsupported_parameter", "prompt"),
    ("a 2 MB body", "/v1/completions", {**GOOD, "prompt": "x" * (2 << 20)}, 413, "request_too_large", None),
    ("lora_path with ../", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "../outside/secret.{sfx}"},
     400, "invalid_lora_path", "lora_path"),
    ("lora_path absolute outside", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/etc/passwd"}, 400,
     "invalid_lora_path", "lora_path"),
    ("lora_path a symlink out", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "link.{sfx}"}, 400,
     "invalid_lora_path", "lora_path"),
    ("lora_path a PEFT directory", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "peft-dir"}, 400,
     "invalid_lora_path", "lora_path"),
    ("lora_path for another base", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "other-base.{sfx}"},
     400, "invalid_adapter", None),
    ("lora_name taken", "/v1/load_lora_adapter", {"lora_name": "qv", "lora_path": "qv-copy.{sfx}"}, 400,
     "adapter_exists", "lora_name"),
    ("lora_name invalid", "/v1/load_lora_adapter", {"lora_name": "../x", "lora_path": "qv-copy.{sfx}"}, 400, None,
     "lora_name"),
    ("unload an unknown adapter", "/v1/unload_lora_adapter", {"lora_name": "nope"}, 404, "model_not_found",
     "lora_name"),
]


@pytest.mark.parametrize("name, path, body, status, code, param", CORPUS, ids=[c[0] for c in CORPUS])
def test_a_bad_request_gets_its_4xx_in_openai_shape_and_the_server_goes_on(served, name, path, body, status,
                                                                           code, param):
    server, backend = served
    sfx = "onnx_adapter" if backend == "onnx" else "gguf"
    if isinstance(body, bytes):
        r = post(server, path, content=body, **{"Content-Type": "application/json"})
    else:
        r = post(server, path, json.loads(json.dumps(body).replace("{sfx}", sfx)))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    ok(server, backend)


def test_the_openai_client_sees_each_error_as_its_exception(served):
    server, _ = served
    client = server.client(KEY)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="qv", prompt=PROMPT, max_tokens=10**9)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="qv", messages=[{"role": "user", "content": "hi"}], n=2)
    assert e.value.body["param"] == "n"


@pytest.mark.parametrize("key", [None, "wrong", KEY + "x", ""])
def test_every_endpoint_but_health_needs_the_api_key(served, key):
    server, backend = served
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"),
                         ("POST", "/v1/chat/completions"), ("POST", "/v1/load_lora_adapter"),
                         ("POST", "/v1/unload_lora_adapter")):
        r = http(method, server.url + path, GOOD if method == "POST" else None, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
    with pytest.raises(openai.AuthenticationError):
        server.client(key or "none").models.list()
    assert http("GET", server.url + "/health").status_code == 200
    ok(server, backend)


def test_unknown_routes_and_methods_answer_in_openai_shape(served):
    server, _ = served
    r = http("GET", server.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = http("GET", server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and "error" in r.json()


def test_adapters_load_and_unload_over_http(served, serve_bundle):
    server, backend = served
    sfx = "onnx_adapter" if backend == "onnx" else "gguf"
    client = server.client(KEY)
    want = Engine.open(serve_bundle.root, backend=backend).generate(PROMPT, adapter="qv", max_new_tokens=8)
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "qv2", "lora_path": f"qv-copy.{sfx}"})
    assert r.status_code == 200, r.text
    models = {m.id: m for m in client.models.list().data}
    assert models["qv2"].parent == "tiny"
    out = client.completions.create(model="qv2", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    assert out == want
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "qv2"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="qv2", prompt=PROMPT, max_tokens=2)
    assert "qv2" not in {m.id for m in client.models.list().data}
    # The base answers under its served name.
    base = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0)
    assert base.model == "tiny"
