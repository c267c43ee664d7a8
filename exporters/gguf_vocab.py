"""A base's tokenizer (its tokenizer.json) as the GGUF vocabulary keys llama.cpp reads.

Byte-level BPE (GPT-2 style: SmolLM, Llama 3, Qwen) is written as llama.cpp's "gpt2" model with
its merges and a named pre-tokenizer; BPE with byte fallback and "▁" for spaces (Llama 2,
Mistral, Gemma) as its "llama" (sentencepiece) model with scores and token types; a base without
a tokenizer gets llama.cpp's "none" vocabulary (ids in, logits out).
"""

from __future__ import annotations

import json

from edgepeft.errors import UnsupportedModel

from .archs import arch_of
from .hf_base import BaseModel

# llama.cpp gives Phi-3's special tokens their whitespace handling when general.name contains one
# of these (lower-cased), looking each of these tokens up by text: one missing (a byte-level BPE
# vocabulary, as Phi-4-mini's) and it refuses the file ("unordered_map::at").
_PHI3_NAMES = ("phi-3", "phi3")
_PHI3_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def gguf_name(name: str, tokens: set[str] | None) -> str | None:
    """general.name for a base called `name` whose vocabulary is `tokens` (None: no vocabulary,
    which llama.cpp loads before the rule above), or None where llama.cpp would refuse the file
    with that name."""
    if tokens is not None and any(k in name.lower() for k in _PHI3_NAMES) and not set(_PHI3_TOKENS) <= tokens:
        return None
    return name


# The split regex of tiktoken's o200k encoding, as tokenizer.json spells it (Phi-4-mini):
# llama.cpp's "gpt-4o" pre-tokenizer. It splits camel case and keeps contractions on their word,
# where Llama 3's regex ("llama-bpe") does neither.
O200K_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(base: BaseModel, tok_json: dict) -> str:
    """llama.cpp's name for the pre-tokenizer regex (tokenizer.ggml.pre).

    llama.cpp's converter identifies it by hashing the tokenization of a probe text against a
    table of known models; we name the families we export from their own structure."""
    pre = tok_json.get("pre_tokenizer") or {}
    kinds = [p.get("type") for p in pre.get("pretokenizers", [pre])]
    named = arch_of(base.config.model_type).gguf_pre_tokenizer
    if named is not None:
        return named
    if kinds[:1] == ["Digits"] and "ByteLevel" in kinds:
        return "smollm"
    if kinds == ["ByteLevel"] and pre.get("use_regex", True):
        return "gpt-2"
    if "Split" in kinds and "ByteLevel" in kinds:
        regexes = [(p.get("pattern") or {}).get("Regex") for p in pre.get("pretokenizers", [])]
        return "gpt-4o" if O200K_REGEX in regexes else "llama-bpe"  # else Llama 3 style
    raise UnsupportedModel(f"{base.local_dir}/tokenizer.json: pre-tokenizer {kinds} has no known llama.cpp equivalent")


