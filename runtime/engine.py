"""The Engine: a bundle's base loaded once, adapters loaded beside it, chosen per call."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from edgepeft.bundle import Bundle, check_adapter_name
from edgepeft.errors import BundleError, EngineError, InvalidArgument, unknown_adapter

from .devices import check_device
from .sampling import Sampler, SamplingParams, generation_params
from .scheduler import Request, Scheduler
from .tokenizer import IncrementalDecoder, Tokenizer

BACKENDS = ("onnx", "gguf")


@dataclass
class Completion:
    """What one generate call produced, for `run --json` and the bench."""

    text: str
    tokens: list[int]
    adapter: str | None
    backend: str
    prompt_tokens: int
    stop_reason: str
    timings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "adapter": self.adapter,
                "backend": self.backend, "prompt_tokens": self.prompt_tokens,
                "stop_reason": self.stop_reason, "timings": self.timings}


@dataclass(frozen=True)
class Usage:
    """Token counts of one call, as OpenAI's `usage` reports them."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_json(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens}


@dataclass
class StreamPiece:
    """One step of `Engine.stream_pieces`: the new text and the generated token ids behind it.
    The last piece of a call has `finish_reason` ("stop": an end token or a stop string; "length":
    max_new_tokens or the context) and `usage`; its text may be empty."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None


class _StopStrings:
    """Cuts streamed text at the first of several stop strings (the stop string itself is not
    returned, as OpenAI and vLLM do). Text that could be the start of a stop string is held back
    until the next piece shows whether it is."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was reached)."""
        buf = self.held + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held = ""
            return buf[:cut], True
        keep = max((k for s in self.stops for k in range(min(len(s) - 1, len(buf)), 0, -1)
                    if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


def check_stop(stop) -> list[str]:
    """A call's stop strings: None, one string or a list of strings (at most 16)."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise InvalidArgument("stop must be a string or a list of strings")
    if len(stops) > 16:
        raise InvalidArgument(f"stop has {len(stops)} strings; at most 16 are allowed")
    return list(stops)


def _make_backend(bundle: Bundle, backend: str, device: str, threads: int | None,
                  max_context: int | None = None, gpu_layers: int | None = None, parallel: int | None = None):
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

    def __init__(self, bundle: Bundle, backend, load_seconds: float, max_resident_adapters: int | None = None,
                 batching: bool = True):
        self.bundle = bundle
        self.backend = backend
        self.tokenizer = Tokenizer(bundle.root, bundle.manifest["tokenizer"])
        self.load_seconds = load_seconds
        # One line when the device asked for is not what runs (e.g. no CUDA provider): the CLI
        # prints it; the engine still runs, on the CPU.
        self.device_note: str | None = getattr(backend, "device_note", None)
        self._adapters: OrderedDict[str, object] = OrderedDict()  # least recently used first
        self._lazy: set[str] = set()  # bundle adapters loaded on first use
        self._combos: dict[tuple, tuple] = {}  # names -> (member handles, combined handle)
        self.max_resident = max_resident_adapters
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        # Continuous batching (runtime/scheduler.py): made on the first call, where the backend
        # can batch; False where it cannot (or batching=False), and calls run one forward each.
        self._scheduler: Scheduler | None | bool = None if batching else False
        self._probe = None  # a batcher that answers can_batch; it holds no cache

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
        batching=False runs each call on its own forward passes, as before batching."""
        # Bad arguments fail before the bundle's files are hashed or a model loads.
        check_device(device)
        for what, value in (("max context", max_context), ("max resident adapters", max_resident_adapters),
                            ("parallel", parallel), ("threads", threads)):
            if value is not None and value < 1:
                raise InvalidArgument(f"{what} {value} must be at least 1")
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
                engine._lazy.update(names)
        return engine

    # ---- adapters ------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        """Names of the adapters calls may use: loaded ones, and bundle ones loaded on first use."""
        with self._lock:
            return sorted(set(self._adapters) | self._lazy)  # stable order: LRU use reorders _adapters

    @property
    def resident_adapters(self) -> list[str]:
        """Names of the adapters in memory now, least recently used first."""
        with self._lock:
            return list(self._adapters)

    def load_adapter(self, name: str, path: str | Path | None = None) -> None:
        """Load adapter `name` from `path` (an adapter file), or from the bundle when omitted."""
        check_adapter_name(name)
        path = Path(path) if path is not None else self.bundle.adapter_path(name, self.backend.name)
        self._load(name, path)

    def _load(self, name: str, path: Path):
        # Make room first, so that at most max_resident adapters are ever in memory at once
        # (calls that still use an evicted one keep it until they end).
        with self._lock:
            room = self._evict(keep=name, room=1) if name not in self._adapters else []
        for h in room:
            self._free(h)
        handle = self.backend.load_adapter(path)
        with self._lock:
            old, self._adapters[name] = self._adapters.pop(name, None), handle
            self._lazy.discard(name)
            evicted = self._evict(keep=name)  # another thread may have loaded one meanwhile
        for h in ([old] if old is not None else []) + evicted:
            self._free(h)
        return handle

    def _evict(self, keep: str, room: int = 0) -> list:
        """Pop least recently used handles (never `keep`) until `room` more fit under the
        resident bound; caller holds the lock. Bundle adapters stay loadable on next use."""
        out = []
        while self.max_resident is not None and len(self._adapters) > self.max_resident - room:
            name = next(n for n in self._adapters if n != keep)
            out.append(self._adapters.pop(name))
            if name in self.bundle.adapters:
                self._lazy.add(name)
        return out

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            handle = self._adapters.pop(name, None)
            was_lazy = name in self._lazy
            self._lazy.discard(name)
        if handle is None:
            if was_lazy:
                return  # never loaded: nothing in memory to free
            raise BundleError(f"adapter {name!r} is not loaded")
        self._free(handle)

    def _free(self, handle) -> None:
        free = getattr(self.backend, "free_adapter", None)
        if free is not None:  # llama.cpp handles are freed explicitly; ONNX ones by refcount
            free(handle)

    def switch_seconds(self, name: str, repeats: int = 200) -> list[float]:
        """Time switching to adapter `name` from the plain base, `repeats` times (for demo and
        bench): the work a call does when its adapter differs from the previous call's."""
        handle, out = self._adapter(name), []
        for _ in range(repeats):
            self.backend.switch_to(None)
            t = time.perf_counter()
            self.backend.switch_to(handle)
            out.append(time.perf_counter() - t)
        self.backend.switch_to(None)
        return out

    def _adapter(self, adapter: str | list[str] | tuple[str, ...] | None):
        """The backend handle for `adapter`: a name, or several ("a+b" or a list) active together."""
        if adapter is None:
            return None
        names = adapter.split("+") if isinstance(adapter, str) else list(adapter)
        if len(names) == 1:
            return self._one(names[0])
        if len(set(names)) != len(names):
            raise EngineError(f"adapter list {names} names an adapter twice")
        handles = tuple(self._one(n) for n in names)
        key = tuple(names)
        with self._lock:
            cached = self._combos.get(key)
        if cached is not None and all(a is b for a, b in zip(cached[0], handles)):
            return cached[1]
        combo = self.backend.combine(list(handles), names)
        with self._lock:
            self._combos[key] = (handles, combo)
            while len(self._combos) > 8:  # a few combinations stay ready; the rest are rebuilt on use
                self._combos.pop(next(iter(self._combos)))
        return combo

    def _one(self, name: str):
        with self._lock:
            handle = self._adapters.get(name)
            if handle is not None:
                self._adapters.move_to_end(name)
                return handle
            lazy = name in self._lazy
        if not lazy:
            raise unknown_adapter(name, self.adapters)
        with self._load_lock:  # one thread loads it; the others wait and take the loaded handle
            with self._lock:
                handle = self._adapters.get(name)
            if handle is None:
                # A call keeps the handle it got even if another call evicts it meanwhile (ONNX
                # frees by refcount; llama.cpp frees only between calls, under the context lock).
                handle = self._load(name, self.bundle.adapter_path(name, self.backend.name))
        return handle

    # ---- running -------------------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        """Positions one call may use (prompt, generated tokens, an adapter's virtual tokens)."""
        return int(self.backend.context_length)

    def virtual_tokens(self, adapter: str | list[str] | None) -> int:
        """Context positions `adapter`'s virtual tokens take before the prompt (prompt and prefix
        kinds; 0 for the others). Raises BundleError for an unknown adapter."""
        return self._prefix_length(self._adapter(adapter))

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
        handle = self._adapter(adapter)
        # Logits of the real tokens only: virtual tokens (prompt/prefix kinds) sit in the cache.
        with self.backend.sequence(handle, self._prefix_length(handle) + len(ids)) as seq:
            return seq.forward(ids, all_logits=True)

    def _prefix_length(self, handle) -> int:
        """Context positions an adapter's virtual tokens take before the prompt (0 for most)."""
        prefix_length = getattr(self.backend, "prefix_length", None)
        return prefix_length(handle) if prefix_length is not None else 0

    def _check_ids(self, ids: list[int]) -> list[int]:
        vocab = self.bundle.base["dims"]["vocab_size"]
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidArgument(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        return ids

    def _tokens(self, prompt_ids: list[int], adapter: str | None, max_new_tokens: int,
                params: SamplingParams, chat: bool, timings: dict, ignore_eos: bool = False) -> Iterator[int]:
        handle = self._adapter(adapter)
        if not prompt_ids:
            raise EngineError("the prompt encodes to no tokens")
        virtual = self._prefix_length(handle)
        budget = min(virtual + len(prompt_ids) + max_new_tokens, self.backend.context_length)
        if budget <= virtual + len(prompt_ids):
            raise EngineError(f"prompt of {len(prompt_ids)} tokens"
                              + (f" after the adapter's {virtual} virtual tokens" if virtual else "")
                              + f" leaves no room in the context ({self.backend.context_length})")
        self._check_ids(prompt_ids)
        sampler, stop = Sampler(params), set() if ignore_eos else self.tokenizer.stop_ids(chat)
        scheduler = self._scheduler_for(handle)
        if scheduler is not None:
            req = Request(list(prompt_ids), handle, budget, max_new_tokens, sampler, stop)
            scheduler.submit(req)
            yield from req.tokens(timings)
            return
        # A LongRoPE base switches to its long factors past this position, and the whole cache is
        # recomputed with them there, as transformers' generate does (onnx_rotary.py).
        switch, history = getattr(self.backend, "rope_switch", None), list(prompt_ids)
        with self.backend.sequence(handle, budget) as seq:
            t0 = time.perf_counter()
            logits = seq.forward(prompt_ids, all_logits=False)[-1]
            timings["prefill_s"] = time.perf_counter() - t0
            t1, n = time.perf_counter(), 0
            try:
                while True:
                    token = sampler(logits)
                    if token in stop:
                        timings["stop_reason"] = "stop"
                        return
                    n += 1
                    yield token
                    if seq.length >= budget or n >= max_new_tokens:
                        timings["stop_reason"] = "length"
                        return
                    history.append(token)
                    if switch is not None and seq.length == switch:
                        logits = seq.restart(history)[-1]
                    else:
                        logits = seq.forward([token])[-1]
            finally:
                timings["decode_s"] = time.perf_counter() - t1
                timings["decode_tokens"] = n

    def _scheduler_for(self, handle) -> Scheduler | None:
        """The scheduler a call on `handle` joins, or None: the call runs on its own."""
        with self._lock:
            if self._scheduler is None:
                make = getattr(self.backend, "batcher", None)
                self._probe = make() if make is not None else None
                self._scheduler = Scheduler(make, self.backend.parallel) if self._probe is not None else False
            scheduler = self._scheduler
        return scheduler if scheduler and self._probe.can_batch(handle) else None

    def stream_pieces(self, prompt: str | list[dict], adapter: str | None = None, max_new_tokens: int = 128,
                      temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                      chat: bool = False, stop: str | list[str] | None = None,
                      ignore_eos: bool = False) -> Iterator[StreamPiece]:
        """Generate as `stream` does, yielding StreamPiece objects (text, token ids; finish reason
        and usage on the last one). Closing the iterator early (`close()`, or dropping it) ends
        the call and frees its KV cache before the next token is computed."""
        params = generation_params(max_new_tokens, temperature, top_k, top_p, seed)
        stops = check_stop(stop)
        ids = self.encode_prompt(prompt, chat)
        return self._pieces(ids, adapter, max_new_tokens, params, chat, stops, ignore_eos, {})

    def _pieces(self, ids: list[int], adapter, max_new_tokens: int, params: SamplingParams, chat: bool,
                stops: list[str], ignore_eos: bool, timings: dict) -> Iterator[StreamPiece]:
        decoder, cutter = IncrementalDecoder(self.tokenizer), _StopStrings(stops)
        tokens = self._tokens(ids, adapter, max_new_tokens, params, chat, timings, ignore_eos)
        pending: list[int] = []  # generated ids whose text is not yielded yet
        n, reason = 0, None
        try:
            for token in tokens:
                n += 1
                pending.append(token)
                text, hit = cutter.push(decoder.push(token))
                if hit:
                    reason = "stop"
                    timings["stop_string"] = True
                    break
                if text:
                    yield StreamPiece(text, pending)
                    pending = []
        finally:
            tokens.close()  # ends the sequence now, also when our caller stopped early
        if reason is None:
            reason = timings.get("stop_reason", "length")
            text, hit = cutter.push(decoder.flush())
            if hit:
                reason = "stop"
                timings["stop_string"] = True
            else:
                text += cutter.flush()
        timings["stop_reason"] = reason
        yield StreamPiece(text, pending, reason, Usage(len(ids), n))

    def complete(self, prompt: str | list[dict], adapter: str | None = None, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 chat: bool = False, ignore_eos: bool = False, stop: str | list[str] | None = None) -> Completion:
        """Generate and return text, token ids and timings. ignore_eos generates exactly
        max_new_tokens (for benchmarks, like llama-bench); stop: strings that end the text
        (not included in it)."""
        params = generation_params(max_new_tokens, temperature, top_k, top_p, seed)
        stops = check_stop(stop)
        ids = self.encode_prompt(prompt, chat)
        timings: dict = {}
        if stops:
            pieces = list(self._pieces(ids, adapter, max_new_tokens, params, chat, stops, ignore_eos, timings))
            tokens = [t for p in pieces for t in p.token_ids]
            hit = timings.pop("stop_string", False)
            text = "".join(p.text for p in pieces) if hit else self.tokenizer.decode(tokens)
        else:  # no text to watch while generating: decode once at the end
            tokens = list(self._tokens(ids, adapter, max_new_tokens, params, chat, timings, ignore_eos))
            text = self.tokenizer.decode(tokens)
        return Completion(
            text=text, tokens=tokens, adapter=adapter, backend=self.backend.name,
            prompt_tokens=len(ids), stop_reason=timings.pop("stop_reason", "length"),
            timings=_rates(timings, len(ids), self.load_seconds),
        )

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


def _rates(t: dict, prompt_tokens: int, load_s: float) -> dict:
    out = {"load_s": round(load_s, 4), "prefill_s": round(t.get("prefill_s", 0.0), 4),
           "prefill_tokens_per_s": round(prompt_tokens / t["prefill_s"], 2) if t.get("prefill_s") else None,
           "decode_tokens": t.get("decode_tokens", 0)}
    dec = t.get("decode_tokens", 0)
    # The first generated token comes from the prefill logits; decode rate counts the forward
    # passes after it.
    out["decode_tokens_per_s"] = round((dec - 1) / t["decode_s"], 2) if dec > 1 and t.get("decode_s") else None
    return out
