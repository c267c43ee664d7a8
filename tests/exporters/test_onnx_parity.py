"""fp32 ONNX exports match PyTorch+PEFT logits for every adapter, in any switching order."""

import numpy as np
import pytest

from edgepeft.exporters import export_bundle
from edgepeft.runtime import Engine
from factory import make_lora, reference_logits

TOL = 1e-3
PROMPT = "the quick brown fox jumps over the lazy dog, then rests"


@pytest.fixture(scope="module")
def qwen2_adapters(tiny_qwen2, tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2_adapters")
    return {
        # members of one packed slot with different ranks (the smaller padded with zeros)
        "qkv": make_lora(tiny_qwen2, root / "qkv", seed=4, r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj"],
                         rank_pattern={"k_proj": 2, "v_proj": 6}),
        "mlp": make_lora(tiny_qwen2, root / "mlp", seed=5, r=16, lora_alpha=8, use_rslora=True,
                         target_modules=["gate_proj", "up_proj", "down_proj"]),
    }


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fp32_scores_match_peft_in_any_switch_order(arch, tiny_llama, tiny_qwen2, llama_adapters,
                                                    qwen2_adapters, tmp_path):
    base, adapters = (tiny_llama, llama_adapters) if arch == "llama" else (tiny_qwen2, qwen2_adapters)
    bundle = export_bundle(str(base), tmp_path / "b", {n: str(p) for n, p in adapters.items()},
                           onnx_quant="fp32", quiet=True)
    engine = Engine.open(bundle.root)
    ids = engine.tokenizer.encode(PROMPT)
    refs = {name: reference_logits(base, path, ids) for name, path in [(None, None), *adapters.items()]}
    names = list(adapters)
    order = [names[0], names[-1], None, names[0], *names, None]
    for name in order:
        got = engine.score(ids, adapter=name)
        err = np.abs(got - refs[name]).max()
        assert err <= TOL, f"{arch} adapter={name}: max abs {err}"
    # and the adapters really change the model
    for name in names:
        assert np.abs(refs[name] - refs[None]).max() > 0.1


def test_mistral_fp32_matches(tmp_path):
    from factory import make_base

    base = make_base(tmp_path / "mistral", "mistral", seed=7)
    ad = make_lora(base, tmp_path / "ad", seed=8, r=4, target_modules=["o_proj", "up_proj"])
    engine = Engine.open(export_bundle(str(base), tmp_path / "b", {"a": str(ad)}, onnx_quant="fp32", quiet=True).root)
    ids = engine.tokenizer.encode(PROMPT)
    for name, path in [("a", ad), (None, None)]:
        assert np.abs(engine.score(ids, adapter=name) - reference_logits(base, path, ids)).max() <= TOL


def test_tied_embeddings_export(tmp_path):
    from factory import make_base

    base = make_base(tmp_path / "tied", "llama", seed=9, tie=True)
    engine = Engine.open(export_bundle(str(base), tmp_path / "b", onnx_quant="fp32", quiet=True).root)
    ids = engine.tokenizer.encode(PROMPT)
    assert np.abs(engine.score(ids) - reference_logits(base, None, ids)).max() <= TOL


def test_greedy_generation_matches_transformers_generate(tiny_llama, llama_adapters, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    engine = Engine.open(export_bundle(str(tiny_llama), tmp_path / "b", {"all": str(llama_adapters["all"])},
                                       onnx_quant="fp32", quiet=True).root)
    ids = engine.tokenizer.encode("once upon a time")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), llama_adapters["all"]).eval()
    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    got = engine.complete("once upon a time", adapter="all", max_new_tokens=24)
    # generation stops early only on EOS; compare the tokens we produced
    assert got.tokens == want[: len(got.tokens)] and len(got.tokens) > 0


def test_merge_bakes_the_adapter_into_a_dedicated_base(tiny_llama, llama_adapters, tmp_path):
    bundle = export_bundle(str(tiny_llama), tmp_path / "m", {"all": str(llama_adapters["all"])},
                           onnx_quant="fp32", merge="all", quiet=True)
    assert bundle.adapters == {} and bundle.base["merged_adapter"]["name"] == "all"
    engine = Engine.open(bundle.root)
    ids = engine.tokenizer.encode(PROMPT)
    assert np.abs(engine.score(ids) - reference_logits(tiny_llama, llama_adapters["all"], ids)).max() <= TOL
    # A merged base has no hot-swap, so it is built without adapter slots (slot_set "none") and
    # computes what the same merged base with empty slots computes.
    import onnx

    assert bundle.backends["onnx"]["slot_set"] == "none" and bundle.backends["onnx"]["slots"] == []
    graph = onnx.load(str(bundle.file("onnx/model.onnx")), load_external_data=False).graph
    assert not [n.name for n in graph.node if "/lora/" in n.name] and not [i for i in graph.input if i.name.startswith("lora.")]
    slotted = export_bundle(str(tiny_llama), tmp_path / "ms", {"all": str(llama_adapters["all"])},
                            onnx_quant="fp32", merge="all", slots="lora", quiet=True)
    assert slotted.backends["onnx"]["slots"]
    assert np.abs(Engine.open(slotted.root).score(ids) - engine.score(ids)).max() <= 1e-5


def test_batched_and_legacy_block_diagonal_slots_compute_the_same_update(tiny_llama, llama_adapters, tmp_path):
    """Packed slots are batched (A [parts, in, r], B [chunks, r, chunk]); bundles exported before
    that have block-diagonal slots (no "chunk" in the manifest) and still get adapters in their
    layout. Both must give every packed layer the same x A B."""
    from edgepeft.exporters.onnx_adapter import adapter_tensors
    from edgepeft.peft_config import read_checked_adapter

    bundle = export_bundle(str(tiny_llama), tmp_path / "b", onnx_quant="fp32", quiet=True)
    info = bundle.backends["onnx"]
    legacy = {**info, "slots": [{k: v for k, v in s.items() if k not in ("chunk", "chunks")} for s in info["slots"]]}
    rng = np.random.default_rng(0)
    for name in ("all", "qv", "mixed"):
        spec = read_checked_adapter(llama_adapters[name])
        new, old = adapter_tensors(spec, info), adapter_tensors(spec, legacy)
        assert set(new) == set(old)
        packed = [s for s in info["slots"] if "chunk" in s and s["A"] in new]
        assert packed  # every one of these adapters has a module in the packed q/k/v slot
        for slot in packed:
            a, b = new[slot["A"]], new[slot["B"]]
            assert a.ndim == 3 and b.shape[0] == len(slot["chunks"]) and b.shape[2] == slot["chunk"]
            x = rng.standard_normal((5, slot["in"])).astype(np.float32)
            xa = np.einsum("si,pir->psr", x, a)[slot["chunks"]]  # [chunks, seq, r]
            batched = np.einsum("csr,crk->sck", xa, b).reshape(5, -1)
            want = x @ old[slot["A"]] @ old[slot["B"]]
            np.testing.assert_allclose(batched, want, atol=1e-5)
            assert np.abs(want).max() > 0.01
