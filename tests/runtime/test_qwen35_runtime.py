"""Qwen3.5 (Gated DeltaNet layers, each with a convolution and a recurrent state, between gated
attention layers) through edgepeft's runtime: a bundle exported by export_bundle with two LoRA
adapters, run by the Engine on both backends. Greedy tokens equal PeftModel.generate's with each
adapter and the base, switched in any order, on one engine (each call starts from zero states),
one by one and as concurrent calls that the batcher decodes together; verify passes on both backends."""

import json

import numpy as np
import pytest

from edgepeft.errors import UnsupportedAdapter
from edgepeft.exporters import add_adapter, export_bundle
from factory import all_linear, make_base, make_lora, make_prompt_adapter
from hybrid_checks import concurrent_completions, greedy_engine, peft_tokens_by_adapter

ARCH = "qwen3_5_text"
PROMPT = [int(i) for i in np.random.default_rng(5).integers(3, 260, 11)]  # longer than the kernel (4)
NEW = 70  # past 64 new tokens
ORDER = ["all", None, "deltanet", "all", None, "deltanet"]


@pytest.fixture(scope="module")
def qwen35(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen35rt")
    base = make_base(root / "base", ARCH, seed=7, tie=True)
    adapters = {
        "all": make_lora(base, root / "all", seed=2, r=8, lora_alpha=16, use_rslora=True,
                         target_modules=all_linear(ARCH)),
        "deltanet": make_lora(base, root / "deltanet", seed=3, r=4, lora_alpha=8,
                              target_modules=["in_proj_qkv", "in_proj_z", "out_proj"], rank_pattern={"out_proj": 6}),
    }
    bundle = export_bundle(str(base), root / "bundle", {n: str(p) for n, p in adapters.items()}, formats="onnx,gguf",
                           onnx_quant="fp32", gguf_quant="F32", quiet=True)
    return base, adapters, bundle


@pytest.fixture(scope="module")
def peft_tokens(qwen35):
    return peft_tokens_by_adapter(*qwen35[:2], PROMPT, NEW)


def test_the_onnx_sequence_carries_conv_and_recurrent_states_and_no_kv_for_deltanet_layers(qwen35):
    kv = qwen35[2].backends["onnx"]["kv"]
    assert kv["layers"] == [3]
    assert {(s["layer"], s["name"]) for s in kv["states"]} == {(i, n) for i in (0, 1, 2) for n in ("conv", "recurrent")}


@pytest.mark.parametrize("backend", ["onnx", "gguf"])
def test_engine_greedy_tokens_are_peft_generates_switching_adapters_in_any_order(qwen35, peft_tokens, backend):
    e = greedy_engine(qwen35[2], backend)
    for name in ORDER:
        assert e.complete(PROMPT, adapter=name, max_new_tokens=NEW).tokens == peft_tokens[name], (backend, name)


@pytest.mark.parametrize("backend", ["onnx", "gguf"])
def test_concurrent_calls_on_mixed_adapters_batch_and_give_peft_generates_tokens(qwen35, peft_tokens, backend):
    e = greedy_engine(qwen35[2], backend, threads=1)
    out = concurrent_completions(e, PROMPT, ORDER, NEW)
    assert e._scheduler  # the calls went through the batcher
    assert out == [peft_tokens[n] for n in ORDER]


@pytest.mark.parametrize("kind", ["PROMPT_TUNING", "PREFIX_TUNING"])
def test_prompt_learning_kinds_are_refused_naming_both_states_in_one_line(qwen35, kind, tmp_path):
    base, _, bundle = qwen35
    adapter = make_prompt_adapter(base, tmp_path / "p", peft_type=kind)
    with pytest.raises(UnsupportedAdapter, match=r"layers \[0, 1, 2\] carry a convolution and recurrent state "
                                                 "instead of a KV cache") as e:
        export_bundle(str(base), tmp_path / "b", {"p": str(adapter)}, formats="onnx", onnx_quant="fp32", quiet=True)
    assert "\n" not in str(e.value) and not (tmp_path / "b").exists()
    with pytest.raises(UnsupportedAdapter, match="carry a convolution and recurrent state"):
        add_adapter(bundle.root, "p", adapter, formats="onnx")


def test_verify_passes_the_qwen35_bundle_on_both_backends(qwen35, capsys):
    from edgepeft.cli import main

    base, adapters, bundle = qwen35
    assert main(["verify", str(bundle.root), "--reference", str(base), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["ok"] and {(c["backend"], c["adapter"]) for c in r["checks"]} == {
        (b, a) for b in ("onnx", "gguf") for a in (None, *adapters)}
    assert all(c["top1"] == 1.0 for c in r["checks"])
