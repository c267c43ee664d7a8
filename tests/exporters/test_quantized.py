"""Quantized exports (int4, int8, fp16) keep a trained model's greedy behaviour, with adapters."""

import pytest

from edgepeft.exporters import export_bundle
from edgepeft.runtime import Engine
from factory import graph_paths, make_trained_base, make_trained_lora

PROMPTS = ["abcd", "klmn", "uvwx", "efgh", "qrst", "hijk", "mnop", "wxyz", "defg", "stuv"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny base that continues the alphabet and two LoRAs (rank 8 / rank 4) that walk it
    backwards / by two: confident models, so greedy agreement measures quantization error."""
    root = tmp_path_factory.mktemp("trained")
    base = make_trained_base(root / "base")
    adapters = {
        "back": make_trained_lora(base, root / "back", step=-1),
        "two": make_trained_lora(base, root / "two", step=2, steps=300, r=4, lora_alpha=8),
    }
    fp32 = export_bundle(str(base), root / "fp32", {n: str(p) for n, p in adapters.items()},
                         onnx_quant="fp32", quiet=True)
    return base, adapters, Engine.open(fp32.root)


@pytest.mark.parametrize("quant", ["int4", "int4-pure", "int8", "fp16"])
def test_quantized_greedy_matches_fp32_on_most_prompts(quant, trained, tmp_path):
    base, adapters, fp32 = trained
    engine = Engine.open(export_bundle(str(base), tmp_path / quant, {n: str(p) for n, p in adapters.items()},
                                       onnx_quant=quant, quiet=True).root)
    outputs = {}
    for adapter in (None, "back", "two"):
        want = [fp32.generate(p, adapter=adapter, max_new_tokens=12) for p in PROMPTS]
        got = [engine.generate(p, adapter=adapter, max_new_tokens=12) for p in PROMPTS]
        agree = sum(a == b for a, b in zip(want, got))
        assert agree >= 0.8 * len(PROMPTS), f"{quant} adapter={adapter}: {agree}/{len(PROMPTS)} agree"
        outputs[adapter] = got
    # each adapter visibly changes the output of the quantized base
    for adapter in ("back", "two"):
        assert sum(a != b for a, b in zip(outputs[adapter], outputs[None])) >= 0.8 * len(PROMPTS)


def test_int4_base_uses_matmulnbits_and_keeps_adapter_slots_float(trained, tmp_path):
    import onnx

    base, _, _ = trained
    # this tiny base is 0.018 from fp32 at 4 bits (calibration KL), under the default target: ask
    # for less, so that some MatMuls go to 8 bits
    bundle = export_bundle(str(base), tmp_path / "int4", onnx_quant="int4", block_size=32, int4_target_kl=0.005,
                           quiet=True)
    onnx_entry = bundle.backends["onnx"]
    model = onnx.load(str(bundle.file("onnx/model.onnx")), load_external_data=False)
    paths = graph_paths(model)
    assert set(paths) == {"slots", "base"}
    mix = onnx_entry["int4_mix"]
    assert mix["by"] == "sensitivity" and mix["candidates"] == 2 * 4 + 1  # the head is not tied here
    assert mix["target_kl"] == 0.005 < mix["kl_4bit"] and mix["kl_mix"] < mix["kl_4bit"]
    assert onnx_entry["eight_bit"] and all(mix["gain"][n] > 0 for n in onnx_entry["eight_bit"])
    for nodes in paths.values():  # both paths run the same quantized weights
        nbits = {n.name: {a.name: a.i for a in n.attribute} for n in nodes if n.op_type == "MatMulNBits"}
        assert len(nbits) == 2 * 4 + 1  # per layer qkv, o, gate_up, down (packed); and the lm_head
        eight = sorted(name for name, a in nbits.items() if a["bits"] == 8)
        assert eight == sorted(f"{n}_Q8" for n in onnx_entry["eight_bit"])  # the manifest says which
        assert all(a["accuracy_level"] == 4 and a["block_size"] == 32 for a in nbits.values())
        zero_points = [n for n in nodes if n.op_type == "MatMulNBits" and len(n.input) > 3 and n.input[3]]
        assert len(zero_points) == onnx_entry["zero_points"] > 0
        assert all(n.name.endswith("_Q4") for n in zero_points)  # 8-bit MatMuls stay symmetric
    from edgepeft.runtime_contract import slot_family, slot_params

    lora = {n for n, (_, role) in slot_params(s["module"] for s in bundle.backends["onnx"]["slots"]).items()
            if slot_family(role) == "lora"}
    slot_inits = [i for i in model.graph.initializer if i.name in lora]
    assert slot_inits and all(i.data_type == onnx.TensorProto.FLOAT for i in slot_inits)
    assert bundle.backends["onnx"]["quant"] == "int4" and bundle.backends["onnx"]["block_size"] == 32
    assert bundle.backends["onnx"]["int4_rounding"] == "importance-weighted"


def test_int4_default_keeps_the_fixed_groups_at_8_bits_with_zero_points_elsewhere(trained, tmp_path):
    import onnx

    base, _, _ = trained
    bundle = export_bundle(str(base), tmp_path / "int4", onnx_quant="int4", quiet=True)
    entry = bundle.backends["onnx"]
    assert entry["int4_mix"] == {"by": "groups", "groups": ["qkv_proj", "down_proj", "lm_head"]}  # untied head
    want = sorted(["/lm_head/MatMul"] + [f"/model.layers.{i}.{m}/MatMul" for i in range(2)
                                         for m in ("self_attn/qkv_proj", "mlp/down_proj")])
    assert sorted(entry["eight_bit"]) == want
    for nodes in graph_paths(onnx.load(str(bundle.file("onnx/model.onnx")), load_external_data=False)).values():
        bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in nodes if n.op_type == "MatMulNBits"}
        assert sorted(n for n, b in bits.items() if b == 8) == [f"{n}_Q8" for n in want]
        zp = [n.name for n in nodes if n.op_type == "MatMulNBits" and len(n.input) > 3 and n.input[3]]
        assert len(zp) == entry["zero_points"] and set(zp) <= {n for n, b in bits.items() if b == 4}


def test_int4_pure_puts_every_matmul_at_4_bits(trained, tmp_path):
    import onnx

    base, _, _ = trained
    bundle = export_bundle(str(base), tmp_path / "pure", onnx_quant="int4-pure", quiet=True)
    model = onnx.load(str(bundle.file("onnx/model.onnx")), load_external_data=False)
    for nodes in graph_paths(model).values():
        bits = [a.i for n in nodes if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"]
        assert len(bits) == 2 * 4 + 1 and set(bits) == {4}
        assert not [n for n in nodes if n.op_type == "MatMulNBits" and len(n.input) > 3 and n.input[3]]
    assert bundle.backends["onnx"]["quant"] == "int4-pure" and bundle.backends["onnx"]["zero_points"] == 0


def test_int4_target_kl_trades_8_bit_matmuls_for_faithfulness(trained, tmp_path):
    base, _, fp32 = trained
    loose = export_bundle(str(base), tmp_path / "loose", onnx_quant="int4", int4_target_kl=10.0, quiet=True)
    tight = export_bundle(str(base), tmp_path / "tight", onnx_quant="int4", int4_target_kl=1e-9, quiet=True)
    a, b = loose.backends["onnx"], tight.backends["onnx"]
    assert a["eight_bit"] == [] and a["int4_mix"]["kl_mix"] == a["int4_mix"]["kl_4bit"]
    # the tight target is out of reach: every MatMul whose measured gain is positive goes to 8 bits
    assert len(b["eight_bit"]) >= 1 and b["int4_mix"]["kl_mix"] < b["int4_mix"]["kl_4bit"]
    assert b["int4_mix"]["kl_4bit"] == a["int4_mix"]["kl_4bit"]  # the same measurement

    import numpy as np
    ids = fp32.tokenizer.encode("abcdefgh")
    ref = fp32.score(ids)
    errors = [np.abs(Engine.open(x.root).score(ids) - ref).mean() for x in (loose, tight)]
    assert errors[1] < errors[0]  # more 8-bit MatMuls, closer to fp32


@pytest.mark.parametrize("kw, message", [
    (dict(onnx_quant="int4", int4_target_kl=0.0), "--int4-target-kl 0.0: must be a KL above 0"),
    (dict(onnx_quant="int4-pure", int4_target_kl=0.1), "--int4-target-kl applies to --onnx-quant int4, not int4-pure"),
])
def test_int4_target_kl_refuses_what_it_cannot_do(trained, tmp_path, kw, message):
    from edgepeft.errors import UnsupportedModel

    with pytest.raises(UnsupportedModel, match=message):
        export_bundle(str(trained[0]), tmp_path / "x", quiet=True, **kw)
    assert not (tmp_path / "x").exists()


def test_sensitivity_simulation_gives_the_model_its_weights_back(trained):
    import torch

    from edgepeft.exporters.calibration import activation_importance
    from edgepeft.exporters.hf_base import load_base
    from edgepeft.exporters.onnx_graph import build_decoder
    from edgepeft.exporters.onnx_quant import base_matmuls, importance_blocks
    from edgepeft.exporters.sensitivity import Simulation
    import onnx

    base = load_base(str(trained[0]), lazy=False)  # the simulation swaps weights in place
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    proto, info = build_decoder(base, slot_set="lora")
    blocks = importance_blocks(proto, info["lora_nodes"], activation_importance(base, info["base_matmuls"]), 32, True)
    inits = {i.name: i for i in proto.graph.initializer}
    weights = {n.name: onnx.numpy_helper.to_array(inits[n.input[1]]) for n in base_matmuls(proto, info["lora_nodes"])}
    with Simulation(base, info, blocks, weights, 32) as sim:
        four, one = sim.kl(set()), sim.kl({next(iter(blocks))})
        assert four > 0 and one != four and sim.kl(set()) == four  # repeatable
    after = base.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _unpack_int4(packed, scales, k):
    """MatMulNBits' 4-bit layout, read independently: [N, blocks, block/2] bytes, low nibble first,
    zero point 8; returns the dequantized weight [K, N]."""
    import numpy as np

    q = np.stack([packed & 15, packed >> 4], axis=-1).astype(np.float32) - 8  # [N, blocks, block/2, 2]
    n, blocks = scales.shape
    return (q.reshape(n, blocks, -1) * scales[..., None]).reshape(n, -1)[:, :k].T


def test_int4_blocks_are_what_matmulnbits_computes_with():
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgepeft.exporters.onnx_quant import int4_blocks

    rng = np.random.default_rng(0)
    k, n = 80, 24  # K not a whole number of blocks: the last block is padded
    w = rng.normal(size=(k, n)).astype(np.float32)
    packed, scales, zp = int4_blocks(w, rng.uniform(0.1, 5, k), 32)
    assert zp is None  # symmetric unless asked for zero points
    assert packed.shape == (n, 3, 16) and packed.dtype == np.uint8 and scales.shape == (n, 3)
    node = helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=32, accuracy_level=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])],
                              [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.normal(size=(2, k)).astype(np.float32)
    deq = _unpack_int4(packed, scales, k)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ deq, rtol=1e-4, atol=1e-4)
    assert np.abs(deq - w).max() < 0.35 * np.abs(w).max()  # a 4-bit rounding of w, not garbage


def test_zero_points_are_taken_where_they_help_and_matmulnbits_computes_with_them():
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgepeft.exporters.onnx_quant import dequantize_int4, int4_blocks

    rng = np.random.default_rng(2)
    k, n = 96, 40  # three blocks a row: the zero points' last byte is half used
    w = rng.normal(size=(k, n)).astype(np.float32)
    w[:, : n // 2] = np.abs(w[:, : n // 2]) + 0.5  # one-signed columns: a zero point spends all 16 levels
    importance = rng.uniform(0.1, 5, k)
    packed, scales, zp = int4_blocks(w, importance, 32, zero_points=True)
    assert zp is not None and zp.shape == (n, 2) and zp.dtype == np.uint8
    z = np.stack([zp & 15, zp >> 4], -1).reshape(n, -1)[:, :3]
    assert (z[: n // 2] != 8).all()  # the one-signed columns took zero points
    node = helper.make_node("MatMulNBits", ["x", "B", "scales", "zp"], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=32, accuracy_level=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])],
                              [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "scales"),
                               numpy_helper.from_array(zp, "zp")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.normal(size=(2, k)).astype(np.float32)
    deq = dequantize_int4(packed, scales, zp, k)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ deq, rtol=1e-4, atol=1e-4)
    # no block's weighted error grows: the symmetric candidates are still searched
    c = importance[:, None] * np.sqrt((w ** 2).mean(0, keepdims=True) + w ** 2)
    sym = dequantize_int4(*int4_blocks(w, importance, 32), k)

    def err(d):
        return (c * (w - d) ** 2).T.reshape(n, -1, 32).sum(-1)

    assert np.all(err(deq) <= err(sym) * (1 + 1e-5)) and err(deq).sum() < 0.8 * err(sym).sum()


def test_importance_weighted_blocks_beat_absmax_rounding_where_it_counts():
    import numpy as np

    from edgepeft.exporters.onnx_quant import int4_blocks

    rng = np.random.default_rng(1)
    k, n = 256, 64
    w = rng.normal(size=(k, n)).astype(np.float32)
    w[rng.integers(0, k, 40), rng.integers(0, n, 40)] *= 6  # outliers, as trained weights have
    importance = np.where(rng.random(k) < 0.1, 50.0, 1.0)  # a few channels carry large activations
    deq = _unpack_int4(*int4_blocks(w, importance, 32)[:2], k)
    # plain absmax rounding: the block's signed absmax maps to -8
    blocks = w.T.reshape(n, -1, 32)
    m = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)
    absmax = (np.clip(np.rint(blocks * (-8 / m)), -8, 7) * (m / -8)).reshape(n, k).T

    # per block, as the search scores it (llama.cpp's weighting: importance * sqrt(sigma2 + w^2))
    c = importance[:, None] * np.sqrt((w ** 2).mean(0, keepdims=True) + w ** 2)

    def weighted_error(d):
        return ((c * (w - d) ** 2).T.reshape(n, -1, 32)).sum(-1)

    ours, plain = weighted_error(deq), weighted_error(absmax)
    assert np.all(ours <= plain * (1 + 1e-5))  # the absmax scale is one of the candidates
    assert ours.sum() < 0.8 * plain.sum()


def test_calibration_covers_every_base_matmul(trained):
    import numpy as np

    from edgepeft.exporters.calibration import activation_importance
    from edgepeft.exporters.hf_base import load_base
    from edgepeft.exporters.onnx_graph import build_decoder

    base = load_base(str(trained[0]))
    proto, info = build_decoder(base, slot_set="lora")
    importance = activation_importance(base, info["base_matmuls"])
    weights = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    matmuls = {n.name: n for n in proto.graph.node if n.op_type == "MatMul" and n.name not in info["lora_nodes"]}
    assert set(importance) == set(matmuls) == set(info["base_matmuls"])
    for name, stats in importance.items():
        assert stats.shape == (weights[matmuls[name].input[1]][0],)  # one per input channel
        assert np.all(np.isfinite(stats)) and stats.min() >= 0 and stats.max() > 0


def test_int4_with_a_tied_head_recomputes_its_top_logits_exactly(tmp_path, monkeypatch):
    """A tied head is 4-bit in int4, with each position's top logits recomputed from the fp16
    embedding table: those logits are closer to fp32 than a plain 4-bit head's."""
    import numpy as np
    import onnx

    import edgepeft.exporters.onnx_export as onnx_export
    from factory import make_base

    base = make_base(tmp_path / "tied", seed=3, tie=True)
    fp32 = Engine.open(export_bundle(str(base), tmp_path / "fp32", onnx_quant="fp32", quiet=True).root)
    # every MatMul that measures better at 8 bits goes there, so that the head carries a visible share
    # of what is left of the 4-bit error
    exact = export_bundle(str(base), tmp_path / "exact", onnx_quant="int4", int4_target_kl=1e-9, quiet=True)
    assert exact.backends["onnx"]["exact_head_top_k"] == onnx_export.EXACT_HEAD_TOP_K
    # the head is not a candidate for 8 bits: the exact head keeps it at 4
    assert not [n for n in exact.backends["onnx"]["eight_bit"] if "lm_head" in n]
    assert exact.backends["onnx"]["int4_mix"]["candidates"] == 2 * 4
    for nodes in graph_paths(onnx.load(str(exact.file("onnx/model.onnx")), load_external_data=False)).values():
        head = next(n for n in nodes if n.op_type == "MatMulNBits" and "/lm_head/" in n.name)
        assert next(a.i for a in head.attribute if a.name == "bits") == 4
        assert {"TopK", "ScatterElements"} <= {n.op_type for n in nodes if "/lm_head/exact/" in n.name}
    # the same head at 4 bits without the recomputation
    monkeypatch.setattr(onnx_export, "EXACT_HEAD_TOP_K", 0)
    chosen = exact.backends["onnx"]["eight_bit"]
    monkeypatch.setattr(onnx_export, "_measured_mix", lambda *a: (chosen, {}))  # the same mix, head at 4 bits
    plain = export_bundle(str(base), tmp_path / "plain", onnx_quant="int4", int4_target_kl=1e-9, quiet=True)
    assert "exact_head_top_k" not in plain.backends["onnx"]
    engines = {"exact": Engine.open(exact.root), "plain": Engine.open(plain.root)}
    k = exact.backends["onnx"]["exact_head_top_k"]
    errors = {"exact": [], "plain": []}
    for prompt in PROMPTS:
        ids = fp32.tokenizer.encode(prompt)
        ref = fp32.score(ids)
        got = {name: engine.score(ids) for name, engine in engines.items()}
        # Both share every other weight, so the same hidden state: the logits differ only at
        # each position's k largest (4-bit) logits, which the exact head recomputed.
        changed = got["exact"] != got["plain"]
        assert changed.any() and (changed.sum(-1) <= k).all()
        top_k = np.argsort(got["plain"], axis=-1)[:, -k:]
        np.put_along_axis(changed, top_k, False, -1)
        assert not changed.any()
        top = np.argsort(ref, axis=-1)[:, -5:]  # the reference's five most likely tokens
        for name, logits in got.items():
            errors[name].append(np.abs(np.take_along_axis(logits - ref, top, -1)).mean())
    # and closer to fp32 there than the 4-bit head (the rest of the error is the 4-bit layers')
    assert np.mean(errors["exact"]) < 0.9 * np.mean(errors["plain"]), errors
