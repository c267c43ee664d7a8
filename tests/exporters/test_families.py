"""Every family in edgepeft.exporters.archs beyond Llama: Qwen3, Gemma 2, Gemma 3, Phi-3 (with
LongRoPE and partial rotary). fp32 ONNX and F32 GGUF match PyTorch+PEFT with each adapter kind,
in any switching order, on prompts longer than the sliding window and the LongRoPE original
context; stock llama-cpp-python agrees with our GGUF backend. Two shapes beyond the fixtures: a
Phi-3 named like one with a byte-level BPE tokenizer (Phi-4-mini's kind), and Gemma 2 with LoRA on
every projection where llama.cpp's fp16 GELU table shows."""

import numpy as np
import pytest

from edgepeft.exporters import export_bundle
from edgepeft.runtime import Engine
from factory import (all_linear, gemma2_all_projection_gguf, load_reference, make_base, make_lora,
                     make_prompt_adapter, reference_logits)

TOL = 1e-3
GGUF_REL = 1e-3  # the bound tests/exporters/test_gguf.py holds llama and qwen2 to
# ~100 tokens: past the Gemma configs' window of 8 and the LongRoPE config's original 32.
PROMPT = ("the quick brown fox jumps over the lazy dog, then rests under the old tree "
          "while three birds sing in the rain")
NEW = ["qwen3", "gemma2", "gemma3_text", "gemma3_scaled", "phi3", "phi3_longrope"]
GGUF_NEW = ["qwen3", "gemma2", "gemma3_text", "phi3", "phi3_longrope"]


def ia3_targets(arch: str) -> dict:
    attn = ["qkv_proj"] if "qkv_proj" in all_linear(arch) else ["k_proj", "v_proj"]
    return {"target_modules": [*attn, "down_proj"], "feedforward_modules": ["down_proj"]}


def make_ia3(base, out, seed: int, **kwargs):
    import torch
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           IA3Config(task_type="CAUSAL_LM", **kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out, safe_serialization=True)
    return out


def family_adapters(arch: str, base, root) -> dict:
    linear = all_linear(arch)
    return {
        "all": make_lora(base, root / "all", seed=2, r=8, lora_alpha=16, use_rslora=True, target_modules=linear),
        "pattern": make_lora(base, root / "pattern", seed=3, r=2, lora_alpha=4, target_modules=linear[-3:],
                             rank_pattern={linear[-1]: 6}, alpha_pattern={linear[-2]: 9}),
        "dora": make_lora(base, root / "dora", seed=4, r=4, lora_alpha=8, use_dora=True, target_modules=linear[:2]),
        "ia3": make_ia3(base, root / "ia3", seed=5, **ia3_targets(arch)),
        "bias": make_lora(base, root / "bias", seed=6, r=4, lora_alpha=8, lora_bias=True, target_modules=linear[-2:]),
    }