def add_tokenizer(writer, gguf, base: BaseModel) -> set[str] | None:
    """The tokenizer keys of `base` (its tokenizer.json) as llama.cpp reads them; returns the
    vocabulary's token texts (None for a base without a tokenizer)."""
    path = base.local_dir / "tokenizer.json"
    if not path.is_file():
        writer.add_tokenizer_model("none")  # llama.cpp's "no vocab": ids in, logits out
        return None
    tok_json = json.loads(path.read_text())
    model = tok_json.get("model", {})
    if model.get("type") != "BPE":
        raise UnsupportedModel(f"{path}: {model.get('type')} tokenizers are not exported to GGUF yet")
    if not _is_byte_level(tok_json):
        return _add_sentencepiece_style(writer, gguf, base)
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in tok_json.get("added_tokens", [])}
    for text, t in added.items():
        vocab.setdefault(text, t["id"])
    _check_vocab(base, max(vocab.values()) + 1)
    n = base.dims["vocab_size"]
    tokens, types = [f"[PAD{i}]" for i in range(n)], [gguf.TokenType.UNUSED] * n
    # gguf's BpeVocab types every in-vocabulary token NORMAL; llama.cpp must see special added
    # tokens (<|im_end|>, ...) as CONTROL to stop on them and keep them out of decoded text.
    for text, i in vocab.items():
        tokens[i] = text
        t = added.get(text)
        types[i] = gguf.TokenType.NORMAL if t is None else (
            gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(base, tok_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(base.local_dir, load_merges=True, n_vocab=n)
    if special.chat_template is None and (base.local_dir / "chat_template.jinja").is_file():
        special.chat_template = (base.local_dir / "chat_template.jinja").read_text()
    # Whether a BOS is prepended is the tokenizer's behaviour, not a config flag: ask it.
    from tokenizers import Tokenizer

    hf_tok = Tokenizer.from_file(str(base.local_dir / "tokenizer.json"))
    probe = hf_tok.encode("a", add_special_tokens=True).ids
    bos = special.special_token_ids.get("bos")
    special.add_special_token["bos"] = bool(bos is not None and probe and probe[0] == bos)
    special.add_special_token["eos"] = False
    special.add_to_gguf(writer, quiet=True)
    return set(vocab)


def _is_byte_level(tok_json: dict) -> bool:
    """GPT-2 style byte-level BPE (a ByteLevel pre-tokenizer or decoder), as opposed to
    sentencepiece-style BPE with byte fallback."""
    def kinds(node):
        node = node or {}
        return [node.get("type")] + [k for sub in node.get("pretokenizers", node.get("decoders", [])) for k in kinds(sub)]

    return "ByteLevel" in kinds(tok_json.get("pre_tokenizer")) + kinds(tok_json.get("decoder"))


def _prepends_space(tok_json: dict) -> bool:
    """Whether the sentencepiece-style tokenizer prepends "▁" to the text (Llama 2, Mistral) or
    not (Gemma), read from its normalizer."""

    def kinds(node):
        node = node or {}
        return [(node.get("type"), node.get("prepend"))] + [k for sub in node.get("normalizers", []) for k in kinds(sub)]

    pre = tok_json.get("pre_tokenizer") or {}
    return any(t == "Prepend" for t, _ in kinds(tok_json.get("normalizer"))) or (
        pre.get("type") == "Metaspace" and pre.get("prepend_scheme", "always") != "never")


def _check_vocab(base: BaseModel, n_tokens: int) -> None:
    if n_tokens > base.dims["vocab_size"]:
        raise UnsupportedModel(f"{base.local_dir}/tokenizer.json: {n_tokens} tokens, but the model's vocabulary "
                               f"has {base.dims['vocab_size']} rows")


def _add_sentencepiece_style(writer, gguf, base: BaseModel) -> set[str]:
    """Llama-2 / Mistral / Gemma style tokenizers (BPE with byte fallback, spaces as "▁") as
    llama.cpp's "llama" (sentencepiece) vocabulary: tokens by id, scores, types.

    Own code rather than gguf-py's LlamaHfVocab, which writes a placeholder score (-1000) for
    every token and types every added token by specialness only: llama.cpp's sentencepiece
    tokenizer merges by score, and matches user-defined tokens (Gemma's runs of spaces, "\n")
    whole in the raw text, so both must be right for its ids to equal the HF tokenizer's.
    Scores come from the merges: a piece made by the merge of rank r scores -r, so llama.cpp's
    "highest-scoring adjacent pair first" picks the merges in the HF tokenizer's order."""
    path = base.local_dir / "tokenizer.json"
    tok_json = json.loads(path.read_text())
    model = tok_json["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in tok_json.get("added_tokens", [])}
    for text, t in added.items():
        vocab.setdefault(text, t["id"])
    n_tokens = max(vocab.values()) + 1
    _check_vocab(base, n_tokens)
    n = max(n_tokens, base.dims["vocab_size"])
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores, types = [-1e9] * n, [gguf.TokenType.UNUSED] * n
    for text, i in vocab.items():
        tokens[i], types[i] = text.encode("utf-8"), gguf.TokenType.NORMAL
    for rank, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        i = vocab.get(left + right)
        if i is not None and scores[i] == -1e9:
            scores[i] = -float(rank)
    for text, i in vocab.items():
        t = added.get(text)
        if t is not None:
            types[i], scores[i] = (gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED), -1000.0
        elif text == model.get("unk_token"):
            types[i] = gguf.TokenType.UNKNOWN
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types[i] = gguf.TokenType.BYTE
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    if not _prepends_space(tok_json):  # Gemma: no dummy prefix (llama.cpp's default adds one)
        writer.add_add_space_prefix(False)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(base.local_dir, load_merges=False, n_vocab=n)
    if special.chat_template is None and (base.local_dir / "chat_template.jinja").is_file():
        special.chat_template = (base.local_dir / "chat_template.jinja").read_text()
    special.add_to_gguf(writer, quiet=True)
    return set(vocab)
