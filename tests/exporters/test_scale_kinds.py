"""DoRA, IA3, bias tuning and embedding/lm_head LoRA on the ONNX backend, against PEFT, switched in
any order with prompt tuning, prefix tuning and plain LoRA on one Engine."""

import numpy as np
import pytest

from edgepeft.errors import EngineError, UnsupportedAdapter
from edgepeft.exporters import add_adapter, export_bundle
from edgepeft.kinds import read_peft_adapter
from edgepeft.runtime import Engine
from factory import make_lora, make_prompt_adapter, reference_logits

IDS = [5, 17, 99, 3, 42, 250, 7, 61]
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft(base_dir, out, config, seed: int, perturb: tuple[str, ...]):
    """A PEFT adapter from `config` whose parameters matching `perturb` are randomized."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in perturb):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(out, safe_serialization=True)
    return out


def adapters_for(base, root, arch):
    from peft import IA3Config, LoraConfig

    ads = {
        "dora": make_lora(base, root / "dora", seed=11, r=4, lora_alpha=8, use_dora=True,
                          target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
        "ia3": make_peft(base, root / "ia3", IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                                                       feedforward_modules=["down_proj"]), 12, ("ia3_l",)),
        "emb": make_lora(base, root / "emb", seed=13, r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"]),
        "lbias": make_lora(base, root / "lbias", seed=14, r=4, lora_alpha=8, lora_bias=True,
                           target_modules=["q_proj", "k_proj", "up_proj"]),
        "lora": make_lora(base, root / "lora", seed=15, r=8, lora_alpha=16, target_modules=ALL7),
    }
    # the prompt-learning kinds on the same Engine (KV-cache prefixes, see test_prompt_kinds.py)
    ads["prompt"] = make_prompt_adapter(base, root / "prompt", "PROMPT_TUNING", seed=17, num_virtual_tokens=4)
    ads["prefix"] = make_prompt_adapter(base, root / "prefix", "PREFIX_TUNING", seed=18, num_virtual_tokens=3)
    if arch == "qwen2":  # q/k/v have biases: BitFit-style bias tuning trains them
        ads["bitfit"] = make_peft(base, root / "bitfit", LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"],
                                                                    bias="all"), 16, ("lora_", ".bias"))
    return ads


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_kinds_match_peft_and_switch_in_any_order(arch, tiny_llama, tiny_qwen2, tmp_path):
    base = tiny_llama if arch == "llama" else tiny_qwen2
    ads = adapters_for(base, tmp_path, arch)
    bundle = export_bundle(str(base), tmp_path / "b", {n: str(p) for n, p in ads.items()}, onnx_quant="fp32", quiet=True)
    assert bundle.backends["onnx"]["slot_set"] == "full"  # chosen because DoRA/IA3/biases need it
    assert {a["kind"] for a in bundle.adapters.values()} >= {"dora", "ia3", "lora"}
    engine = Engine.open(bundle.root)
    # PEFT's prompt tuning also returns logits for its virtual tokens: keep the real tokens' rows
    want = {name: reference_logits(base, path, IDS)[-len(IDS):] for name, path in ads.items()}
    want[None] = reference_logits(base, None, IDS)
    order = ["dora", None, "ia3", "prompt", "emb", "dora", "prefix", "lbias", "lora", "ia3", "prompt", None,
             *(["bitfit", "prefix", "dora"] if arch == "qwen2" else [])]
    for name in order:
        got = engine.score(IDS, adapter=name)
        err = np.abs(got - want[name]).max()
        assert err < 1e-3, (arch, name, err)
        if name is not None:  # the adapter matters at this tolerance
            assert np.abs(want[name] - want[None]).max() > 0.05, name
    for combo in ("ia3+lora", "lora+dora", "lbias+lora"):  # scales and biases do not add up like LoRAs
        with pytest.raises(EngineError, match="only plain LoRA"):
            engine.score(IDS, adapter=combo)


def test_lora_only_base_refuses_scale_kinds_and_names_the_fix(tiny_llama, tmp_path):
    from peft import IA3Config

    ia3 = make_peft(tiny_llama, tmp_path / "ia3", IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                                                           feedforward_modules=["down_proj"]), 1, ("ia3_l",))
    bundle = export_bundle(str(tiny_llama), tmp_path / "b", onnx_quant="fp32", quiet=True)
    assert bundle.backends["onnx"]["slot_set"] == "lora"
    with pytest.raises(UnsupportedAdapter, match="--slots full"):
        add_adapter(bundle.root, "ia3", ia3)
    full = export_bundle(str(tiny_llama), tmp_path / "full", onnx_quant="fp32", quiet=True, slots="full")
    add_adapter(full.root, "ia3", ia3)  # add-adapter into a full base works, base loaded from its source
    got = Engine.open(full.root).score(IDS, adapter="ia3")
    assert np.abs(got - reference_logits(tiny_llama, ia3, IDS)).max() < 1e-3


def test_gguf_refuses_scale_kinds_pointing_to_merge(tiny_llama, tmp_path):
    dora = make_lora(tiny_llama, tmp_path / "dora", seed=3, use_dora=True)
    assert read_peft_adapter(dora).kind == "dora"
    with pytest.raises(UnsupportedAdapter, match="--merge d"):
        export_bundle(str(tiny_llama), tmp_path / "b", {"d": str(dora)}, formats="onnx,gguf", quiet=True)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("kind", ["dora", "ia3"])
def test_merge_bakes_the_adapter_into_a_dedicated_base_on_both_backends(kind, tiny_llama, tmp_path):
    from peft import IA3Config

    if kind == "dora":
        path = make_lora(tiny_llama, tmp_path / kind, seed=4, use_dora=True, target_modules=["q_proj", "down_proj"])
    else:
        path = make_peft(tiny_llama, tmp_path / kind, IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                                                                feedforward_modules=["down_proj"]), 5, ("ia3_l",))
    bundle = export_bundle(str(tiny_llama), tmp_path / "m", {"d": str(path)}, formats="onnx,gguf", onnx_quant="fp32",
                           gguf_quant="F32", merge="d", quiet=True)
    want = reference_logits(tiny_llama, path, IDS)
    assert np.abs(Engine.open(bundle.root).score(IDS) - want).max() < 1e-3
    gguf = Engine.open(bundle.root, backend="gguf").score(IDS)
    assert np.abs(gguf - want).max() < 1e-3 * max(1.0, np.abs(want).max())
