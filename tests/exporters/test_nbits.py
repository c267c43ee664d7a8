"""MatMulNBits written as the graph is built: the nodes onnxruntime's quantizer writes, and no
float base weight ever held by the graph."""

import numpy as np
import onnx
import pytest

from edgepeft.exporters.hf_base import load_base
from edgepeft.exporters.onnx_graph import build_decoder
from edgepeft.exporters.onnx_quant import WeightQuantizer, base_matmuls, rtn_blocks, to_matmul_nbits


def _nodes_and_weights(proto):
    nodes = [(n.op_type, n.name, list(n.input), list(n.output),
              sorted((a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute)) for n in proto.graph.node]
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    return nodes, weights


@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_blocks_rewrite_is_what_onnxruntimes_quantizer_writes(tiny_llama, bits):
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    base = load_base(str(tiny_llama))
    proto, info = build_decoder(base, slot_set="none")
    theirs = nbits.MatMulNBitsQuantizer(onnx.ModelProto.FromString(proto.SerializeToString()), bits=bits,
                                        block_size=32, is_symmetric=True, accuracy_level=4)
    theirs.process()
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    blocks = {n.name: (bits, *rtn_blocks(weights[n.input[1]], bits, 32), weights[n.input[1]].shape[0])
              for n in base_matmuls(proto, info["lora_nodes"])}
    count = len(blocks)
    ours = to_matmul_nbits(proto, blocks, 32, 4)
    (want_nodes, want_w), (got_nodes, got_w) = _nodes_and_weights(theirs.model.model), _nodes_and_weights(ours)
    assert count == 2 * 4 + 1 and sum(n[0] == "MatMulNBits" for n in got_nodes) == count and not blocks
    assert got_nodes == want_nodes
    assert got_w.keys() == want_w.keys()
    for name, w in want_w.items():
        assert got_w[name].dtype == w.dtype and np.array_equal(got_w[name], w), name


def test_a_graph_built_with_the_quantizer_holds_no_float_base_weight(tiny_llama):
    base = load_base(str(tiny_llama))
    _, float_info = build_decoder(base, slot_set="lora")
    seen = []
    quantizer = WeightQuantizer(lambda group: 8 if group == "down_proj" else 4, {}, 32, zero_points=False)

    def take(node, module, group, w):
        seen.append(node)
        quantizer(node, module, group, w)

    proto, info = build_decoder(base, slot_set="lora", quantizer=take)
    blocks = quantizer.results()
    assert seen == list(float_info["base_matmuls"]) and set(blocks) == set(seen)
    assert not base_matmuls(proto, info["lora_nodes"])  # no base MatMul has a weight initializer
    assert not [i.name for i in proto.graph.initializer if i.name.endswith(".weight_T")]
    assert {b[0] for n, b in blocks.items() if "down_proj" in n} == {8}
    assert {b[0] for n, b in blocks.items() if "down_proj" not in n} == {4}
    count = len(blocks)
    final = to_matmul_nbits(proto, blocks, 32, 4)
    assert sum(n.op_type == "MatMulNBits" for n in final.graph.node) == count


def test_a_large_search_split_into_column_slices_gives_the_same_blocks(monkeypatch):
    from edgepeft.exporters import onnx_quant

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((96, 50)) * 0.02).astype(np.float32)
    w[:, 30:] += 0.05  # asymmetric columns: the last slice takes zero points
    w[:, :17] = rng.integers(-7, 8, (96, 17)) * 0.01  # the first slice on the symmetric grid: none
    w[::32, :17] = -0.08
    importance = rng.lognormal(size=96)
    want = onnx_quant.int4_blocks(w, importance, 32, zero_points=True)
    assert onnx_quant.int4_blocks(w[:, :17], importance, 32, zero_points=True)[2] is None
    monkeypatch.setattr(onnx_quant, "SPLIT_WEIGHTS", 100)
    q = WeightQuantizer(lambda group: 4, {"m": importance}, 32, zero_points=True)
    q.workers = 3
    q("node", "m", "g", w)
    assert len(q.pending["node"][2]) == 3
    bits, packed, scales, zp, k = q.results()["node"]
    assert (bits, k) == (4, 96) and np.array_equal(packed, want[0]) and np.array_equal(scales, want[1])
    assert want[2] is not None and np.array_equal(zp, want[2])
