"""The fast path of the sha256 check at open: a cache of file hashes keyed by what a rewrite
changes (device, inode, size, mtime), kept under the edgepeft cache directory, never in the bundle.

A file whose (size, mtime) still match its cached entry is not re-read. What this trusts and what
it does not is in docs/security.md; `--verify-hashes` (and `edgepeft verify`) bypass it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from .cache import cache_dir
from .files import sha256_file, write_json_atomic

CACHE_FILE = "file-hashes.json"
MAX_ENTRIES = 4096
# A file modified within this window of being hashed may be modified again with the same size
# and (coarse) mtime; such files are hashed but not cached ("racy git" in git's index).
RACY_NS = 2_000_000_000

_lock = threading.Lock()


def _key(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}"


def _load(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return {}  # a missing or damaged cache is an empty one
    if not isinstance(obj, dict):
        return {}
    return {k: v for k, v in obj.items()
            if isinstance(v, list) and len(v) == 3 and all(isinstance(x, int) for x in v[:2])
            and isinstance(v[2], str)}


def file_hashes(paths: list[Path], use_cache: bool = True) -> dict[Path, str]:
    """sha256 of each path: from the cache where (size, mtime) still match, else by reading it
    (use_cache=False reads every file). The cache is updated either way; an unwritable cache
    directory only costs speed."""
    cache_path = cache_dir() / CACHE_FILE
    with _lock:
        cache = _load(cache_path)
    out, changed, now = {}, False, time.time_ns()
    for path in paths:
        st = os.stat(path)
        key = _key(st)
        entry = cache.get(key)
        if use_cache and entry is not None and entry[:2] == [st.st_size, st.st_mtime_ns]:
            out[path] = entry[2]
            continue
        out[path] = digest = sha256_file(path)
        if now - st.st_mtime_ns >= RACY_NS and os.stat(path).st_mtime_ns == st.st_mtime_ns:
            cache.pop(key, None)  # re-insert last: the oldest entries are dropped first
            cache[key] = [st.st_size, st.st_mtime_ns, digest]
            changed = True
    if changed:
        for key in list(cache)[: max(0, len(cache) - MAX_ENTRIES)]:
            del cache[key]
        try:
            with _lock:
                write_json_atomic(cache_path, cache)
        except OSError:
            pass
    return out
