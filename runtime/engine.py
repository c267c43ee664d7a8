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


def _make_backend(bundle: Bundle, backend: str, device: str, threads: int | None,
                  max_context: int | None = None, gpu_layers: int | None = None):
    if backend == "onnx":
        from .onnx_backend import OnnxBackend

        return OnnxBackend(bundle, device=device, threads=threads, max_context=max_context)
    if backend == "gguf":
        from .gguf_backend import GgufBackend

        return GgufBackend(bundle, device=device, threads=threads, n_gpu_layers=gpu_layers,
                           context_length=max_context)
    raise BundleError(f"backend {backend!r} is not available (choose from {', '.join(BACKENDS)})")


class Engine:
    """Generate with a bundle's base and any of its adapters.

    Thread-safe: calls may run concurrently, each with its own adapter; loading and unloading
    adapters is safe while other calls run (a call keeps the adapter it started with).

    With `max_resident_adapters=K` the bundle's adapters load lazily, on first use, and the least
    recently used one is unloaded when a (K+1)-th is needed (for small-memory devices)."""

    def __init__(self, bundle: Bundle, backend, load_seconds: float, max_resident_adapters: int | None = None):
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

    @classmethod
    def open(cls, bundle: str | Path | Bundle, backend: str = "onnx", device: str = "auto",
             threads: int | None = None, load_adapters: bool = True, max_context: int | None = None,
             max_resident_adapters: int | None = None, gpu_layers: int | None = None) -> "Engine":
        """Open a bundle: the base loads once; with load_adapters, so does every bundled adapter
        (or, with max_resident_adapters, each on first use).

        device: auto, cpu, cuda, tensorrt, coreml, dml, openvino (see docs/devices.md); one the
        installed engine lacks falls back to the CPU and sets `device_note`. max_context bounds
        each call's KV cache; gpu_layers offloads only that many layers (GGUF)."""
        # Bad arguments fail before the bundle's files are hashed or a model loads.
        check_device(device)
        for what, value in (("max context", max_context), ("max resident adapters", max_resident_adapters)):
            if value is not None and value < 1:
                raise InvalidArgument(f"{what} {value} must be at least 1")
        t0 = time.perf_counter()
        b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        engine = cls(b, _make_backend(b, backend, device, threads, max_context, gpu_layers),
                     time.perf_counter() - t0, max_resident_adapters)
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
    def encode_prompt(self, prompt: str | list[dict], chat: bool = False) -> list[int]:
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
            raise EngineError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
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

    def complete(self, prompt: str | list[dict], adapter: str | None = None, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 chat: bool = False, ignore_eos: bool = False) -> Completion:
        """Generate and return text, token ids and timings. ignore_eos generates exactly
        max_new_tokens (for benchmarks, like llama-bench)."""
        params = generation_params(max_new_tokens, temperature, top_k, top_p, seed)
        ids = self.encode_prompt(prompt, chat)
        timings: dict = {}
        tokens = list(self._tokens(ids, adapter, max_new_tokens, params, chat, timings, ignore_eos))
        return Completion(
            text=self.tokenizer.decode(tokens), tokens=tokens, adapter=adapter, backend=self.backend.name,
            prompt_tokens=len(ids), stop_reason=timings.pop("stop_reason", "length"),
            timings=_rates(timings, len(ids), self.load_seconds),
        )

    def generate(self, prompt: str | list[dict], adapter: str | None = None, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 chat: bool = False) -> str:
        """Generate a completion of `prompt` with `adapter` (None: the plain base)."""
        return self.complete(prompt, adapter, max_new_tokens, temperature, top_k, top_p, seed, chat).text

    def stream(self, prompt: str | list[dict], adapter: str | None = None, max_new_tokens: int = 128,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
               chat: bool = False) -> Iterator[str]:
        """Like generate, yielding text pieces as they are decoded."""
        params = generation_params(max_new_tokens, temperature, top_k, top_p, seed)
        decoder = IncrementalDecoder(self.tokenizer)
        for token in self._tokens(self.encode_prompt(prompt, chat), adapter, max_new_tokens, params, chat, {}):
            piece = decoder.push(token)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail


def _rates(t: dict, prompt_tokens: int, load_s: float) -> dict:
    out = {"load_s": round(load_s, 4), "prefill_s": round(t.get("prefill_s", 0.0), 4),
           "prefill_tokens_per_s": round(prompt_tokens / t["prefill_s"], 2) if t.get("prefill_s") else None,
           "decode_tokens": t.get("decode_tokens", 0)}
    dec = t.get("decode_tokens", 0)
    # The first generated token comes from the prefill logits; decode rate counts the forward
    # passes after it.
    out["decode_tokens_per_s"] = round((dec - 1) / t["decode_s"], 2) if dec > 1 and t.get("decode_s") else None
    return out
