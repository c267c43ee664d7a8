"""The safetensors reader (edgepeft/tensors.py): one tensor at a time, file order, and the library's
refusals turned into our one-line errors. Random and mutated files are in test_fuzz.py."""

from __future__ import annotations

import json
import struct
import tracemalloc

import numpy as np
import pytest
from safetensors.numpy import save_file

from edgepeft import tensors as tensors_module
from edgepeft.errors import AdapterError, BundleError
from edgepeft.tensors import SafetensorsFile, read_safetensors


def write(path, header: dict, body: bytes):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + body)
    return path


def f32(name_offsets: dict) -> dict:
    return {n: {"dtype": "F32", "shape": [(b - a) // 4], "data_offsets": [a, b]} for n, (a, b) in name_offsets.items()}


def refused(path, **kwargs) -> str:
    with pytest.raises(AdapterError) as e:
        SafetensorsFile(path, **kwargs)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    return str(e.value)


def test_one_tensor_is_read_without_reading_the_others(tmp_path):
    big = np.ones((8 << 20) // 4, np.float32)  # 8 MiB
    small = np.arange(6, dtype=np.float16).reshape(2, 3)
    path = tmp_path / "x.safetensors"
    save_file({"big": big, "small": small}, str(path))
    tracemalloc.start()
    try:
        with SafetensorsFile(path) as f:
            assert f.dtype("small") == "F16" and f.shape("small") == [2, 3]
            np.testing.assert_array_equal(f.read("small"), small)
            peak_small = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()
            assert f.read("big").nbytes == big.nbytes
            peak_big = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak_small < 1 << 20 <= big.nbytes <= peak_big  # the big tensor's bytes are seen when read


def test_names_come_in_file_order_not_sorted(tmp_path):
    path = write(tmp_path / "x.safetensors", f32({"z": (0, 4), "a": (4, 12)}), np.arange(3, dtype="<f4").tobytes())
    with SafetensorsFile(path) as f:
        assert f.names == ["z", "a"]
    out = read_safetensors(path)
    assert list(out) == ["z", "a"] and out["a"].tolist() == [1.0, 2.0]


def test_bf16_is_reported_as_such_and_read_as_float32(tmp_path):
    values = np.array([[1.5, -2.25], [0.0078125, 2.0**100]], np.float32)
    raw = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    path = write(tmp_path / "x.safetensors", {"t": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}}, raw)
    with SafetensorsFile(path) as f:
        assert f.dtype("t") == "BF16"
        out = f.read("t")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, values)


@pytest.mark.parametrize("cut", ["truncated", "trailing"])
def test_data_that_does_not_end_with_the_file_is_refused(tmp_path, cut):
    body = np.zeros(4, "<f4").tobytes()
    body = body[:-4] if cut == "truncated" else body + b"\0" * 4
    path = write(tmp_path / "x.safetensors", f32({"t": (0, 16)}), body)
    assert "lies outside the file (truncated?)" in refused(path)


def test_overlapping_tensors_are_refused(tmp_path):
    path = write(tmp_path / "x.safetensors", f32({"a": (0, 8), "b": (4, 12)}), bytes(12))
    assert "invalid offset" in refused(path)


@pytest.mark.parametrize("dtype, itemsize", [("F8_E4M3", 1), ("U16", 2)])
def test_dtypes_the_library_knows_but_the_kinds_do_not_are_refused(tmp_path, dtype, itemsize):
    header = {"t": {"dtype": dtype, "shape": [2], "data_offsets": [0, 2 * itemsize]}}
    path = write(tmp_path / "x.safetensors", header, bytes(2 * itemsize))
    assert f"unsupported dtype {dtype!r}" in refused(path)


def test_more_dimensions_than_the_limit_are_refused(tmp_path):
    path = write(tmp_path / "x.safetensors", {"t": {"dtype": "U8", "shape": [1] * 9, "data_offsets": [0, 1]}}, b"\0")
    assert "9 dimensions, over the limit of 8" in refused(path)


def test_more_tensors_than_the_limit_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(tensors_module, "MAX_TENSORS", 2)
    path = write(tmp_path / "x.safetensors", f32({"a": (0, 4), "b": (4, 8), "c": (8, 12)}), bytes(12))
    assert "more than 2 tensors" in refused(path)


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path):
    path = write(tmp_path / "x.safetensors", f32({"a": (0, 4)}), bytes(4))
    assert "over the limit" in refused(path, max_bytes=16)


def test_a_newline_in_a_tensor_name_keeps_the_library_error_on_one_line(tmp_path):
    path = write(tmp_path / "x.safetensors", f32({"a\nb": (0, 8), "c\nd": (4, 12)}), bytes(12))
    assert "invalid offset" in refused(path)


def test_the_caller_chooses_the_error_type(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\1\2")
    with pytest.raises(BundleError, match="truncated header"):
        SafetensorsFile(path, error=BundleError)


def test_an_unknown_tensor_name_is_our_error(tmp_path):
    path = write(tmp_path / "x.safetensors", f32({"a": (0, 4)}), bytes(4))
    with SafetensorsFile(path) as f, pytest.raises(AdapterError, match="no tensor 'b'"):
        f.read("b")
