"""A client that leaves mid-request ends its request before the next token: for a stream the
server closes the engine's iterator, which frees the sequence (Engine.stream_pieces' contract,
tested in tests/runtime/test_streaming.py); for a whole completion it sets the call's cancel
event. Here the engine is a slow stand-in, so that the request is surely still generating when the
client goes; everything else is the real server and the openai client."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import openai
import pytest

from edgepeft.runtime import StreamPiece, Usage
from edgepeft.server import create_app, listen

STEP_S = 0.05  # seconds per token of the stand-in: the client closes long before 200 tokens


class SlowEngine:
    """The part of Engine the server uses, generating one token per STEP_S."""

    adapters = ["slow"]
    resident_adapters = ["slow"]
    context_length = 1000

    def __init__(self):
        self.produced, self.closed = 0, threading.Event()
        self.bundle = type("B", (), {"base": {"source": "/x/base"}, "root": Path("/x")})()
        self.backend = type("K", (), {"name": "onnx"})()

    def encode_prompt(self, prompt, chat=False):
        return [1, 2, 3]

    def virtual_tokens(self, adapter):
        return 0

    def check_adapter(self, adapter):
        pass

    def complete(self, ids, max_new_tokens, cancel, **kw):
        try:
            for _ in range(max_new_tokens):
                if cancel.is_set():
                    return None
                time.sleep(STEP_S)
                self.produced += 1
        finally:
            self.closed.set()
        raise AssertionError("the call ran to its end: the server never cancelled it")

    def stream_pieces(self, ids, max_new_tokens, **kw):
        try:
            for i in range(max_new_tokens):
                time.sleep(STEP_S)
                self.produced += 1
                yield StreamPiece("x", [7])
            yield StreamPiece("", [], "length", Usage(len(ids), max_new_tokens))
        finally:
            self.closed.set()


@contextlib.contextmanager
def serving(engine):
    """The real app over `engine` on a free port; yields the port."""
    import uvicorn

    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "base"), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_a_client_gone_mid_stream_stops_generation_within_a_token():
    engine = SlowEngine()
    with serving(engine) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        stream = client.completions.create(model="slow", prompt="hi", max_tokens=200, stream=True)
        seen = 0
        for chunk in stream:
            seen += 1
            if seen == 3:
                break
        stream.close()
        assert engine.closed.wait(10), "the engine's iterator was not closed"
        # The server stops before asking for another token once it sees the client gone: a few
        # tokens at most were made after the third chunk, out of 200.
        assert engine.produced < 3 + 10, engine.produced
        done = engine.produced
        time.sleep(5 * STEP_S)
        assert engine.produced == done  # nothing runs on


def test_a_client_gone_before_a_whole_completion_stops_generation_within_a_token():
    engine = SlowEngine()
    with serving(engine) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                               timeout=10 * STEP_S)
        with pytest.raises(openai.APITimeoutError):  # the client gives up after about 10 tokens
            client.completions.create(model="slow", prompt="hi", max_tokens=200)
        assert engine.closed.wait(10), "the engine's call did not end"
        assert engine.produced < 10 + 10, engine.produced
        done = engine.produced
        time.sleep(5 * STEP_S)
        assert engine.produced == done
