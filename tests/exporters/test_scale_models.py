"""benchmarks/scale_models.py (the random bases export_scale.py exports at real sizes) and
benchmarks/peak_rss.py (how it measures a command's peak memory)."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import scale_models  # noqa: E402
from peak_rss import run_tree  # noqa: E402

# Parameter counts of the published checkpoints (their safetensors, tied head counted once).
PUBLISHED = {"llama-1b": 1_235_814_400, "qwen3-4b": 4_022_468_096}


@pytest.mark.parametrize("shape", sorted(PUBLISHED))
def test_real_shapes_match_transformers_and_the_published_size(tmp_path, shape):
    size = scale_models.write_base(shape, tmp_path, dry_run=True)
    assert not (tmp_path / "model.safetensors.index.json").exists()  # a dry run writes no weights
    assert scale_models.check_base(tmp_path) == []
    shapes = scale_models.written_shapes(tmp_path)
    params = sum(math.prod(s) for s in shapes.values())
    assert params == PUBLISHED[shape]
    assert size == 2 * params


@pytest.mark.parametrize("shape, family", [("lfm2-350m", "lfm2"), ("qwen35-0.8b", "qwen3_5_text")])
def test_hybrid_shapes_match_transformers_and_their_lora_adapts_every_text_linear_layer(tmp_path, shape, family):
    """The hybrids' hand-written text tensors equal transformers' model of the published config
    (Qwen3.5 as its vision-language class, the text model under model.language_model.), and the
    LoRA targets every linear layer of the text model, the tower's none, under names edgepeft reads
    as the text model's."""
    from factory import all_linear

    from edgepeft.kinds import read_peft_adapter

    base, lora = tmp_path / "base", tmp_path / "lora"
    scale_models.write_base(shape, base, dry_run=True)
    assert scale_models.check_base(base) == []
    shapes = scale_models.written_shapes(base)
    assert shapes["model.embed_tokens.weight" if family == "lfm2" else "model.language_model.embed_tokens.weight"] \
        == (65536 if family == "lfm2" else 248320, 1024)
    assert any(n.startswith("model.visual.") for n in shapes) == (family != "lfm2")
    scale_models.write_lora(base, lora)
    targets = json.loads((lora / "adapter_config.json").read_text())["target_modules"]
    assert sorted(targets) == sorted(all_linear(family))
    spec = read_peft_adapter(lora)
    layers = 16 if family == "lfm2" else 24
    assert {m.split(".")[2] for m in spec.modules} == {str(i) for i in range(layers)}
    assert all(m.startswith("model.layers.") for m in spec.modules)
    per_layer = {"lfm2": {"conv": 5, "full_attention": 7}, "qwen3_5_text": {"linear_attention": 8,
                                                                           "full_attention": 7}}[family]
    kinds = scale_models.config(shape).get("text_config", scale_models.config(shape))["layer_types"]
    assert len(spec.modules) == sum(per_layer[k] for k in kinds)


def test_check_base_names_a_missing_and_a_misshapen_tensor(tmp_path):
    scale_models.write_base("qwen3-4b", tmp_path, dry_run=True)
    listed = json.loads((tmp_path / "tensors.json").read_text())
    del listed["model.layers.3.self_attn.q_norm.weight"]
    listed["model.layers.0.mlp.down_proj.weight"] = [2560, 9000]
    (tmp_path / "tensors.json").write_text(json.dumps(listed))
    assert sorted(scale_models.check_base(tmp_path)) == [
        "model.layers.0.mlp.down_proj.weight: (2560, 9000), the model has (2560, 9728)",
        "model.layers.3.self_attn.q_norm.weight: missing"]


def test_tiny_base_and_lora_load_in_transformers_and_peft(tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, lora = tmp_path / "base", tmp_path / "lora"
    scale_models.write_base("tiny", base)
    assert len(json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]) == 2 + 2 * 9
    assert scale_models.check_base(base) == []
    model, info = AutoModelForCausalLM.from_pretrained(base, output_loading_info=True)
    assert not any(info.values())
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    emb = model.model.embed_tokens.weight.float()
    assert abs(emb.std().item() - 0.02) < 0.001 and abs(emb.mean().item()) < 0.001
    assert torch.equal(model.model.norm.weight.float(), torch.ones(256))
    tok = AutoTokenizer.from_pretrained(base)
    assert len(tok) <= model.config.vocab_size
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                                return_dict=False)])
    with torch.no_grad():
        plain = model(ids).logits

    # in + out features of q, k, v, o, gate, up, down in the tiny shape; rank 16, float32, 2 layers
    in_out = (256 + 256) + (256 + 128) * 2 + (256 + 256) + (256 + 512) * 3
    assert scale_models.write_lora(base, lora) == 2 * 16 * in_out * 4
    adapted = PeftModel.from_pretrained(model, lora)
    assert sorted(adapted.peft_config["default"].target_modules) == sorted(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    with torch.no_grad():
        assert not torch.allclose(adapted(ids).logits, plain)


def test_run_tree_measures_the_child_not_the_caller():
    """A child's peak RSS is its own, however large the caller is (a child forked straight from
    the caller would report at least the caller's resident size)."""
    import numpy as np

    held = np.ones(400 * 2**20, dtype=np.uint8)  # the caller: 400 MiB resident
    small = run_tree([sys.executable, "-c", "print('hi')"])
    big = run_tree([sys.executable, "-c", "import numpy as np; a = np.ones(300 * 2**20, np.uint8); print(a[-1])"])
    assert held[-1] == 1
    assert small["rc"] == 0 and small["output"] == ["hi"]
    assert small["peak_rss"] < 100 * 2**20
    assert 300 * 2**20 < big["peak_rss"] < 400 * 2**20
    assert big["output"] == ["1"] and big["wall_s"] > 0
