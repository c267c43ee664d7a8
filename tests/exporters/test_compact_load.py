"""A bf16 checkpoint loaded in its own dtype exports the same files as loaded in float32."""

import hashlib
import shutil

import pytest
import torch

from edgepeft.exporters import bundle_export, hf_base

from factory import make_base, make_lora, make_prompt_adapter

# hidden 96: sqrt(96), Gemma's embedding scale, is not a bf16 number, so a rounded buffer shows
CASES = [("llama", {}, "onnx,gguf"), ("qwen3", {}, "onnx,gguf"), ("phi3_longrope", {}, "onnx,gguf"),
         ("gemma3_text", {"tie": True, "hidden": 96}, "onnx,gguf")]


def _bf16_copy(src, dest):
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dest)
    for f in dest.glob("*.safetensors"):
        f.unlink()
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).to(torch.bfloat16).save_pretrained(dest)
    return dest


def _digests(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix not in (".json", ".jinja")}


@pytest.mark.parametrize("family,opts,formats", CASES, ids=[c[0] for c in CASES])
def test_compact_and_float32_loads_write_identical_bundles(family, opts, formats, tmp_path, monkeypatch):
    base = _bf16_copy(make_base(tmp_path / "f32", family, seed=0, **opts), tmp_path / "bf16")
    assert hf_base.checkpoint_dtype(base) == torch.bfloat16
    lora = make_lora(base, tmp_path / "lora", seed=1, r=4, target_modules=["o_proj"])
    prompt = make_prompt_adapter(base, tmp_path / "prompt", "PROMPT_TUNING", num_virtual_tokens=3)
    load, loaded = hf_base.load_base, []

    def spy(source, compact=True):
        b = load(source, compact=compact)
        loaded.append({p.dtype for p in b.model.parameters()})
        return b

    monkeypatch.setattr(bundle_export, "load_base", spy)
    got = {}
    for compact in (True, False):
        monkeypatch.setattr(hf_base, "checkpoint_dtype", (lambda local: torch.bfloat16) if compact
                            else (lambda local: torch.float32))
        out = tmp_path / f"b-{compact}"
        bundle_export.export_bundle(str(base), out, {"lora": str(lora)}, formats=formats, onnx_quant="int4",
                                    gguf_quant="F32", quiet=True)
        # prompt tuning runs the base over its virtual tokens (onnx only): add-adapter loads it again
        bundle_export.add_adapter(out, "prompt", prompt, formats="onnx")
        got[compact] = _digests(out)
    assert loaded == [{torch.bfloat16}] * 2 + [{torch.float32}] * 2
    assert len(got[True]) >= 6 and got[True] == got[False]


def test_float32_compute_matches_a_float32_model_and_restores_the_dtypes(tmp_path):
    base = _bf16_copy(make_base(tmp_path / "f32", "gemma3_text", seed=0, tie=True, hidden=96), tmp_path / "bf16")
    compact, full = hf_base.load_base(str(base)), hf_base.load_base(str(base), compact=False)
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad(), hf_base.float32_compute(compact.model):
        a = compact.model(ids).logits
    with torch.no_grad():
        b = full.model(ids).logits
    assert a.dtype == torch.float32 and torch.equal(a, b)
    assert {p.dtype for p in compact.model.parameters()} == {torch.bfloat16}
    assert compact.fingerprint == full.fingerprint
