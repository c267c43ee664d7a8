"""Gemma 4 (text: per-layer inputs, KV sharing, global layers with a larger head) through
edgepeft's runtime: an fp32 ONNX bundle exported by export_bundle with two LoRA adapters, run by
the Engine. The KV cache is kept for the layers that store one, each at its own head size.
Greedy tokens equal PeftModel.generate's with each adapter and the base, switched in any order,
one by one and as concurrent calls that the batcher decodes together, past the sliding window.
Prompt-learning adapters are refused in one line (the KV-sharing layers have no cache of their
own to carry a prefix)."""

import numpy as np
import pytest

from edgepeft.errors import UnsupportedAdapter
from edgepeft.exporters import add_adapter, export_bundle
from factory import all_linear, make_base, make_lora, make_prompt_adapter
from hybrid_checks import concurrent_completions, greedy_engine, peft_tokens_by_adapter

ARCH = "gemma4_text"
PROMPT = [int(i) for i in np.random.default_rng(6).integers(3, 260, 11)]  # longer than the window (8)
NEW = 20
ORDER = ["all", None, "mlp", "all", None, "mlp"]


@pytest.fixture(scope="module")
def gemma4(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma4rt")
    base = make_base(root / "base", ARCH, seed=7, tie=True)
    adapters = {
        "all": make_lora(base, root / "all", seed=2, r=8, lora_alpha=16, use_rslora=True,
                         target_modules=all_linear(ARCH)),
        "mlp": make_lora(base, root / "mlp", seed=3, r=4, lora_alpha=8,
                         target_modules=["gate_proj", "down_proj", "per_layer_input_gate"]),
    }
    bundle = export_bundle(str(base), root / "bundle", {n: str(p) for n, p in adapters.items()}, formats="onnx",
                           onnx_quant="fp32", quiet=True)
    return base, adapters, bundle


@pytest.fixture(scope="module")
def peft_tokens(gemma4):
    return peft_tokens_by_adapter(*gemma4[:2], PROMPT, NEW)


def test_engine_greedy_tokens_are_peft_generates_switching_adapters_in_any_order(gemma4, peft_tokens):
    kv = gemma4[2].backends["onnx"]["kv"]
    assert kv["layers"] == [0, 1, 2] and kv["heads"][2] == [2, 32]
    e = greedy_engine(gemma4[2], "onnx")
    for name in ORDER:
        assert e.complete(PROMPT, adapter=name, max_new_tokens=NEW).tokens == peft_tokens[name], name


def test_concurrent_calls_on_mixed_adapters_batch_and_give_peft_generates_tokens(gemma4, peft_tokens):
    e = greedy_engine(gemma4[2], "onnx", threads=1)
    out = concurrent_completions(e, PROMPT, ORDER, NEW)
    assert e._scheduler  # the calls went through the batcher
    assert out == [peft_tokens[n] for n in ORDER]


def test_prompt_learning_kinds_are_refused_in_one_line(gemma4, tmp_path):
    base, _, bundle = gemma4
    adapter = make_prompt_adapter(base, tmp_path / "p", peft_type="PREFIX_TUNING")
    with pytest.raises(UnsupportedAdapter, match=r"layers \[3, 4, 5\] reuse an earlier layer's KV cache") as e:
        export_bundle(str(base), tmp_path / "b", {"p": str(adapter)}, formats="onnx", onnx_quant="fp32", quiet=True)
    assert "\n" not in str(e.value) and not (tmp_path / "b").exists()
    with pytest.raises(UnsupportedAdapter, match="reuse an earlier layer's KV cache"):
        add_adapter(bundle.root, "p", adapter, formats="onnx")
