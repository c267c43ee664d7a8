"""The ONNX base's large initializers written to its external data file as they are made.

onnx.save_model with external data writes every initializer's bytes when the whole ModelProto is
done, so the graph would hold all of them (the quantized weights, the fp16 embedding table) until
the end. ExternalData writes an array's bytes at the end of the data file at once and returns a
reference (dtype, shape, offset, length); the graph keeps only a TensorProto that points there
(onnx.external_data_helper.set_external_data, the format onnx.save_model writes itself). What is
left with bytes in the proto (the small initializers) onnx.save_model appends after them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepeft.errors import require


@dataclass(frozen=True)
class ExternalRef:
    """An array written to a data file: its dtype, shape and where its bytes are."""

    location: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int
    length: int


class ExternalData:
    """Appends arrays to `model_path`'s data file `location` (created empty), in the order they
    come: the caller writes them in a fixed order, so the file's layout does not depend on timing."""

    def __init__(self, model_path: Path, location: str):
        self.location = location
        model_path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(model_path.parent / location, "wb")

    def write(self, arr: np.ndarray) -> ExternalRef:
        """Append `arr`'s bytes (little-endian, C order: what numpy_helper.from_array would store)."""
        return self.write_rows(arr.dtype, arr.shape, [arr])

    def write_rows(self, dtype, shape: tuple[int, ...], chunks) -> ExternalRef:
        """Append one tensor of `dtype` and `shape` given as consecutive blocks of rows."""
        dtype = np.dtype(dtype).newbyteorder("<")
        offset = self.file.tell()
        for chunk in chunks:
            self.file.write(memoryview(np.ascontiguousarray(chunk, dtype)).cast("B"))
        length = self.file.tell() - offset
        if length != int(np.prod(shape)) * dtype.itemsize:
            raise ValueError(f"{self.location}: wrote {length} bytes for a {dtype} tensor of shape {list(shape)}")
        return ExternalRef(self.location, dtype, tuple(int(s) for s in shape), offset, length)

    def close(self) -> None:
        self.file.close()


def tensor(value, name: str):
    """A TensorProto named `name`: from an array (its bytes inside) or from an ExternalRef (only
    the reference inside)."""
    onnx = require("onnx", "export")
    if not isinstance(value, ExternalRef):
        return onnx.numpy_helper.from_array(value, name)
    t = onnx.TensorProto(name=name, dims=value.shape,
                         data_type=onnx.helper.np_dtype_to_tensor_dtype(value.dtype.newbyteorder("=")))
    t.raw_data = b""  # set_external_data takes only a tensor with raw data; it holds none after
    onnx.external_data_helper.set_external_data(t, value.location, value.offset, value.length)
    t.ClearField("raw_data")
    return t
