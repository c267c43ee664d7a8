"""The OpenAI-compatible HTTP API over one Engine, as a Starlette app (uvicorn runs it).

Generation runs on a bounded pool of worker threads, never on the event loop: a non-streaming
request as one task, a stream as a task that hands its pieces to the loop. When a client goes
away, streaming or not, the request's thread is told to stop and ends the Engine's call before
it computes another token, which frees the request's sequence.
"""

from __future__ import annotations

import hmac
import json
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from edgepeft.bundle import check_adapter_name
from edgepeft.errors import AdapterMismatch, BundleError, EdgepeftError, EngineError, UnsupportedAdapter
from edgepeft.layout import ADAPTER_SUFFIX
from edgepeft.runtime import Usage

from .metrics import Metrics
from .protocol import ApiError, GenRequest, bad, parse
from .threads import in_thread, unless_disconnected

MAX_BODY_BYTES = 1 << 20  # 1 MiB: a long chat prompt is a few hundred KB
WORKERS = 16  # requests generating at once; more wait for a thread (GGUF also for a context)


def _error(e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _model_not_found(name: str) -> ApiError:
    return ApiError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")


class Server:
    """The app's state: the engine, the base's public name, options and metrics."""

    def __init__(self, engine, model_name: str, api_key: str | None = None, adapter_dir: str | Path | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.adapter_dir = Path(adapter_dir).resolve() if adapter_dir is not None else None
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())
        self.metrics = Metrics(lambda: engine.resident_adapters)
        self.loaded_from: dict[str, str] = {}  # adapters loaded over HTTP -> their file
        # Generation runs on one bounded pool of long-lived threads, not a thread per request: more
        # threads would also take more malloc arenas, and the RSS with them.
        self.workers = ThreadPoolExecutor(WORKERS, thread_name_prefix="edgepeft-worker")

    # ---- plumbing ------------------------------------------------------------------------------
    def _authorized(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # Constant time whatever the token: compare bytes of the same kind always.
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    async def _json(self, request: Request):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise ApiError(413, f"request body of {length} bytes is over the limit of {self.max_body_bytes}",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise ApiError(413, f"request body is over the limit of {self.max_body_bytes} bytes",
                               code="request_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"the request body is not valid JSON ({str(e).splitlines()[0][:120]})",
                      code="invalid_json") from None

    def endpoint(self, handler, public: bool = False):
        """Wrap `handler` with authentication, OpenAI-shaped errors and request counting."""

        async def wrapped(request: Request):
            try:
                if not public and not self._authorized(request):
                    raise ApiError(401, "Incorrect API key provided: pass it as 'Authorization: Bearer KEY'.",
                                   code="invalid_api_key")
                return await handler(request)
            except ApiError as e:
                self._count(request, "", e.status)
                return _error(e)
            except EdgepeftError as e:
                err = _api_error(e)
                self._count(request, "", err.status)
                return _error(err)
            except Exception:
                traceback.print_exc(file=sys.stderr)
                self._count(request, "", 500)
                return _error(ApiError(500, "internal error (see the server's log)", type="server_error"))

        return wrapped

    def _count(self, request: Request, model: str, status: int) -> None:
        self.metrics.requests.labels(request.url.path, model, str(status)).inc()

    def _adapter_of(self, model: str):
        """The engine's adapter spec for a request's `model` (None: the base)."""
        if model == self.model_name:
            return None
        try:
            self.engine.check_adapter(model)
        except EdgepeftError:
            raise _model_not_found(model) from None
        return model

    # ---- endpoints -----------------------------------------------------------------------------
    async def health(self, request: Request):
        return JSONResponse({"status": "ok"})

    async def metrics_endpoint(self, request: Request):
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    async def models(self, request: Request):
        def card(name: str, parent: str | None, root: str) -> dict:
            return {"id": name, "object": "model", "created": self.created, "owned_by": "edgepeft",
                    "root": root, "parent": parent}

        bundle = self.engine.bundle
        data = [card(self.model_name, None, str(bundle.base.get("source", bundle.root)))]
        for name in self.engine.adapters:
            data.append(card(name, self.model_name, self.loaded_from.get(name, str(bundle.root / "adapters" / name))))
        self._count(request, "", 200)
        return JSONResponse({"object": "list", "data": data})

    async def chat_completions(self, request: Request):
        return await self._generate(request, chat=True)

    async def completions(self, request: Request):
        return await self._generate(request, chat=False)

    async def _generate(self, request: Request, chat: bool):
        started = time.perf_counter()
        req = parse(await self._json(request), chat)
        adapter = self._adapter_of(req.model)
        ids, max_new = await anyio.to_thread.run_sync(self._prepare, req, adapter)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        m = self.metrics
        m.prompt_tokens.labels(req.model).inc(len(ids))
        if req.stream:
            return StreamingResponse(self._sse(request, req, adapter, ids, max_new, rid, started),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        m.running.inc()
        cancel = threading.Event()
        try:
            work = self.workers.submit(self._complete, req, adapter, ids, max_new, cancel)
            result = await unless_disconnected(request, work, cancel)
        finally:
            m.running.dec()
        if result is None:  # the client left; its call ended before its next token
            m.cancelled.labels(req.model).inc()
            self._count(request, req.model, 499)
            return Response(status_code=499)
        now = time.perf_counter()
        m.generation_tokens.labels(req.model).inc(len(result.tokens))
        m.latency.labels(req.model).observe(now - started)
        if result.tokens:  # the first token comes with the prefill: all but the decode time
            m.ttft.labels(req.model).observe(max(0.0, now - started - result.timings.decode_s))
        usage = Usage(len(ids), len(result.tokens)).to_json()
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                      "logprobs": None, "finish_reason": result.stop_reason}
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.stop_reason}
        self._count(request, req.model, 200)
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": req.model, "choices": [choice],
                             "usage": usage})

    def _prepare(self, req: GenRequest, adapter) -> tuple[list[int], int]:
        """Token ids of the prompt and the token budget, or a 400 naming what does not fit."""
        engine = self.engine
        what = "messages" if req.chat else "prompt"
        ids = engine.encode_prompt(req.prompt, chat=req.chat)
        if not ids:
            raise bad("the prompt encodes to no tokens", what)
        room = engine.context_length - engine.virtual_tokens(adapter)  # loads a lazy adapter now
        wanted = req.max_tokens if req.max_tokens is not None else 1
        if len(ids) + wanted > room:
            raise bad(f"This model's maximum context length is {room} tokens. However, you requested "
                      f"{len(ids) + wanted} tokens ({len(ids)} in the {what}, {wanted} in the completion). "
                      f"Please reduce the length of the {what} or the completion.",
                      "max_tokens" if req.max_tokens is not None and len(ids) < room else what,
                      "context_length_exceeded")
        return ids, (req.max_tokens if req.max_tokens is not None else room - len(ids))

    def _kwargs(self, req: GenRequest, adapter, max_new: int) -> dict:
        return dict(adapter=adapter, max_new_tokens=max_new, temperature=req.temperature, top_k=req.top_k,
                    top_p=req.top_p, seed=req.seed, chat=req.chat, stop=req.stop or None,
                    ignore_eos=req.ignore_eos)

    def _complete(self, req: GenRequest, adapter, ids: list[int], max_new: int, cancel: threading.Event):
        return self.engine.complete(ids, **self._kwargs(req, adapter, max_new), cancel=cancel)

    async def _sse(self, request: Request, req: GenRequest, adapter, ids, max_new: int, rid: str, started: float):
        """Server-sent events in OpenAI's chunk shapes, ending with `data: [DONE]`."""
        chat, created, m = req.chat, int(time.time()), self.metrics
        usage_field = {"usage": None} if req.include_usage else {}

        def chunk(delta: str | None = None, finish: str | None = None, role: bool = False) -> str:
            if chat:
                d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta is not None else {})
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": created, "model": req.model, "choices": [choice], **usage_field}
            return f"data: {json.dumps(body)}\n\n"

        stop_event = threading.Event()
        kwargs = self._kwargs(req, adapter, max_new)
        pieces = in_thread(self.workers, lambda: self.engine.stream_pieces(ids, **kwargs), stop_event)
        m.running.inc()
        completed, first, n = False, None, 0
        try:
            if chat:
                yield chunk(role=True)
            async for piece in pieces:
                n += len(piece.token_ids)
                if first is None and piece.token_ids:
                    first = time.perf_counter()
                    m.ttft.labels(req.model).observe(first - started)
                if piece.text:
                    yield chunk(piece.text)
                if piece.finish_reason is not None:
                    yield chunk(finish=piece.finish_reason)
                    if req.include_usage:
                        body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                "created": created, "model": req.model, "choices": [],
                                "usage": piece.usage.to_json()}
                        yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
            completed = True
        except EdgepeftError as e:  # after the headers went out: an error event, then the end
            err = _api_error(e)
            yield f"data: {json.dumps(err.body())}\n\n"
            yield "data: [DONE]\n\n"
            completed = True
        finally:
            stop_event.set()  # client gone (this generator closed early) or done: the thread stops
            m.running.dec()
            m.generation_tokens.labels(req.model).inc(n)
            if completed:
                m.latency.labels(req.model).observe(time.perf_counter() - started)
                self._count(request, req.model, 200)
            else:
                m.cancelled.labels(req.model).inc()
                self._count(request, req.model, 499)  # nginx's "client closed request"

    # ---- adapters over HTTP (vLLM's endpoints) -------------------------------------------------
    def _require_loading(self) -> Path:
        if self.adapter_dir is None:
            raise ApiError(404, "loading adapters over HTTP is off: start the server with "
                                "--allow-adapter-loading DIR", code="not_found")
        return self.adapter_dir

    async def load_lora_adapter(self, request: Request):
        root = self._require_loading()
        body = await self._json(request)
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        extra = set(body) - {"lora_name", "lora_path", "load_inplace"}
        if extra:
            raise bad(f"Unrecognized request argument supplied: {sorted(extra)[0]}", sorted(extra)[0])
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
            raise bad("'lora_name' and 'lora_path' are required strings", "lora_name" if not isinstance(name, str)
                      or not name else "lora_path")
        try:
            check_adapter_name(name)
        except BundleError as e:
            raise bad(str(e), "lora_name") from None
        if name == self.model_name or (name in self.engine.adapters and not body.get("load_inplace")):
            raise bad(f"The lora adapter '{name}' has already been loaded.", "lora_name", "adapter_exists")
        file = self._adapter_file(root, path)
        await anyio.to_thread.run_sync(self.engine.load_adapter, name, file)
        self.loaded_from[name] = str(file)
        self._count(request, name, 200)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    def _adapter_file(self, root: Path, path: str) -> Path:
        """The adapter file `path` names, which must resolve (links followed) inside `root`: an
        exported file of this backend, or a directory holding exactly one."""
        suffix = ADAPTER_SUFFIX[self.engine.backend.name]
        target = (root / path).resolve()  # relative paths are relative to the allowed directory
        if not target.is_relative_to(root):
            raise bad(f"lora_path {path!r} is outside the directory adapters may be loaded from", "lora_path",
                      "invalid_lora_path")
        if target.is_dir():
            found = sorted(p for p in target.iterdir() if p.name.endswith(suffix) and p.is_file())
            if len(found) != 1:
                peft = (target / "adapter_config.json").is_file()
                raise bad(f"lora_path {path!r} is a directory with {len(found)} {suffix} files"
                          + ("; it is a PEFT adapter: export it for this base first (edgepeft add-adapter, "
                             "then load the file it writes)" if peft else "; name the file"),
                          "lora_path", "invalid_lora_path")
            target = found[0].resolve()
            if not target.is_relative_to(root):
                raise bad(f"lora_path {path!r} links outside the directory adapters may be loaded from",
                          "lora_path", "invalid_lora_path")
        if not target.is_file():
            raise bad(f"lora_path {path!r} does not exist", "lora_path", "invalid_lora_path")
        if not target.name.endswith(suffix):
            raise bad(f"lora_path {path!r} is not a {suffix} adapter file (this server runs "
                      f"{self.engine.backend.name})", "lora_path", "invalid_lora_path")
        return target

    async def unload_lora_adapter(self, request: Request):
        self._require_loading()
        body = await self._json(request)
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise bad("'lora_name' is required", "lora_name")
        if name not in self.engine.adapters:
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name",
                           code="model_not_found")
        await anyio.to_thread.run_sync(self.engine.unload_adapter, name)
        self.loaded_from.pop(name, None)
        self._count(request, name, 200)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


