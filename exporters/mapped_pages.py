"""Pages of a file that a native library maps whole and reads once, given back as it goes.

llama.cpp's quantizer maps its source GGUF (a float copy of the whole base) and reads it tensor by
tensor; every page it has read stays resident in the mapping, and counts in the process's RSS,
until the map closes at the end, so the export's peak would include the whole source file.
`released(path)` asks the kernel, a few times a second while the block runs, to reclaim the
pages of this process's mappings of `path` (madvise MADV_PAGEOUT). The mapping stays valid: a
page read again is read back from the file. MADV_PAGEOUT, not MADV_DONTNEED: should the map
close and its addresses be reused by other memory between the look at /proc/self/maps and the
call, PAGEOUT only writes that memory out (to swap, if any), where DONTNEED would zero it.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

MADV_PAGEOUT = 21  # linux/mman.h, Linux 5.4 and later; older kernels refuse it (EINVAL): nothing happens
EVERY_S = 0.2


def mappings(path: Path) -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of `path` (/proc/self/maps)."""
    target = os.path.realpath(path)
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].rstrip("\n") == target:
                start, end = parts[0].split("-")
                spans.append((int(start, 16), int(end, 16)))
    return spans


def _release(madvise, path: Path) -> None:
    for start, end in mappings(path):
        madvise(start, end - start, MADV_PAGEOUT)


@contextmanager
def released(path: Path, every_s: float = EVERY_S):
    """While the block runs, reclaim `path`'s mapped pages every `every_s` seconds (Linux only;
    elsewhere the block runs as it is)."""
    if not sys.platform.startswith("linux"):
        yield
        return
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    stop = threading.Event()

    def run():
        while not stop.wait(every_s):
            _release(madvise, path)

    worker = threading.Thread(target=run, name="edgepeft-mapped-pages", daemon=True)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join()
