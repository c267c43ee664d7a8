"""Tokenization with the `tokenizers` package and chat templates with jinja2 (no transformers)."""

from __future__ import annotations

from pathlib import Path

from edgepeft.errors import BundleError
from edgepeft.files import read_json_object

# End-of-turn tokens of common chat formats; generation stops on them with --chat.
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>")


class Tokenizer:
    """The bundle's tokenizer.json plus its chat template and stop tokens."""

    def __init__(self, root: Path, manifest_section: dict):
        from tokenizers import Tokenizer as HFTokenizer

        path = root / "tokenizer.json"
        self.tok = None  # a bundle exported from a base without tokenizer scores ids only
        if "tokenizer.json" in (manifest_section.get("files") or []):
            try:
                self.tok = HFTokenizer.from_file(str(path))
            except Exception as e:  # tokenizers raises plain Exception subclasses
                raise BundleError(f"{path}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
        cfg_path = root / "tokenizer_config.json"
        self.config = read_json_object(cfg_path, BundleError, "tokenizer config") if cfg_path.is_file() else {}
        # Newer transformers save the template beside the config (chat_template.jinja).
        if (root / CHAT_TEMPLATE_FILE).is_file():
            self.config["chat_template"] = (root / CHAT_TEMPLATE_FILE).read_text()
        self.eos_ids = set(manifest_section.get("eos_token_ids") or [])
        self.chat_end_ids = {i for t in CHAT_END_TOKENS if self.tok and (i := self.tok.token_to_id(t)) is not None}
        self._template = None

    def _special(self, key: str) -> str:
        v = self.config.get(key)
        return v.get("content", "") if isinstance(v, dict) else (v or "")

    def _require(self):
        if self.tok is None:
            raise BundleError("this bundle has no tokenizer (its base had no tokenizer.json): use score() with token ids")
        return self.tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._require().encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._require().decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """Render the model's chat template (as transformers does) and tokenize the result."""
        template = self.config.get("chat_template")
        if not template:
            raise BundleError("this bundle's tokenizer has no chat template; run without --chat")
        if self._template is None:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg):
                raise jinja2.exceptions.TemplateError(msg)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(template)
        text = self._template.render(messages=messages, add_generation_prompt=True,
                                     bos_token=self._special("bos_token"),
                                     eos_token=self._special("eos_token"))
        # transformers tokenizes rendered chat text without adding special tokens again.
        return self.encode(text, add_special_tokens=False)

    def stop_ids(self, chat: bool) -> set[int]:
        return self.eos_ids | (self.chat_end_ids if chat else set())


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces, holding back incomplete UTF-8.

    Each push decodes only the tokens not yet emitted, after the last emitted piece's tokens for
    context (a decoder treats the first token of a text specially, e.g. its leading space), as
    Hugging Face's text-generation-inference does: decoding the whole output at every token
    would cost time quadratic in its length."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids = tokenizer, []
        self.prefix = self.read = 0  # ids[prefix:read]: the last emitted piece; ids[read:]: not emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._delta(final=False)

    def flush(self) -> str:
        """What is still held back when generation ends (an incomplete character stays as \ufffd)."""
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix: self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]
