"""The Engine: a bundle's base loaded once, adapters loaded beside it, chosen per call."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from edgepeft.bundle import Bundle
from edgepeft.errors import BundleError, EngineError, InvalidArgument

from .adapters import AdapterRegistry
from .backend import Backend
from .devices import check_device, check_gpu_layers
from .generate import (Completion, Generation, StreamPiece, check_stop, collect, run_alone, steps)
from .sampling import Sampler, SamplingParams, generation_params
from .scheduler import Request, Scheduler
from .tokenizer import Tokenizer

BACKENDS = ("onnx", "gguf")


def _make_backend(bundle: Bundle, backend: str, device: str, threads: int | None, max_context: int | None = None,
                  gpu_layers: int | None = None, parallel: int | None = None) -> Backend:
    if backend == "onnx":
        from .onnx_backend import OnnxBackend

        return OnnxBackend(bundle, device=device, threads=threads, max_context=max_context, parallel=parallel)
    if backend == "gguf":
        from .gguf_backend import GgufBackend

        return GgufBackend(bundle, device=device, threads=threads, n_gpu_layers=gpu_layers,
                           context_length=max_context, parallel=parallel)
    raise BundleError(f"backend {backend!r} is not available (choose from {', '.join(BACKENDS)})")


class Engine:
    """Generate with a bundle's base and any of its adapters.

    Thread-safe: calls may run concurrently, each with its own adapter; loading and unloading
    adapters is safe while other calls run (a call keeps the adapter it started with).

    With `max_resident_adapters=K` the bundle's adapters load lazily, on first use, and the least
    recently used one is unloaded when a (K+1)-th is needed (for small-memory devices)."""

    def __init__(self, bundle: Bundle, backend: Backend, load_seconds: float,
                 max_resident_adapters: int | None = None, batching: bool = True):
        self.bundle = bundle
        self.backend = backend
        self.tokenizer = Tokenizer(bundle.root, bundle.manifest["tokenizer"])
        self.load_seconds = load_seconds
        self.registry = AdapterRegistry(bundle, backend, max_resident_adapters)
        self._lock = threading.Lock()
        # Continuous batching (runtime/scheduler.py): made on the first call that can batch;
        # False with batching=False, and every call runs alone.
        self._scheduler: Scheduler | None | bool = None if batching else False

    @classmethod
    def open(cls, bundle: str | Path | Bundle, backend: str = "onnx", device: str = "auto",
             threads: int | None = None, load_adapters: bool = True, max_context: int | None = None,
             max_resident_adapters: int | None = None, gpu_layers: int | None = None,
             parallel: int | None = None, batching: bool = True) -> "Engine":
        """Open a bundle: the base loads once; with load_adapters, so does every bundled adapter
        (or, with max_resident_adapters, each on first use).

        device: auto, cpu, cuda, tensorrt, coreml, dml, openvino (see docs/devices.md); one the
        installed engine lacks falls back to the CPU and sets `device_note`. max_context bounds
        each call's KV cache; gpu_layers offloads only that many layers (GGUF). Calls that overlap in
        time decode together, each with its own adapter (continuous batching, runtime/scheduler.py);
        parallel bounds the rows decoding at once (default 4; later calls wait their turn);
        batching=False runs each call on its own forward passes."""
        # Bad arguments fail before the bundle's files are hashed or a model loads.
        check_device(device)
        for what, value in (("max context", max_context), ("max resident adapters", max_resident_adapters),
                            ("parallel", parallel), ("threads", threads)):
            if value is not None and value < 1:
                raise InvalidArgument(f"{what} {value} must be at least 1")
        check_gpu_layers(gpu_layers)
        t0 = time.perf_counter()
        b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        engine = cls(b, _make_backend(b, backend, device, threads, max_context, gpu_layers, parallel),
                     time.perf_counter() - t0, max_resident_adapters, batching)
        if load_adapters:
            names = [n for n, entry in b.adapters.items() if backend in (entry.get("files") or {})]
            if max_resident_adapters is None:
                for name in names:
                    engine.load_adapter(name)
            else:
                engine.registry.defer(names)
        return engine

    # ---- adapters ------------------------------------------------------------------------------
    @property
    def device_note(self) -> str | None:
        """One line when the device asked for is not what runs (e.g. no CUDA provider)."""
        return self.backend.device_note

    @property
    def adapters(self) -> list[str]:
        """Names of the adapters calls may use: loaded ones, and bundle ones loaded on first use."""
        return self.registry.names

    @property
    def resident_adapters(self) -> list[str]:
        """Names of the adapters in memory now, least recently used first."""
        return self.registry.resident

    def load_adapter(self, name: str, path: str | Path | None = None) -> None:
        """Load adapter `name` from `path` (an adapter file), or from the bundle when omitted."""
        self.registry.load(name, path)

    def unload_adapter(self, name: str) -> None:
        self.registry.unload(name)

    def check_adapter(self, adapter: str | list[str] | None) -> None:
        """Raise BundleError naming the first adapter of `adapter` ("a", "a+b", a list) that
        calls cannot use; loads nothing."""
        self.registry.check(adapter)

    def adapter_handle(self, adapter: str | list[str] | None):
        """The backend's handle for `adapter` (None: the base), for code that drives the backend
        contract (runtime/backend.py) directly; loads a lazy adapter."""
        return self.registry.handle(adapter)

    def switch_seconds(self, name: str, repeats: int = 200) -> list[float]:
        """Time switching to adapter `name` from the plain base, `repeats` times (for demo and
        bench): the work a call does when its adapter differs from the previous call's."""
        handle, out = self.adapter_handle(name), []
        for _ in range(repeats):
            self.backend.switch_to(None)
            t = time.perf_counter()
            self.backend.switch_to(handle)
            out.append(time.perf_counter() - t)
        self.backend.switch_to(None)
        return out

    # ---- running -------------------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        """Positions one call may use (prompt, generated tokens, an adapter's virtual tokens)."""
        return int(self.backend.context_length)

    def virtual_tokens(self, adapter: str | list[str] | None) -> int:
        """Context positions `adapter`'s virtual tokens take before the prompt (prompt and prefix
        kinds; 0 for the others). Raises BundleError for an unknown adapter."""
        return self.backend.virtual_tokens(self.adapter_handle(adapter))

    def encode_prompt(self, prompt: str | list[dict] | list[int], chat: bool = False) -> list[int]:
        """The token ids a call runs: a string (chat=True: as one user message), chat messages, or
        token ids as they are (a list of ints)."""
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
            return self._check_ids(list(prompt))
        if chat or isinstance(prompt, list):
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            return self.tokenizer.apply_chat_template(messages)
        return self.tokenizer.encode(prompt)

    def score(self, token_ids, adapter: str | None = None) -> np.ndarray:
        """Teacher-forced logits [len(token_ids), vocab] for `token_ids` under `adapter`."""
        ids = self._check_ids([int(t) for t in np.asarray(token_ids).reshape(-1)])
        handle = self.adapter_handle(adapter)
        # Logits of the real tokens only: virtual tokens (prompt/prefix kinds) sit in the state.
        with self.backend.open_sequence(handle, self.backend.virtual_tokens(handle) + len(ids)) as seq:
            return seq.forward(ids, all_logits=True)

    def _check_ids(self, ids: list[int]) -> list[int]:
        vocab = self.bundle.base["dims"]["vocab_size"]
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidArgument(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        return ids

    def _generation(self, ids: list[int], adapter, max_new_tokens: int, params: SamplingParams, chat: bool,
                    ignore_eos: bool) -> tuple[Generation, Iterator[int]]:
        """A call's Generation and where its tokens come from: a batch row, or its own sequence."""
        handle = self.adapter_handle(adapter)
        if not ids:
            raise EngineError("the prompt encodes to no tokens")
        virtual = self.backend.virtual_tokens(handle)
        budget = min(virtual + len(ids) + max_new_tokens, self.backend.context_length)
        if budget <= virtual + len(ids):
            raise EngineError(f"prompt of {len(ids)} tokens"
                              + (f" after the adapter's {virtual} virtual tokens" if virtual else "")
                              + f" leaves no room in the context ({self.backend.context_length})")
        self._check_ids(ids)
        stop_ids = set() if ignore_eos else self.tokenizer.stop_ids(chat)
        gen = Generation(list(ids), handle, budget, max_new_tokens, Sampler(params), stop_ids)
        scheduler = self._scheduler_for(handle)
        if scheduler is None:
            return gen, run_alone(self.backend, gen)
        req = Request(gen)
        scheduler.submit(req)
        return gen, req.tokens()

    def _scheduler_for(self, handle) -> Scheduler | None:
        """The scheduler a call on `handle` joins, or None: the call runs alone."""
        if self._scheduler is False or not self.backend.can_batch(handle):
            return None
        with self._lock:
            if self._scheduler is None:
                self._scheduler = Scheduler(self.backend.batcher, self.backend.parallel)
            return self._scheduler

    def _steps(self, prompt, adapter, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
               seed: int | None, chat: bool, stop, ignore_eos: bool, text: bool | None = None,
               cancel: threading.Event | None = None) -> Iterator[StreamPiece]:
        params = generation_params(max_new_tokens, temperature, top_k, top_p, seed)
        stops = check_stop(stop)
        ids = self.encode_prompt(prompt, chat)
        gen, tokens = self._generation(ids, adapter, max_new_tokens, params, chat, ignore_eos)
        return steps(tokens, gen, self.tokenizer, stops, self.load_seconds, text=bool(stops) if text is None else text,
                     cancel=cancel)

    def stream_pieces(self, prompt: str | list[dict], adapter: str | None = None, max_new_tokens: int = 128,
                      temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                      chat: bool = False, stop: str | list[str] | None = None,
                      ignore_eos: bool = False) -> Iterator[StreamPiece]:
        """Generate as `stream` does, yielding StreamPiece objects (text, token ids; finish reason,
        usage and timings on the last one). Closing the iterator early (`close()`, or dropping it)
        ends the call and frees its sequence before the next token is computed."""
        return self._steps(prompt, adapter, max_new_tokens, temperature, top_k, top_p, seed, chat, stop,
                           ignore_eos, text=True)

    def complete(self, prompt: str | list[dict], adapter: str | None = None, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 chat: bool = False, ignore_eos: bool = False, stop: str | list[str] | None = None,
                 cancel: threading.Event | None = None) -> Completion:
        """Generate and return text, token ids and timings. ignore_eos generates exactly
        max_new_tokens (for benchmarks, like llama-bench); stop: strings that end the text
        (not included in it); cancel: an event that, once set, ends the call before its next
        token (stop_reason "cancelled")."""
        pieces = self._steps(prompt, adapter, max_new_tokens, temperature, top_k, top_p, seed, chat, stop,
                             ignore_eos, cancel=cancel)
        name = adapter if adapter is None or isinstance(adapter, str) else "+".join(adapter)
        return collect(pieces, self.tokenizer, name, self.backend.name)

    def generate(self, prompt: str | list[dict], adapter: str | None = None, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 chat: bool = False, stop: str | list[str] | None = None) -> str:
        """Generate a completion of `prompt` with `adapter` (None: the plain base)."""
        return self.complete(prompt, adapter, max_new_tokens, temperature, top_k, top_p, seed, chat,
                             stop=stop).text

    def stream(self, prompt: str | list[dict], adapter: str | None = None, max_new_tokens: int = 128,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
               chat: bool = False, stop: str | list[str] | None = None) -> Iterator[str]:
        """Like generate, yielding text pieces as they are decoded (stream_pieces gives token ids,
        finish reason and usage too)."""
        pieces = self.stream_pieces(prompt, adapter, max_new_tokens, temperature, top_k, top_p, seed, chat, stop)
        try:
            for piece in pieces:
                if piece.text:
                    yield piece.text
        finally:
            pieces.close()
