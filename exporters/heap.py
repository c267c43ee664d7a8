"""Large buffers given back to the kernel when freed (glibc's malloc).

glibc maps a buffer of at least its mmap threshold on its own, and unmaps it when it is freed;
smaller ones come from its heap, whose freed holes stay resident. The threshold starts at 128 KiB
and rises to the size of each mapped buffer freed (up to 32 MiB): after the first layer's weights
are freed, every later buffer of a few MiB (a smaller model's weights, activations) comes from
the heap, and an export that reads a layer at a time keeps the holes of the layers before, so
its peak grows with the number of layers. A fixed threshold (mallopt M_MMAP_THRESHOLD, which also
stops the rise) maps every buffer of 1 MiB or more on its own. It applies to the whole process.
"""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3  # malloc.h
THRESHOLD = 1 << 20


def map_large_buffers(threshold: int = THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes; False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt, their own policy
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1
