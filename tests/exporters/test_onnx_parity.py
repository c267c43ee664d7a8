"""fp32 ONNX exports match PyTorch+PEFT logits for every adapter, in any switching order."""

import numpy as np
import pytest

from edgepeft.exporters import export_bundle
from edgepeft.runtime import Engine
from factory import graph_paths, make_lora, reference_logits

TOL = 1e-3
PROMPT = "the quick brown fox jumps over the lazy dog, then rests"


def empty_cache_feed(bundle, ids) -> dict:
    """Inputs for one plain onnxruntime call on `ids` from an empty KV cache."""
    from edgepeft.runtime_contract import ATTENTION_MASK, INPUT_IDS, kv_names

    kv = bundle.backends["onnx"]["kv"]
    feed = {INPUT_IDS: np.array([ids], np.int64), ATTENTION_MASK: np.ones((1, len(ids)), np.int64)}
    for i in range(kv["num_layers"]):
        for past in kv_names(i)[:2]:
            feed[past] = np.zeros((1, kv["num_kv_heads"], 0, kv["head_dim"]), np.float32)
    return feed


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


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_calls_without_an_adapter_run_the_slot_free_base_path(arch, tiny_llama, tiny_qwen2, llama_adapters,
                                                              qwen2_adapters, tmp_path):
    """The graph is If(adapters_active): without an adapter it runs the base without slot
    operators, which computes what empty slots compute (the base bias kept: qwen2 has q/k/v
    biases, behind full slots' overridable bias); an adapter file's flag selects the slot path,
    through onnxruntime's own adapter API too."""
    import onnx
    import onnxruntime as ort

    from edgepeft.runtime_contract import ADAPTERS_ACTIVE

    base, adapters = (tiny_llama, llama_adapters) if arch == "llama" else (tiny_qwen2, qwen2_adapters)
    name = list(adapters)[-1]
    bundle = export_bundle(str(base), tmp_path / "b", {name: str(adapters[name])}, onnx_quant="fp32",
                           slots="full", quiet=True)
    model = onnx.load(str(bundle.file("onnx/model.onnx")), load_external_data=False)
    paths = graph_paths(model)

    def slot_ops(nodes):
        return [n.name for n in nodes if "/lora/" in n.name or "/Scale" in n.name]

    assert slot_ops(paths["slots"]) and not slot_ops(paths["base"])
    assert len(paths["base"]) < len(paths["slots"]) and bundle.backends["onnx"]["base_path"] is True
    choose = next(n for n in model.graph.node if n.op_type == "If")
    assert not any(a.g.initializer for a in choose.attribute)  # the weights are the outer graph's, shared

    session = ort.InferenceSession(str(bundle.file("onnx/model.onnx")), providers=["CPUExecutionProvider"])
    ids = Engine.open(bundle.root).tokenizer.encode(PROMPT)
    feed = empty_cache_feed(bundle, ids)
    base_path = session.run(["logits"], feed)[0][0]
    empty_slots = session.run(["logits"], {**feed, ADAPTERS_ACTIVE: np.ones(1, np.float32)})[0][0]
    assert np.abs(base_path - reference_logits(base, None, ids)).max() <= TOL
    assert np.abs(base_path - empty_slots).max() <= 1e-5

    adapter_file = str(bundle.file(bundle.adapters[name]["files"]["onnx"]))
    lora = ort.LoraAdapter()
    lora.Load(adapter_file)
    run_options = ort.RunOptions()
    run_options.add_active_adapter(lora)
    with_adapter = session.run(["logits"], feed, run_options)[0][0]
    assert np.abs(with_adapter - reference_logits(base, adapters[name], ids)).max() <= TOL
    # The slot tensors bound but the flag left at 0: the base path does not read them.
    params = ort.AdapterFormat.read_adapter(adapter_file).get_parameters()
    assert params[ADAPTERS_ACTIVE].numpy().tolist() == [1.0]
    tensors = {k: v.numpy() for k, v in params.items() if k != ADAPTERS_ACTIVE}
    assert np.abs(session.run(["logits"], {**feed, **tensors})[0][0] - base_path).max() == 0


def test_logits_to_keep_returns_the_last_rows_and_prefill_asks_for_one(tiny_llama, llama_adapters, tmp_path):
    """logits_to_keep=n gives the last n rows of what 0 (every position) gives, on the base path
    and with an adapter; the runtime's prefill asks for one row, scoring for all."""
    import onnxruntime as ort

    from edgepeft.runtime_contract import ADAPTERS_ACTIVE, LOGITS_TO_KEEP

    bundle = export_bundle(str(tiny_llama), tmp_path / "b", {"all": str(llama_adapters["all"])},
                           onnx_quant="fp32", quiet=True)
    assert bundle.backends["onnx"]["logits_to_keep"] is True
    session = ort.InferenceSession(str(bundle.file("onnx/model.onnx")), providers=["CPUExecutionProvider"])
    engine = Engine.open(bundle.root)
    ids = engine.tokenizer.encode(PROMPT)
    feed = empty_cache_feed(bundle, ids)
    params = ort.AdapterFormat.read_adapter(str(bundle.file(bundle.adapters["all"]["files"]["onnx"]))).get_parameters()
    with_adapter = {k: v.numpy() for k, v in params.items()}
    assert with_adapter[ADAPTERS_ACTIVE].tolist() == [1.0]
    for extra in ({}, with_adapter):
        every = session.run(["logits"], {**feed, **extra})[0][0]
        assert every.shape[0] == len(ids)
        for n in (1, 3, len(ids) + 5):
            kept = session.run(["logits"], {**feed, **extra, LOGITS_TO_KEEP: np.array([n], np.int64)})[0][0]
            assert kept.shape[0] == min(n, len(ids)) and np.abs(kept - every[-kept.shape[0]:]).max() <= 1e-5
    backend = engine.backend
    with backend.open_sequence(None, len(ids) + 2) as seq:
        last = seq.forward(ids, all_logits=False).copy()  # one-row results share the step buffer
        step = seq.forward([ids[0]], all_logits=False)
    with backend.open_sequence(None, len(ids) + 2) as seq:
        rows = seq.forward(ids + [ids[0]], all_logits=True)
    assert last.shape[0] == 1 and rows.shape[0] == len(ids) + 1
    assert np.abs(last[0] - rows[-2]).max() <= 1e-4 and np.abs(step[0] - rows[-1]).max() <= 1e-4


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
    from edgepeft.kinds import read_checked_adapter

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
