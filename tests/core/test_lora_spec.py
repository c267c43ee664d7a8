"""Reading PEFT LoRA directories into the neutral spec, without torch."""

import json
import math

import numpy as np
import pytest
from safetensors.numpy import save_file

from edgepeft.errors import AdapterError, UnsupportedAdapter
from edgepeft.kinds import read_peft_adapter
from edgepeft.tensors import read_safetensors

PREFIX = "base_model.model.model.layers.0."


def write_adapter(path, config, tensors):
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def lora_pair(r, fan_in=8, fan_out=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(r, fan_in)).astype(np.float32), rng.normal(size=(fan_out, r)).astype(np.float32)


def test_rank_and_alpha_patterns_apply_per_module(tmp_path):
    a4, b4 = lora_pair(4)
    a2, b2 = lora_pair(2)
    path = write_adapter(tmp_path / "ad", {"r": 4, "lora_alpha": 8, "rank_pattern": {"v_proj": 2},
                                           "alpha_pattern": {"q_proj": 3}}, {
        PREFIX + "self_attn.q_proj.lora_A.weight": a4, PREFIX + "self_attn.q_proj.lora_B.weight": b4,
        PREFIX + "self_attn.v_proj.lora_A.weight": a2, PREFIX + "self_attn.v_proj.lora_B.weight": b2,
    })
    spec = read_peft_adapter(path)
    q = spec.modules["model.layers.0.self_attn.q_proj"]
    v = spec.modules["model.layers.0.self_attn.v_proj"]
    assert (q.rank, v.rank) == (4, 2)
    assert q.scale == pytest.approx(3 / 4)
    assert v.scale == pytest.approx(8 / 2)
    assert spec.targets == ["q_proj", "v_proj"]
    np.testing.assert_array_equal(q.a, a4)


def test_rslora_scales_by_square_root_of_rank(tmp_path):
    a, b = lora_pair(9)
    path = write_adapter(tmp_path / "ad", {"r": 9, "lora_alpha": 6, "use_rslora": True},
                         {PREFIX + "mlp.up_proj.lora_A.weight": a, PREFIX + "mlp.up_proj.lora_B.weight": b})
    assert read_peft_adapter(path).modules["model.layers.0.mlp.up_proj"].scale == pytest.approx(6 / math.sqrt(9))


def test_lora_bias_is_read(tmp_path):
    a, b = lora_pair(2)
    bias = np.arange(6, dtype=np.float32)
    path = write_adapter(tmp_path / "ad", {"r": 2, "lora_alpha": 2, "lora_bias": True}, {
        PREFIX + "mlp.up_proj.lora_A.weight": a, PREFIX + "mlp.up_proj.lora_B.weight": b,
        PREFIX + "mlp.up_proj.lora_B.bias": bias})
    np.testing.assert_array_equal(read_peft_adapter(path).modules["model.layers.0.mlp.up_proj"].bias, bias)


def test_bf16_tensors_are_widened_exactly(tmp_path):
    # bf16 is the top half of float32: values with 8 significant bits survive exactly.
    values = np.array([1.5, -2.25, 0.0078125, 2.0**100], np.float32)
    raw = (values.view(np.uint32) >> 16).astype(np.uint16)
    header = json.dumps({"t": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}).encode()
    f = tmp_path / "x.safetensors"
    f.write_bytes(len(header).to_bytes(8, "little") + header + raw.tobytes())
    np.testing.assert_array_equal(read_safetensors(f)["t"], values)


def test_pickle_only_adapter_is_refused_with_a_hint(tmp_path):
    d = tmp_path / "ad"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (d / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(AdapterError, match="pickle.*safe_serialization=True"):
        read_peft_adapter(d)


@pytest.mark.parametrize("breakage, message", [
    (lambda d: (d / "adapter_config.json").unlink(), "no adapter_config.json"),
    (lambda d: (d / "adapter_config.json").write_text("{not json"), "corrupt JSON"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x01\x02"), "truncated header"),
    (lambda d: (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA"})), "LOHA is not supported"),
    (lambda d: (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 3})), "says 3"),
    (lambda d: (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "use_dora": True})),
     "DoRA module .* lacks a lora_magnitude_vector"),
])
def test_broken_adapter_directories_raise_one_clear_error(tmp_path, breakage, message):
    a, b = lora_pair(2)
    d = write_adapter(tmp_path / "ad", {"r": 2, "lora_alpha": 2},
                      {PREFIX + "self_attn.q_proj.lora_A.weight": a, PREFIX + "self_attn.q_proj.lora_B.weight": b})
    breakage(d)
    with pytest.raises((AdapterError, UnsupportedAdapter), match=message) as e:
        read_peft_adapter(d)
    assert "\n" not in str(e.value)


def test_inconsistent_a_and_b_shapes_are_refused(tmp_path):
    a, _ = lora_pair(2)
    _, b = lora_pair(3)
    d = write_adapter(tmp_path / "ad", {"r": 2}, {PREFIX + "self_attn.q_proj.lora_A.weight": a,
                                                  PREFIX + "self_attn.q_proj.lora_B.weight": b})
    with pytest.raises(AdapterError, match="inconsistent shapes"):
        read_peft_adapter(d)