@pytest.fixture(scope="module", params=NEW)
def family(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    base = make_base(root / "base", arch, seed=7, tie=arch.startswith("gemma"))
    return arch, base, family_adapters(arch, base, root)


def test_fp32_onnx_matches_peft_with_every_kind_in_any_switch_order(family, tmp_path):
    arch, base, adapters = family
    bundle = export_bundle(str(base), tmp_path / "b", {n: str(p) for n, p in adapters.items()},
                           onnx_quant="fp32", quiet=True)
    engine = Engine.open(bundle.root)
    ids = engine.tokenizer.encode(PROMPT)
    assert len(ids) > 64
    refs = {name: reference_logits(base, path, ids) for name, path in [(None, None), *adapters.items()]}
    for name in ["dora", None, "all", "ia3", "bias", "pattern", "all", None, "dora"]:
        err = np.abs(engine.score(ids, adapter=name) - refs[name]).max()
        assert err <= TOL, f"{arch} adapter={name}: max abs {err}"
    for name in adapters:  # the adapters really change the model
        assert np.abs(refs[name] - refs[None]).max() > 0.05, name


def hf_greedy(base, adapter, ids, n):
    import torch
    from peft import PeftModel

    model = load_reference(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_fp32_onnx_greedy_decoding_matches_transformers_generate(family, tmp_path):
    """Decoding step by step through the KV cache: windows slide, LongRoPE switches to its long
    factors once the sequence passes the original context (prompt of 24, 24 new tokens)."""
    arch, base, adapters = family
    bundle = export_bundle(str(base), tmp_path / "b", {"all": str(adapters["all"])}, onnx_quant="fp32", quiet=True)
    engine = Engine.open(bundle.root)
    text = PROMPT[:24]
    ids = engine.tokenizer.encode(text)
    for adapter in (None, "all"):
        want = hf_greedy(base, adapters.get(adapter), ids, 24)
        got = engine.complete(text, adapter=adapter, max_new_tokens=24, ignore_eos=True).tokens
        assert got == want, (arch, adapter)


@pytest.mark.parametrize("kind", ["all", "dora"])
def test_merged_adapter_matches_peft_on_both_backends(family, kind, tmp_path):
    arch, base, adapters = family
    formats = "onnx,gguf" if arch in GGUF_NEW else "onnx"
    bundle = export_bundle(str(base), tmp_path / "m", {kind: str(adapters[kind])}, merge=kind, formats=formats,
                           onnx_quant="fp32", gguf_quant="F32", quiet=True)
    ids = Engine.open(bundle.root).tokenizer.encode(PROMPT)
    ref = reference_logits(base, adapters[kind], ids)
    err = np.abs(Engine.open(bundle.root).score(ids) - ref).max()
    assert err <= TOL, (arch, err)
    if arch in GGUF_NEW:
        got = Engine.open(bundle.root, backend="gguf", max_context=256).score(ids)
        assert rel_err(got, ref) <= GGUF_REL, (arch, rel_err(got, ref))


@pytest.mark.parametrize("peft_type", ["PROMPT_TUNING", "PREFIX_TUNING"])
def test_prompt_learning_kinds_match_peft(family, peft_type, tmp_path):
    import torch
    from peft import PeftModel

    arch, base, _ = family
    adapter = make_prompt_adapter(base, tmp_path / "p", peft_type=peft_type, seed=9)
    bundle = export_bundle(str(base), tmp_path / "b", {"p": str(adapter)}, onnx_quant="fp32", quiet=True)
    engine = Engine.open(bundle.root)
    ids = engine.tokenizer.encode(PROMPT)[:20]
    model = PeftModel.from_pretrained(load_reference(base), adapter).eval()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0, -len(ids):].numpy()
    err = np.abs(engine.score(ids, adapter="p") - ref).max()
    assert err <= TOL, (arch, peft_type, err)


@pytest.fixture(scope="module", params=GGUF_NEW)
def gguf_family(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(f"gguf_{arch}")
    base = make_base(root / "base", arch, seed=11, tie=arch.startswith("gemma"))
    linear = all_linear(arch)
    adapters = {
        "all": make_lora(base, root / "all", seed=12, r=8, lora_alpha=16, use_rslora=True, target_modules=linear),
        "pattern": make_lora(base, root / "pattern", seed=13, r=2, lora_alpha=4, target_modules=linear[-3:],
                             rank_pattern={linear[-1]: 6}, alpha_pattern={linear[-2]: 9}),
    }
    bundle = export_bundle(str(base), root / "b", {n: str(p) for n, p in adapters.items()},
                           formats="gguf", gguf_quant="F32", quiet=True)
    return arch, base, adapters, bundle


def rel_err(got, ref):
    return float(np.abs(got - ref).max() / (ref.max() - ref.min()))


def test_f32_gguf_matches_peft(gguf_family):
    arch, base, adapters, bundle = gguf_family
    engine = Engine.open(bundle.root, backend="gguf", max_context=256)
    ids = engine.tokenizer.encode(PROMPT)
    for name in ["all", None, "pattern", "all"]:
        ref = reference_logits(base, adapters.get(name), ids)
        got = engine.score(ids, adapter=name)
        assert rel_err(got, ref) <= GGUF_REL, (arch, name, rel_err(got, ref))
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.98, (arch, name)


def test_stock_llama_cpp_python_gives_our_greedy_tokens(gguf_family):
    from llama_cpp import Llama

    arch, base, adapters, bundle = gguf_family
    ours = Engine.open(bundle.root, backend="gguf", max_context=256)
    text = PROMPT[:40]
    ids = ours.tokenizer.encode(text)
    for adapter in (None, "all", "pattern"):
        stock = Llama(model_path=str(bundle.file(bundle.backends["gguf"]["model"])), n_ctx=256, verbose=False, seed=0,
                      lora_path=str(bundle.adapter_path(adapter, "gguf")) if adapter else None)
        want = []
        for tok in stock.generate(ids, top_k=1, temp=0.0):
            if len(want) == 12:
                break
            want.append(tok)
        stock.close()
        assert ours.complete(text, adapter=adapter, max_new_tokens=12, ignore_eos=True).tokens == want, (arch, adapter)


# Phi-4-mini's split regex (tiktoken's o200k) as its tokenizer.json spells it.
O200K_JSON = (r'"[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+'
              r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+"
              r"[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*"
              r'|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"')
CAMEL = "HelloWorld, don't the 2024 lazy dogs"


def phi4_style_tokenizer(out):
    """Byte-level BPE as Phi-4-mini ships it: the o200k split regex, then ByteLevel without its own
    regex; <|endoftext|> and Phi's chat specials but no </s>, <unk>, <s>. Two merges cross the
    points where Llama 3's regex would split ("o W" in camel case, "n '" in a contraction)."""
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = [("o", "W"), ("n", "'")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(json.loads(O200K_JSON)), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (out / name).unlink(missing_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            additional_special_tokens=specials[1:]).save_pretrained(out)


def test_a_phi3_named_base_with_phi4_style_bpe_loads_in_llama_cpp_and_matches_peft(tmp_path):
    """llama.cpp sets Phi-3's special-token whitespace handling when general.name contains "phi3"
    or "phi-3", looking up </s>, <unk>, <s> and <|endoftext|> by text: a file named after this
    directory would not load. Its split regex must reach llama.cpp as "gpt-4o" for stock
    llama.cpp to tokenize as the tokenizer does."""
    from llama_cpp import Llama

    base = make_base(tmp_path / "Phi3-mini-bpe", "phi3", seed=11)
    phi4_style_tokenizer(base)
    adapter = make_lora(base, tmp_path / "all", seed=12, r=8, lora_alpha=16, target_modules=all_linear("phi3"))
    bundle = export_bundle(str(base), tmp_path / "b", {"all": str(adapter)}, formats="gguf", gguf_quant="F32",
                           quiet=True)
    engine = Engine.open(bundle.root, backend="gguf", max_context=256)
    stock = Llama(model_path=str(bundle.file(bundle.backends["gguf"]["model"])), n_ctx=256, verbose=False,
                  lora_path=str(bundle.adapter_path("all", "gguf")))
    for text in (CAMEL, PROMPT):
        assert stock.tokenize(text.encode(), add_bos=False) == engine.tokenizer.encode(text), text
    stock.close()
    ids = engine.tokenizer.encode(PROMPT)
    for name, path in ((None, None), ("all", adapter)):
        got, ref = engine.score(ids, adapter=name), reference_logits(base, path, ids)
        assert rel_err(got, ref) <= GGUF_REL, (name, rel_err(got, ref))


def test_gemma2_f32_gguf_with_lora_on_every_projection_matches_peft_with_ggmls_gelu(tmp_path):
    """llama.cpp's CPU backend computes GELU through an fp16 table (input and output rounded to
    fp16, relative 2^-11 each); a LoRA on every projection of this wider, deeper Gemma 2 amplifies
    that past GGUF_REL against exact GELU. Against PyTorch+PEFT computing GELU through the same
    table the file is within GGUF_REL, as the other families are against exact PyTorch."""
    base, adapter, engine = gemma2_all_projection_gguf(tmp_path, layers=4, hidden=128)
    ids = engine.tokenizer.encode(PROMPT)
    for name, path in ((None, None), ("all", adapter)):
        got, ref = engine.score(ids, adapter=name), reference_logits(base, path, ids, ggml_gelu=True)
        assert rel_err(got, ref) <= GGUF_REL, (name, rel_err(got, ref))
    # the table alone moves the reference past GGUF_REL here: this config shows what it tests
    assert rel_err(ref, reference_logits(base, adapter, ids)) > GGUF_REL
