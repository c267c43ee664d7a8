"""Tokenizers for the `builtin:` bases, repaired from what transformers' GGUF converter builds.

transformers reads a GGUF's vocabulary and wraps it in a `tokenizers` pipeline of its own guess.
For both built-in bases that guess is wrong in ways that change token ids, so each builtin has a
function here that returns a correct PreTrainedTokenizerFast (chat template included) for its
GGUF file; exporters/builtin.py saves it next to the dequantized weights.
"""

from __future__ import annotations

from pathlib import Path

# The Gemma 3 chat template (the one Google ships in the instruction-tuned checkpoints'
# tokenizer_config.json, text parts only). Used when the GGUF has no tokenizer.chat_template, as
# the gemma-3-270m GGUF (converted from the pretrained checkpoint) has none.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\\n' }}
{%- endif -%}
"""

# gguf token types (gguf.TokenType): NORMAL pieces carry BPE scores; CONTROL tokens are special
# (<bos>, <start_of_turn>, <unusedN>...); USER_DEFINED ones ("\n", "\n\n", runs of spaces and tabs,
# "[multimodal]") are always matched whole in the raw text; BYTE tokens are <0xNN> fallbacks.
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4


def smollm2(gguf: Path):
    """SmolLM2: the GGUF keeps the original vocabulary and merges, but transformers' GGUF converter
    builds a Llama-style pipeline around them: it prepends <|im_start|> (id 1) as BOS to every
    encode, decodes through a sentencepiece-style chain, and names <|im_start|> as EOS. The original
    adds no BOS, splits digits one by one before byte-level BPE, and ends turns with <|im_end|>."""
    import transformers
    from tokenizers import decoders, pre_tokenizers, processors

    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok.backend_tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>", unk_token="<|endoftext|>", model_max_length=8192,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    backend = fast.backend_tokenizer
    # The original's byte-level BPE model: every byte is in the vocabulary, no unknown token
    # (transformers 4.x's converter sets sentencepiece-style fields, 5.x empty affixes).
    model = backend.model
    model.unk_token, model.byte_fallback, model.fuse_unk = None, False, False
    model.continuing_subword_prefix, model.end_of_word_suffix = None, None
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    backend.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    backend.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    backend.normalizer = None
    fast.chat_template = tok.chat_template
    return fast


def gemma3(gguf: Path):
    """Gemma 3: a sentencepiece BPE vocabulary (scores, byte fallback, no dummy prefix, spaces
    written as "▁"), rebuilt as the `tokenizers` BPE pipeline that Google's own tokenizer.json uses.

    transformers' GGUF converter (GGUFGemmaConverter) builds a *Unigram* model over the GGUF
    scores. Gemma's scores are BPE merge priorities (minus the piece id), not log-probabilities,
    so Viterbi picks many short pieces: "The capital of France is" becomes 11 ids instead of
    llama.cpp's 6. It also turns the <0x09> byte token into a second tab piece and rewrites the
    user-defined runs of spaces as "▁" pieces inside the model, where llama.cpp and sentencepiece
    match user-defined tokens whole in the raw text.

    Here: BPE merges derived from the scores with transformers' own generate_merges (what its
    GemmaConverter does for tokenizer.model files: a pair merges if both halves and their
    concatenation are pieces, ranked by the concatenation's score), byte fallback, Replace(" ",
    "▁") as the only normalization, control tokens as special added tokens, user-defined tokens
    as non-normalized added tokens, and <bos> prepended by the post-processor. This equals
    llama.cpp's tokenization of the same file (tests/integration/test_gemma3_tokenizer.py)."""
    import transformers
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import generate_merges

    fields = GGUFReader(gguf).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    scores = fields["tokenizer.ggml.scores"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    if fields["tokenizer.ggml.model"].contents() != "llama" or len(set(tokens)) != len(tokens):
        from edgepeft.errors import UnsupportedModel
        raise UnsupportedModel(f"{gguf}: not a sentencepiece vocabulary with unique pieces")
    template = fields["tokenizer.chat_template"].contents() if "tokenizer.chat_template" in fields else None

    def token(key: str) -> str:
        return tokens[fields[f"tokenizer.ggml.{key}_token_id"].contents()]

    bos, eos, pad, unk = token("bos"), token("eos"), token("padding"), token("unknown")
    vocab = {piece: i for i, piece in enumerate(tokens)}
    merges = generate_merges(vocab, [(p, s) for p, s, t in zip(tokens, scores, types) if t == _NORMAL])
    backend = Tokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True, dropout=None))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens([AddedToken(p, normalized=False, special=True)
                                for p, t in zip(tokens, types) if t == _CONTROL])
    backend.add_tokens([AddedToken(p, normalized=False, special=False)
                        for p, t in zip(tokens, types) if t == _USER_DEFINED])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
        model_max_length=int(fields[f"{fields['general.architecture'].contents()}.context_length"].contents()),
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    fast.chat_template = template or GEMMA3_CHAT_TEMPLATE
    return fast
