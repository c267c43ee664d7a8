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


def _head_copy(base, out, change_last_row: bool):
    """An untied copy of `base` whose lm_head holds the embedding's values (the last row changed)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(base, out)
    (f,) = out.glob("*.safetensors")
    weights = load_file(f)
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    weights["lm_head.weight"][-1, 3] += float(change_last_row)
    save_file(weights, f, metadata={"format": "pt"})
    return hf_base.load_base(str(out))  # loading reads every tensor once (the fingerprint)


def test_an_untied_head_equal_to_the_embedding_counts_as_tied_read_in_row_blocks(tmp_path, monkeypatch):
    from edgepeft.exporters import checkpoint, onnx_graph

    base = make_base(tmp_path / "b", "llama", seed=0)
    same, other = _head_copy(base, tmp_path / "same", False), _head_copy(base, tmp_path / "other", True)
    reads = []
    rows = checkpoint.CheckpointTensors.rows
    monkeypatch.setattr(checkpoint.CheckpointTensors, "rows",
                        lambda self, name, a, b: reads.append((name, a, b)) or rows(self, name, a, b))
    monkeypatch.setattr(checkpoint.CheckpointTensors, "get", lambda *a: pytest.fail("a whole table was read"))
    assert onnx_graph.head_is_tied(same) and reads
    assert not onnx_graph.head_is_tied(other)
    reads.clear()
    vocab = other.tensors.shapes["lm_head.weight"][0]
    assert not other.tensors.equal("lm_head.weight", "model.embed_tokens.weight", rows=7)
    assert sorted({(a, b) for _, a, b in reads}) == [(r, r + 7) for r in range(0, vocab, 7)]


MERGES = [("lora", "llama", {}), ("dora", "qwen3", {}), ("ia3", "llama", {}),
          ("lora_bf16", "gemma3_text", {"tie": True, "hidden": 96}), ("lora_embed", "gemma3_text", {"tie": True, "hidden": 96})]


@pytest.mark.parametrize("kind,family,opts", MERGES, ids=[m[0] for m in MERGES])
def test_merge_on_a_lazy_base_writes_the_bundle_a_whole_float32_merge_writes(kind, family, opts, tmp_path,
                                                                            monkeypatch):
    from peft import IA3Config

    base = bf16_copy(make_base(tmp_path / "f32", family, seed=0, **opts), tmp_path / "bf16")
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if kind == "ia3":
        from test_scale_kinds import make_peft  # noqa: PLC0415 (the kinds tests' PEFT factory)
        adapter = make_peft(base, tmp_path / kind, IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "down_proj"],
                                                              feedforward_modules=["down_proj"]), 5, ("ia3_l",))
    elif kind == "lora_embed":  # the tied embedding adapted: the head changes with it
        adapter = make_lora(base, tmp_path / kind, seed=2, target_modules=["embed_tokens", "o_proj"])
    else:
        adapter = make_lora(base, tmp_path / kind, seed=1, target_modules=projections, use_dora=kind == "dora")
    load, got = bundle_export.load_base, {}
    for lazy in (True, False):
        monkeypatch.setattr(bundle_export, "load_base", lambda source, lazy_=lazy, **_: load(source, lazy=lazy_))
        out = tmp_path / f"m-{lazy}"
        bundle_export.export_bundle(str(base), out, {"m": str(adapter)}, formats="onnx,gguf", onnx_quant="int4",
                                    gguf_quant="F32", merge="m", quiet=True)
        got[lazy] = (_digests(out), Bundle.open(out).fingerprint)
    assert len(got[True][0]) >= 3 and got[True] == got[False]


def test_a_vision_language_checkpoints_text_weights_are_read_in_row_blocks_under_the_text_names(tmp_path):
    """Qwen3.5's released layout (text under model.language_model.): a block of rows is read by
    the stored name, as a whole tensor is (int4 ONNX writes the embedding table in row blocks)."""
    import torch
    from safetensors.torch import save_file

    from edgepeft.exporters import checkpoint

    table = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    save_file({"model.language_model.embed_tokens.weight": table}, str(tmp_path / "model.safetensors"))
    tensors = checkpoint.CheckpointTensors(tmp_path)
    assert torch.equal(tensors.get("model.embed_tokens.weight"), table)
    assert torch.equal(tensors.rows("model.embed_tokens.weight", 2, 5), table[2:5])
