"""Read safetensors files into numpy arrays without torch, through the safetensors library: the
file is memory-mapped and each tensor is read when asked for, so a caller can go through a large
checkpoint one tensor at a time. bfloat16 tensors are widened to float32 (exactly)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from .byte_sizes import format_bytes
from .errors import AdapterError
from .limits import MAX_ADAPTER_FILE_BYTES, MAX_SAFETENSORS_HEADER, MAX_TENSOR_DIMS, MAX_TENSORS

# The dtypes the adapter kinds handle; the library knows more (float8, float4, unsigned ints...).
_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "I64", "I32", "I8", "U8", "BOOL"})
_LIBRARY_PREFIX = "Error while deserializing header: "


class SafetensorsFile:
    """A checked safetensors file: `names` (in file order), each tensor's `dtype` and `shape`, and
    `read(name)`, which reads that tensor alone. Use it as a context manager (closes the map).

    The library refuses malformed headers, offsets, sizes and overlaps itself. Checked here: before
    it, the file's size and the header's length (edgepeft.limits, in the words docs and tests use);
    after it, the tensor count and dimensions, which it does not bound, and the dtypes we read."""

    def __init__(self, path: str | Path, error: type[Exception] = AdapterError,
                 max_bytes: int = MAX_ADAPTER_FILE_BYTES):
        self.path, self._error = Path(path), error
        _check_length(self.path, error, max_bytes)
        self._file = None
        try:
            self._file = safe_open(str(self.path), framework="numpy")
            self.names: list[str] = self._file.offset_keys()
            if len(self.names) > MAX_TENSORS:
                raise error(f"{self.path}: more than {MAX_TENSORS} tensors")
            self._info = {}
            for name in self.names:
                view = self._file.get_slice(name)
                self._info[name] = dtype, shape = view.get_dtype(), list(view.get_shape())
                if dtype not in _DTYPES:
                    raise error(f"{self.path}: tensor {name[:80]!r} has unsupported dtype {dtype[:16]!r}")
                if len(shape) > MAX_TENSOR_DIMS:
                    raise error(f"{self.path}: tensor {name[:80]!r} has {len(shape)} dimensions, "
                                f"over the limit of {MAX_TENSOR_DIMS}")
        except BaseException as e:
            self.close()
            if isinstance(e, SafetensorError):
                raise error(f"{self.path}: {_library_reason(e)}") from None
            if isinstance(e, OSError):
                raise error(f"{self.path}: cannot read ({e.strerror or e})") from None
            raise

    def dtype(self, name: str) -> str:
        """The file's dtype code of `name` ("F32", "BF16"...)."""
        return self._info[name][0]

    def shape(self, name: str) -> list[int]:
        return list(self._info[name][1])

    def read(self, name: str) -> np.ndarray:
        """Tensor `name` as a new numpy array (bf16 widened to float32); reads only its bytes."""
        if self._file is None:
            raise ValueError(f"{self.path}: read after close")
        if name not in self._info:
            raise self._error(f"{self.path}: no tensor {name[:80]!r}")
        bf16 = self._info[name][0] == "BF16"
        if bf16:
            # numpy has no bfloat16; ml_dtypes registers the dtype the library asks numpy for.
            import ml_dtypes  # noqa: F401
        try:
            arr = self._file.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise self._error(f"{self.path}: tensor {name[:80]!r} cannot be read ({_one_line(e)[:200]})") from None
        return arr.astype(np.float32) if bf16 else arr

    def close(self) -> None:
        """Unmap the file; arrays already read stay valid (they are copies)."""
        if self._file is not None:
            self._file.__exit__(None, None, None)
            self._file = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Return every tensor in `path` as a numpy array (bf16 widened to float32), in file order."""
    with SafetensorsFile(path) as f:
        return {name: f.read(name) for name in f.names}


def _check_length(path: Path, error: type[Exception], max_bytes: int) -> None:
    """The file's size and its header's length against our limits, before the library maps it."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    if size > max_bytes:
        raise error(f"{path}: {format_bytes(size)}, over the limit of {format_bytes(max_bytes)} for this file")
    if len(head) < 8:
        raise error(f"{path}: not a safetensors file (truncated header)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_SAFETENSORS_HEADER or 8 + n > size:
        raise error(f"{path}: not a safetensors file (bad header length)")


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _library_reason(e: SafetensorError) -> str:
    """The library's refusal as our phrase: its text, on one line and bounded."""
    text = _one_line(e).removeprefix(_LIBRARY_PREFIX)
    if text.startswith("incomplete metadata"):  # the tensors' data and the file's end disagree
        return "tensor data lies outside the file (truncated?) or ends before the file does"
    return f"not a valid safetensors file ({text[:200]})"
