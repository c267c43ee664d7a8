"""The ONNX base's large initializers written to the data file as they are made (onnx_external):
the saved model holds the same graph and the same values as one kept whole in memory and saved by
onnx.save_model, and the file's layout does not depend on the worker threads' timing."""

import hashlib

import numpy as np
import onnx
import pytest

from edgepeft.exporters import onnx_ends
from edgepeft.exporters.checkpoint import EMBEDDING
from edgepeft.exporters.hf_base import load_base
from edgepeft.exporters.onnx_export import DATA_FILE, _save_onnx
from edgepeft.exporters.onnx_external import ExternalData, tensor
from edgepeft.exporters.onnx_graph import build_decoder
from edgepeft.exporters.onnx_quant import WeightQuantizer, to_matmul_nbits


def _export(base, path=None, workers=None):
    """int4 graph of `base` with fp16 embedding: in memory (path None) or streamed to path's data file."""
    external = ExternalData(path, DATA_FILE) if path else None
    q = WeightQuantizer(lambda group: 8 if group == "down_proj" else 4, {}, 32, zero_points=False, external=external)
    if workers:
        q.workers = workers
    proto, _ = build_decoder(base, slot_set="lora", fp16_embedding=True, quantizer=q, external=external)
    blocks = q.results()
    if external:
        external.close()
    return to_matmul_nbits(proto, blocks, 32, 4)


def _contents(proto):
    nodes = [n.SerializeToString() for n in proto.graph.node]
    return nodes, {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}


def test_a_streamed_export_saves_the_graph_and_values_of_one_kept_in_memory(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_ends, "TABLE_ROWS", 7)  # the table in uneven blocks of rows
    base = load_base(str(tiny_llama))
    whole = _export(base)
    (tmp_path / "whole").mkdir()
    onnx.save_model(whole, str(tmp_path / "whole" / "model.onnx"), save_as_external_data=True,
                    location=DATA_FILE, size_threshold=1024)
    streamed = _export(base, tmp_path / "streamed" / "model.onnx")
    assert any(i.data_location == onnx.TensorProto.EXTERNAL for i in streamed.graph.initializer)
    _save_onnx(streamed, tmp_path / "streamed" / "model.onnx")
    want = _contents(onnx.load(str(tmp_path / "whole" / "model.onnx")))
    got = _contents(onnx.load(str(tmp_path / "streamed" / "model.onnx")))
    assert got[0] == want[0]
    assert got[1].keys() == want[1].keys()
    for name, value in want[1].items():
        assert got[1][name].dtype == value.dtype and np.array_equal(got[1][name], value), name
    # the table is each value's float32 conversion rounded to fp16, block boundaries or not
    table = base.tensor(EMBEDDING).numpy().astype(np.float16)
    assert np.array_equal(got[1][f"{onnx_ends.EMBEDDING}.weight"], table)
    # nothing left out or written twice: the data file holds exactly the external tensors' bytes
    spans = sorted((int(e["offset"]), int(e["length"])) for e in
                   ({d.key: d.value for d in i.external_data} for i in
                    onnx.load(str(tmp_path / "streamed" / "model.onnx"), load_external_data=False).graph.initializer)
                   if e)
    assert all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:]))
    assert spans[0][0] == 0 and sum(n for _, n in spans) == (tmp_path / "streamed" / DATA_FILE).stat().st_size


@pytest.mark.parametrize("workers", [1, 3])
def test_the_data_file_is_the_same_whatever_the_threads(tiny_llama, tmp_path, workers):
    base = load_base(str(tiny_llama))
    digests = []
    for run in ("a", "b"):
        path = tmp_path / f"{run}{workers}" / "model.onnx"
        _save_onnx(_export(base, path, workers=workers if run == "a" else 2), path)
        digests.append(hashlib.sha256((path.parent / DATA_FILE).read_bytes() + path.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_a_reference_reads_back_as_the_array_it_wrote(tmp_path):
    data = ExternalData(tmp_path / "m.onnx", "m.data")
    a = np.arange(12, dtype=np.float16).reshape(3, 4)
    b = np.arange(5, dtype=np.uint8)
    refs = [data.write(a), data.write_rows(np.float16, (3, 4), [a[:1], a[1:]]), data.write(b)]
    with pytest.raises(ValueError, match="m.data: wrote 8 bytes for a .*float16 tensor of shape \\[3, 4\\]"):
        data.write_rows(np.float16, (3, 4), [a[:1]])
    data.close()
    for ref, want in zip(refs, [a, a, b]):
        t = tensor(ref, "t")
        assert not t.HasField("raw_data")
        onnx.external_data_helper.load_external_data_for_tensor(t, str(tmp_path))
        assert np.array_equal(onnx.numpy_helper.to_array(t), want)
