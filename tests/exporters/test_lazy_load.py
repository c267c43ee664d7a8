"""A base whose weights stay in the checkpoint until a step reads them exports the same files as
the whole model loaded in float32."""

import hashlib

import pytest
import torch

from edgepeft.bundle import Bundle
from edgepeft.exporters import bundle_export, hf_base
from edgepeft.exporters.checkpoint import float32_compute, materialized

from factory import bf16_copy, make_base, make_lora, make_prompt_adapter

# hidden 96: sqrt(96), Gemma's embedding scale, is not a bf16 number, so a rounded buffer shows
CASES = [("llama", {}, "onnx,gguf"), ("qwen3", {}, "onnx,gguf"), ("phi3_longrope", {}, "onnx,gguf"),
         ("gemma3_text", {"tie": True, "hidden": 96}, "onnx,gguf")]


def _digests(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix not in (".json", ".jinja")}


@pytest.mark.parametrize("family,opts,formats", CASES, ids=[c[0] for c in CASES])
def test_lazy_and_whole_float32_loads_write_identical_bundles(family, opts, formats, tmp_path, monkeypatch):
    base = bf16_copy(make_base(tmp_path / "f32", family, seed=0, **opts), tmp_path / "bf16")
    lora = make_lora(base, tmp_path / "lora", seed=1, r=4, target_modules=["o_proj"])
    prompt = make_prompt_adapter(base, tmp_path / "prompt", "PROMPT_TUNING", num_virtual_tokens=3)
    load, loaded = hf_base.load_base, []
    got = {}
    for lazy in (True, False):
        def spy(source, lazy_=lazy, **_):
            b = load(source, lazy=lazy_)
            loaded.append((b.tensors is not None, {p.device.type for p in b.model.parameters()}))
            return b

        monkeypatch.setattr(bundle_export, "load_base", spy)
        out = tmp_path / f"b-{lazy}"
        bundle_export.export_bundle(str(base), out, {"lora": str(lora)}, formats=formats, onnx_quant="int4",
                                    gguf_quant="F32", quiet=True)
        # prompt tuning runs the base over its virtual tokens (onnx only): add-adapter loads it again
        bundle_export.add_adapter(out, "prompt", prompt, formats="onnx")
        got[lazy] = _digests(out)
    assert loaded == [(True, {"meta"})] * 2 + [(False, {"cpu"})] * 2
    assert len(got[True]) >= 6 and got[True] == got[False]
    assert Bundle.open(tmp_path / "b-True").fingerprint == Bundle.open(tmp_path / "b-False").fingerprint


def test_float32_compute_runs_a_lazy_base_as_the_float32_model_and_leaves_no_weight_behind(tmp_path):
    base = bf16_copy(make_base(tmp_path / "f32", "gemma3_text", seed=0, tie=True, hidden=96), tmp_path / "bf16")
    lazy, full = hf_base.load_base(str(base)), hf_base.load_base(str(base), lazy=False)
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad(), float32_compute(lazy):
        a = lazy.model(ids).logits
    with torch.no_grad():
        b = full.model(ids).logits
    assert a.dtype == torch.float32 and torch.equal(a, b)
    assert {p.device.type for p in lazy.model.parameters()} == {"meta"}
    assert lazy.fingerprint == full.fingerprint
    layer = lazy.model.model.layers[1]
    with materialized(lazy, layer):
        assert torch.equal(layer.mlp.down_proj.weight, full.model.model.layers[1].mlp.down_proj.weight)
        assert lazy.model.model.layers[0].mlp.down_proj.weight.is_meta
    assert layer.mlp.down_proj.weight.is_meta


def test_a_checkpoint_missing_a_weight_is_refused_in_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    from edgepeft.errors import UnsupportedModel

    base = make_base(tmp_path / "b", "llama", seed=0)
    f = next(base.glob("*.safetensors"))
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, f)
    with pytest.raises(UnsupportedModel, match="has no tensor model.layers.1.mlp.up_proj.weight"):
        hf_base.load_base(str(base))