def _api_error(e: EdgepeftError) -> ApiError:
    """An engine error as the HTTP error a client can act on."""
    message = " ".join(str(e).split("\n"))
    if isinstance(e, (AdapterMismatch, UnsupportedAdapter)):
        return bad(message, code="invalid_adapter")
    if isinstance(e, EngineError):
        return ApiError(500, message, type="server_error")
    return bad(message)


def create_app(engine, model_name: str, api_key: str | None = None, adapter_dir: str | Path | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
    """The ASGI app serving `engine` under `model_name` (see docs/cli.md#edgepeft-serve)."""
    s = Server(engine, model_name, api_key, adapter_dir, max_body_bytes)
    e = s.endpoint
    routes = [
        Route("/health", e(s.health, public=True), methods=["GET"]),
        Route("/metrics", e(s.metrics_endpoint), methods=["GET"]),
        Route("/v1/models", e(s.models), methods=["GET"]),
        Route("/v1/chat/completions", e(s.chat_completions), methods=["POST"]),
        Route("/v1/completions", e(s.completions), methods=["POST"]),
        Route("/v1/load_lora_adapter", e(s.load_lora_adapter), methods=["POST"]),
        Route("/v1/unload_lora_adapter", e(s.unload_lora_adapter), methods=["POST"]),
    ]

    async def http_error(request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code))

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.state.server = s
    return app
