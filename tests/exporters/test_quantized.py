"""Quantized exports (int4, int8, fp16) keep a trained model's greedy behaviour, with adapters."""

import pytest

from edgepeft.exporters import export_bundle
from edgepeft.runtime import Engine
from factory import make_trained_base, make_trained_lora

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
    bundle = export_bundle(str(base), tmp_path / "int4", onnx_quant="int4", block_size=32, quiet=True)
    model = onnx.load(str(bundle.file("onnx/model.onnx")), load_external_data=False)
    nbits = {n.name: {a.name: a.i for a in n.attribute} for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert len(nbits) == 2 * 4 + 1  # per layer qkv, o, gate_up, down (packed); and the lm_head
    eight = sorted(name for name, a in nbits.items() if a["bits"] == 8)
    assert eight == sorted(["/lm_head/MatMul_Q8"] + [f"/model.layers.{i}.{m}/MatMul_Q8" for i in range(2)
                                                      for m in ("self_attn/qkv_proj", "mlp/down_proj")])
    assert all(a["bits"] == 4 for name, a in nbits.items() if name not in eight)
    assert all(a["accuracy_level"] == 4 and a["block_size"] == 32 for a in nbits.values())
    slot_inits = [i for i in model.graph.initializer if i.name.startswith("lora.")]
    assert slot_inits and all(i.data_type == onnx.TensorProto.FLOAT for i in slot_inits)
    assert bundle.backends["onnx"]["quant"] == "int4" and bundle.backends["onnx"]["block_size"] == 32


def test_int4_pure_puts_every_matmul_at_4_bits(trained, tmp_path):
    import onnx

    base, _, _ = trained
    bundle = export_bundle(str(base), tmp_path / "pure", onnx_quant="int4-pure", quiet=True)
    model = onnx.load(str(bundle.file("onnx/model.onnx")), load_external_data=False)
    bits = [a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"]
    assert len(bits) == 2 * 4 + 1 and set(bits) == {4}
    assert bundle.backends["onnx"]["quant"] == "int4-pure"
