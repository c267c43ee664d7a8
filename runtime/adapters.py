"""The Engine's adapters: which are loaded, which load on first use, which combinations are
ready, and the one place an adapter spec ("name", "a+b" or a list) is read.

Ownership: the registry holds one backend handle per loaded adapter and gives it to calls; the
backend frees a handle's native memory (`Backend.free_adapter`) when the registry drops it, and
calls that still use it keep it until they end.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from edgepeft.bundle import Bundle, check_adapter_name
from edgepeft.errors import BundleError, EngineError, unknown_adapter

from .backend import Backend

MAX_COMBINATIONS = 8  # combinations kept ready; the rest are rebuilt on use


def adapter_names(spec: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """The adapters a spec names: () for None (the base), one name, or several active together
    ("a+b" or a list), as vLLM's multi-LoRA serving names them."""
    if spec is None:
        return ()
    names = tuple(spec.split("+")) if isinstance(spec, str) else tuple(spec)
    if len(set(names)) != len(names):
        raise EngineError(f"adapter list {list(names)} names an adapter twice")
    return names


class AdapterRegistry:
    """Thread-safe: calls may take handles while others load and unload adapters. With
    `max_resident=K`, bundle adapters load on first use and the least recently used one is
    unloaded when a (K+1)-th is needed."""

    def __init__(self, bundle: Bundle, backend: Backend, max_resident: int | None = None):
        self.bundle, self.backend, self.max_resident = bundle, backend, max_resident
        self._loaded: OrderedDict[str, object] = OrderedDict()  # least recently used first
        self._lazy: set[str] = set()  # bundle adapters loaded on first use
        self._combos: dict[tuple, tuple] = {}  # names -> (member handles, combined handle)
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        """Adapters calls may use: loaded ones, and bundle ones loaded on first use."""
        with self._lock:
            return sorted(set(self._loaded) | self._lazy)  # stable order: use reorders _loaded

    @property
    def resident(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def defer(self, names: list[str]) -> None:
        """Load these bundle adapters on first use."""
        with self._lock:
            self._lazy.update(names)

    def check(self, spec) -> None:
        """Raise BundleError for the first adapter `spec` names that calls cannot use."""
        have = set(self.names)
        for name in adapter_names(spec):
            if name not in have:
                raise unknown_adapter(name, sorted(have))

    def load(self, name: str, path: str | Path | None = None) -> object:
        check_adapter_name(name)
        path = Path(path) if path is not None else self.bundle.adapter_path(name, self.backend.name)
        # Make room first, so that at most max_resident adapters are ever in memory at once.
        with self._lock:
            room = self._evict(keep=name, room=1) if name not in self._loaded else []
        self._free(room)
        handle = self.backend.load_adapter(path)
        with self._lock:
            old, self._loaded[name] = self._loaded.pop(name, None), handle
            self._lazy.discard(name)
            evicted = self._evict(keep=name)  # another thread may have loaded one meanwhile
        self._free(([old] if old is not None else []) + evicted)
        return handle

    def unload(self, name: str) -> None:
        with self._lock:
            handle = self._loaded.pop(name, None)
            was_lazy = name in self._lazy
            self._lazy.discard(name)
        if handle is None and not was_lazy:
            raise BundleError(f"adapter {name!r} is not loaded")
        self._free([handle] if handle is not None else [])

    def _evict(self, keep: str, room: int = 0) -> list:
        """Pop least recently used handles (never `keep`) until `room` more fit under the bound;
        caller holds the lock. Bundle adapters stay loadable on next use."""
        out = []
        while self.max_resident is not None and len(self._loaded) > self.max_resident - room:
            name = next(n for n in self._loaded if n != keep)
            out.append(self._loaded.pop(name))
            if name in self.bundle.adapters:
                self._lazy.add(name)
        return out

    def _free(self, handles: list) -> None:
        for h in handles:
            self.backend.free_adapter(h)

    def handle(self, spec):
        """The backend handle for `spec` (None: the base), loading lazy adapters."""
        names = adapter_names(spec)
        if not names:
            return None
        if len(names) == 1:
            return self._one(names[0])
        handles = tuple(self._one(n) for n in names)
        with self._lock:
            cached = self._combos.get(names)
        if cached is not None and all(a is b for a, b in zip(cached[0], handles)):
            return cached[1]
        combo = self.backend.combine(list(handles), list(names))
        with self._lock:
            self._combos[names] = (handles, combo)
            while len(self._combos) > MAX_COMBINATIONS:
                self._combos.pop(next(iter(self._combos)))
        return combo

    def _one(self, name: str):
        with self._lock:
            handle = self._loaded.get(name)
            if handle is not None:
                self._loaded.move_to_end(name)
                return handle
            lazy = name in self._lazy
        if not lazy:
            raise unknown_adapter(name, self.names)
        with self._load_lock:  # one thread loads it; the others wait and take the loaded handle
            with self._lock:
                handle = self._loaded.get(name)
            # A call keeps the handle it got even if another evicts it meanwhile: the backend
            # frees it only once nothing applies it.
            return handle if handle is not None else self.load(name)
