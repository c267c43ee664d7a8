"""GGUF: base and LoRA adapters for llama.cpp, matching PyTorch+PEFT, loadable by stock llama.cpp."""

import numpy as np
import pytest

from edgepeft.errors import AdapterError, AdapterMismatch, EdgepeftError
from edgepeft.exporters import add_adapter, export_bundle
from edgepeft.runtime import Engine
from factory import make_base, make_lora, make_trained_base, make_trained_lora, reference_logits

PROMPT = "the quick brown fox jumps over the lazy dog, then rests"


def rel_err(got, ref):
    return float(np.abs(got - ref).max() / (ref.max() - ref.min()))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f32_gguf_scores_and_greedy_match_peft(arch, tmp_path):
    base = make_base(tmp_path / arch, arch, seed=11)
    adapters = {
        "qk": make_lora(base, tmp_path / "qk", seed=12, r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"]),
        "rs": make_lora(base, tmp_path / "rs", seed=13, r=8, lora_alpha=16, use_rslora=True,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        "pattern": make_lora(base, tmp_path / "pattern", seed=14, r=2, lora_alpha=4,
                             target_modules=["k_proj", "v_proj", "down_proj"],
                             rank_pattern={"down_proj": 6}, alpha_pattern={"k_proj": 9}),
    }
    bundle = export_bundle(str(base), tmp_path / "b", {n: str(p) for n, p in adapters.items()},
                           formats="gguf", gguf_quant="F32", quiet=True)
    engine = Engine.open(bundle.root, backend="gguf")
    ids = engine.tokenizer.encode(PROMPT)
    for name in ["qk", None, "rs", "pattern", "qk"]:
        ref = reference_logits(base, adapters.get(name), ids)
        got = engine.score(ids, adapter=name)
        assert rel_err(got, ref) <= 1e-3, (arch, name, rel_err(got, ref))
        assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_adapter_scales_are_encoded_as_llama_cpp_reads_them(tiny_llama, llama_adapters, tmp_path):
    import gguf

    bundle = export_bundle(str(tiny_llama), tmp_path / "b", {n: str(p) for n, p in llama_adapters.items()},
                           formats="gguf", gguf_quant="F32", quiet=True)

    def alpha(name):
        return gguf.GGUFReader(bundle.adapter_path(name, "gguf")).fields["adapter.lora.alpha"].contents()

    assert alpha("qv") == pytest.approx(8.0)  # plain LoRA keeps the conventional alpha
    assert alpha("mixed") == 0.0  # alpha_pattern/rank_pattern: scales folded into B exactly
    reader = gguf.GGUFReader(bundle.adapter_path("qv", "gguf"))
    assert reader.fields["general.type"].contents() == "adapter"
    assert {t.name for t in reader.tensors} >= {"blk.0.attn_q.weight.lora_a", "blk.1.attn_v.weight.lora_b"}


@pytest.fixture(scope="module")
def trained_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained_gguf")
    base = make_trained_base(root / "base")
    back = make_trained_lora(base, root / "back", step=-1)
    return base, back, root


@pytest.mark.parametrize("quant", ["F32", "Q8_0"])
def test_stock_llama_cpp_python_loads_our_files_and_agrees(trained_gguf, quant):
    from llama_cpp import Llama

    base, back, root = trained_gguf
    bundle = export_bundle(str(base), root / quant, {"back": str(back)}, formats="gguf", gguf_quant=quant, quiet=True)
    ours = Engine.open(bundle.root, backend="gguf")
    for adapter in (None, "back"):
        stock = Llama(model_path=str(bundle.file(bundle.backends["gguf"]["model"])), n_ctx=128, verbose=False, seed=0,
                      lora_path=str(bundle.adapter_path("back", "gguf")) if adapter else None)
        for prompt in ["abcd", "mnop", "uvwx"]:
            ids = ours.tokenizer.encode(prompt)
            want = []
            for tok in stock.generate(ids, top_k=1, temp=0.0):
                if tok in ours.tokenizer.eos_ids or len(want) == 10:
                    break
                want.append(tok)
            assert ours.complete(prompt, adapter=adapter, max_new_tokens=10).tokens == want, (quant, adapter, prompt)
        stock.close()


def test_q4_k_m_keeps_greedy_behaviour_of_a_trained_model(trained_gguf):
    base, back, root = trained_gguf
    bundle = export_bundle(str(base), root / "q4km", {"back": str(back)}, formats="gguf,onnx", onnx_quant="fp32",
                           gguf_quant="Q4_K_M", quiet=True)
    assert bundle.backends["gguf"]["quant"] == "Q4_K_M"
    q4, fp32 = Engine.open(bundle.root, backend="gguf"), Engine.open(bundle.root, backend="onnx")
    prompts = ["abcd", "klmn", "uvwx", "efgh", "qrst", "hijk", "mnop", "wxyz"]
    for adapter in (None, "back"):
        agree = sum(q4.generate(p, adapter=adapter, max_new_tokens=10) == fp32.generate(p, adapter=adapter, max_new_tokens=10)
                    for p in prompts)
        assert agree >= 0.75 * len(prompts), (adapter, agree)


def test_bad_gguf_inputs_fail_cleanly(tiny_llama, llama_adapters, tmp_path):
    bundle = export_bundle(str(tiny_llama), tmp_path / "b", {"qv": str(llama_adapters["qv"])},
                           formats="gguf", gguf_quant="F32", quiet=True)
    engine = Engine.open(bundle.root, backend="gguf")
    before = engine.complete("still works", adapter="qv", max_new_tokens=4).tokens
    good = bundle.adapter_path("qv", "gguf").read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(AdapterError, match="truncated.gguf"):
        engine.load_adapter("t", truncated)
    other = make_base(tmp_path / "wide", "llama", hidden=96)
    wide = export_bundle(str(other), tmp_path / "wb", {"w": str(make_lora(other, tmp_path / "w"))},
                         formats="gguf", gguf_quant="F32", quiet=True)
    with pytest.raises(AdapterMismatch, match="another base"):  # checked in Python before llama.cpp
        engine.load_adapter("w", wide.adapter_path("w", "gguf"))
    qwen = make_base(tmp_path / "qwen", "qwen2")  # same shapes, other architecture
    foreign = export_bundle(str(qwen), tmp_path / "qb", {"q": str(make_lora(qwen, tmp_path / "q"))},
                            formats="gguf", gguf_quant="F32", quiet=True)
    with pytest.raises(AdapterMismatch, match="architecture qwen2"):
        engine.load_adapter("q", foreign.adapter_path("q", "gguf"))
    # the refused files left the engine as it was: no new adapter, the same output with the old one
    assert engine.adapters == ["qv"]
    assert engine.complete("still works", adapter="qv", max_new_tokens=4).tokens == before
    with pytest.raises(EdgepeftError, match="unknown GGUF quant type 'Q9_Z'"):
        export_bundle(str(tiny_llama), tmp_path / "q9", formats="gguf", gguf_quant="Q9_Z", quiet=True)
    assert not (tmp_path / "q9").exists()


def test_add_adapter_writes_both_formats(tiny_llama, llama_adapters, tmp_path):
    bundle = export_bundle(str(tiny_llama), tmp_path / "b", formats="onnx,gguf", onnx_quant="fp32",
                           gguf_quant="F32", quiet=True)
    bundle = add_adapter(bundle.root, "all", llama_adapters["all"])
    assert set(bundle.adapters["all"]["files"]) == {"onnx", "gguf"}
    ids = Engine.open(bundle.root).tokenizer.encode(PROMPT)
    onnx_logits = Engine.open(bundle.root).score(ids, adapter="all")
    gguf_logits = Engine.open(bundle.root, backend="gguf").score(ids, adapter="all")
    assert rel_err(gguf_logits, onnx_logits) <= 1e-3


def test_a_base_without_tokenizer_exports_and_scores_ids(tmp_path):
    base = make_base(tmp_path / "bare", "llama", seed=21)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (base / name).unlink(missing_ok=True)
    ad = make_lora(base, tmp_path / "ad", seed=22, target_modules=["q_proj", "k_proj"])
    bundle = export_bundle(str(base), tmp_path / "b", {"a": str(ad)}, formats="onnx,gguf", onnx_quant="fp32",
                           gguf_quant="F32", quiet=True)
    ids = [5, 17, 42, 99, 3, 250, 7]
    for backend in ("onnx", "gguf"):
        engine = Engine.open(bundle.root, backend=backend)
        for name, path in (("a", ad), (None, None)):
            assert rel_err(engine.score(ids, adapter=name), reference_logits(base, path, ids)) <= 1e-3
        with pytest.raises(EdgepeftError, match="no tokenizer"):
            engine.generate("text needs a tokenizer")


def test_sentencepiece_style_tokenizer_exports_to_gguf(tmp_path):
    """Llama-2/Mistral style: BPE with byte fallback, written as llama.cpp's "llama" vocab."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)}}
    for piece in ["▁", "a", "b", "▁a", "ab"]:  # 264 tokens: the tiny base's vocabulary size
        vocab[piece] = len(vocab)
    merges = [("▁", "a"), ("a", "b")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    base = make_base(tmp_path / "spm", "mistral", seed=23)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (base / name).unlink(missing_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(base)
    bundle = export_bundle(str(base), tmp_path / "b", formats="gguf", gguf_quant="F32", quiet=True)
    engine = Engine.open(bundle.root, backend="gguf")
    ids = engine.tokenizer.encode("ab ab a b")
    assert rel_err(engine.score(ids), reference_logits(base, None, ids)) <= 1e-3
    from llama_cpp import Llama

    stock = Llama(model_path=str(bundle.file(bundle.backends["gguf"]["model"])), n_ctx=64, verbose=False)
    assert stock.tokenize(b"ab ab a b", add_bos=False) == [i for i in ids if i != 1]
    stock.close()


def test_general_name_is_dropped_only_where_llama_cpp_phi3_rule_would_refuse_the_file():
    """llama.cpp looks up </s>, <unk>, <s> and <|endoftext|> when general.name says phi-3/phi3."""
    from edgepeft.exporters.gguf_vocab import gguf_name

    phi3_spm = {"<unk>", "<s>", "</s>", "<|endoftext|>", "<|end|>", "▁a"}
    assert gguf_name("Phi-3-mini-4k-instruct", phi3_spm) == "Phi-3-mini-4k-instruct"
    assert gguf_name("my-PHI3-bpe", {"<|endoftext|>", "<|end|>", "Ġa"}) is None
    assert gguf_name("Phi-4-mini-instruct", {"<|endoftext|>", "<|end|>", "Ġa"}) == "Phi-4-mini-instruct"
    assert gguf_name("phi3-bare", None) == "phi3-bare"  # no vocabulary: llama.cpp stops before the rule
