"""A real `edgepeft serve` process on a free localhost port, driven with the official openai client."""

from __future__ import annotations

import http.client as httpclient
import json
import os
import re
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import pytest

from edgepeft.exporters import export_bundle


@pytest.fixture(scope="session")
def serve_bundle(tiny_llama, llama_adapters, tmp_path_factory):
    """fp32 ONNX + F32 GGUF bundle of the tiny Llama with the three test adapters."""
    return export_bundle(str(tiny_llama), tmp_path_factory.mktemp("serve") / "bundle",
                         {n: str(p) for n, p in llama_adapters.items()}, formats="onnx,gguf",
                         onnx_quant="fp32", gguf_quant="F32", quiet=True)


class Reply:
    """A raw HTTP answer (for what the openai client would not send: bad JSON, wrong types)."""

    def __init__(self, status: int, headers, body: bytes):
        self.status_code, self.headers, self.content = status, headers, body
        self.text = body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.content)


def http(method: str, url: str, json_body=None, content: bytes | None = None, headers: dict | None = None,
         timeout: float = 60) -> Reply:
    """One request with the standard library (http.client), so that tests need no HTTP package."""
    parts = urlsplit(url)
    conn = httpclient.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    h = dict(headers or {})
    if json_body is not None:
        content = json.dumps(json_body).encode()
        h.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, parts.path or "/", body=content, headers=h)
        r = conn.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def sse_events(url: str, body: dict, headers: dict | None = None, timeout: float = 60) -> tuple[int, str, list[str]]:
    """POST `body` and read a server-sent event stream: (status, content type, the data lines)."""
    parts = urlsplit(url)
    conn = httpclient.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("POST", parts.path, body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        lines = [line.decode().rstrip("\r\n") for line in r]
        return r.status, r.getheader("content-type", ""), [x[6:] for x in lines if x.startswith("data: ")]
    finally:
        conn.close()


class Server:
    """`python -m edgepeft serve BUNDLE --port 0 ...` until closed; `url` is where it listens."""

    def __init__(self, bundle, backend: str, *args: str, env: dict | None = None):
        cmd = [sys.executable, "-m", "edgepeft", "serve", str(bundle), "--backend", backend, "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.log: list[str] = []
        found = threading.Event()
        self.url = None

        def drain():
            for line in self.proc.stderr:
                self.log.append(line)
                m = re.search(r"listening on (http://\S+)", line)
                if m:
                    self.url = m.group(1)
                    found.set()
            found.set()

        threading.Thread(target=drain, daemon=True).start()
        if not found.wait(180) or self.url is None:
            self.close()
            raise RuntimeError("edgepeft serve did not start:\n" + "".join(self.log))

    def client(self, api_key: str = "none", **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120, **kw)

    def metric(self, name: str, api_key: str | None = None, **labels) -> float:
        """The sum of GET /metrics samples `name` whose labels include `labels` (0 when none)."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        text = http("GET", self.url + "/metrics", headers=headers, timeout=30).text
        total = 0.0
        for line in text.splitlines():
            m = re.match(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
            if not m or m.group(1) != name:
                continue
            have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            if all(have.get(k) == str(v) for k, v in labels.items()):
                total += float(m.group(3))
        return total

    def wait_for_metric(self, name: str, value: float, timeout: float = 30, api_key: str | None = None,
                        **labels) -> float:
        end = time.monotonic() + timeout
        while True:
            got = self.metric(name, api_key, **labels)
            if got == value or time.monotonic() > end:
                return got
            time.sleep(0.05)

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
