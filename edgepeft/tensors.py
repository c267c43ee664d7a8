"""Read safetensors files into numpy arrays, including bfloat16, without torch."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np

from .errors import AdapterError
from .limits import MAX_ADAPTER_FILE_BYTES, MAX_SAFETENSORS_HEADER, MAX_TENSOR_DIMS, MAX_TENSORS

# safetensors' own numpy loader cannot represent bfloat16 (numpy has no such dtype), and adapters
# trained on GPUs are often saved in bf16. For those files we parse the (documented, tiny)
# header ourselves and widen bf16 to float32 exactly by shifting the bits.
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
           "I32": np.int32, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _all_ints(shape, *offsets) -> bool:
    return all(type(v) is int and v >= 0 for v in (*shape, *offsets))


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Return every tensor in `path` as a numpy array (bf16 widened to float32)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_ADAPTER_FILE_BYTES:
                raise AdapterError(f"{path}: {size} bytes is over the limit for an adapter file "
                                   f"({MAX_ADAPTER_FILE_BYTES >> 30} GiB)")
            data = f.read()
    except OSError as e:
        raise AdapterError(f"{path}: cannot read ({e.strerror})") from None
    if len(data) < 8:
        raise AdapterError(f"{path}: not a safetensors file (truncated header)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_SAFETENSORS_HEADER or 8 + n > len(data):
        raise AdapterError(f"{path}: not a safetensors file (bad header length)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise AdapterError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{path}: not a safetensors file (header is not an object)")
    if len(header) > MAX_TENSORS + 1:
        raise AdapterError(f"{path}: more than {MAX_TENSORS} tensors")
    body = memoryview(data)[8 + n :]
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
            if not (isinstance(dtype, str) and len(shape) <= MAX_TENSOR_DIMS and _all_ints(shape, start, end)):
                raise ValueError
            # Python ints: the product cannot overflow, and is compared with the bytes present.
            count = math.prod(shape)
        except (KeyError, TypeError, ValueError):
            raise AdapterError(f"{path}: tensor {name[:80]!r} has a malformed header entry") from None
        if not (0 <= start <= end <= len(body)):
            raise AdapterError(f"{path}: tensor {name[:80]!r} lies outside the file (truncated?)")
        raw = body[start:end]
        if dtype == "BF16":
            if len(raw) != 2 * count:
                raise AdapterError(f"{path}: tensor {name[:80]!r} has {len(raw)} bytes for shape {shape}")
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32)
        elif dtype in _DTYPES:
            np_dtype = np.dtype(_DTYPES[dtype]).newbyteorder("<")
            if len(raw) != np_dtype.itemsize * count:
                raise AdapterError(f"{path}: tensor {name[:80]!r} has {len(raw)} bytes for shape {shape}")
            arr = np.frombuffer(raw, dtype=np_dtype).copy()
        else:
            raise AdapterError(f"{path}: tensor {name[:80]!r} has unsupported dtype {dtype[:16]!r}")
        out[name] = arr.reshape(shape)
    return out
