"""Load a Hugging Face base model and describe it in the manifest's neutral terms."""

from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edgepeft.errors import UnsupportedModel, require

from .archs import VLM_TEXT, Arch, Layout, arch_of, layout
from .checkpoint import CheckpointTensors, check_names, checkpoint_name, skeleton

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


@dataclass
class BaseModel:
    """A loaded base: the torch model (eval), its config and the manifest facts.

    With `tensors` (the export's default), the model is a skeleton whose weights stay in the
    checkpoint: read them with tensor(), stored(), param(), checkpoint.materialized() or, to run
    the model, checkpoint.float32_compute(). Without, the model holds its float32 weights.
    `merged` (exporters/merge.py): an adapter baked into the weights it changes as they are read.
    """

    source: str
    local_dir: Path
    model: object
    config: object
    dims: dict
    fingerprint: str
    tensors: CheckpointTensors | None = None
    merged: object = None

    def tensor_names(self) -> list[str]:
        """The model's weight names (state_dict order; a tied head listed too)."""
        return list(self.model.state_dict().keys())

    def tensor(self, name: str):
        """Model weight `name` as a float32 torch tensor, read from the checkpoint if it is there."""
        return self.stored(name).float()

    def stored(self, name: str):
        """Model weight `name` as a torch tensor in the dtype it is kept in: the checkpoint's (bf16,
        fp16, ...) for a base whose weights stay there, else the model's."""
        if self.tensors is None:
            return self.model.state_dict()[name].detach()
        ckpt = checkpoint_name(self.tensors, name, self.dims["tie_word_embeddings"])
        if self.merged is not None and ckpt in self.merged:
            return self.merged.read(ckpt)  # float32, as a whole-model merge makes it
        return self.tensors.get(ckpt)

    def stored_rows(self, name: str, rows: int):
        """Model weight `name` as stored() gives it, in blocks of `rows` rows; from the checkpoint
        each block is read alone, so the whole tensor is never in memory (nor its mapped pages)."""
        if self.tensors is None or (self.merged is not None and
                                    checkpoint_name(self.tensors, name, self.dims["tie_word_embeddings"]) in self.merged):
            whole = self.stored(name)
            yield from (whole[r:r + rows] for r in range(0, whole.shape[0], rows))
            return
        ckpt = checkpoint_name(self.tensors, name, self.dims["tie_word_embeddings"])
        for r in range(0, self.tensors.shapes[ckpt][0], rows):
            yield self.tensors.rows(ckpt, r, r + rows)

    def stored_dtype(self, name: str) -> str:
        """The dtype stored() returns for `name`, in safetensors' spelling (BF16, F16, F32, ...),
        from the checkpoint's header: no weight is read."""
        if self.tensors is None:
            dtype = str(self.model.state_dict()[name].dtype).removeprefix("torch.")
            return {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}.get(dtype, dtype)
        ckpt = checkpoint_name(self.tensors, name, self.dims["tie_word_embeddings"])
        return "F32" if self.merged is not None and ckpt in self.merged else self.tensors.dtypes[ckpt]

    def param(self, module: str, name: str):
        """Parameter `name` of submodule `module` as float32 numpy, or None if it has none."""
        if getattr(self.model.get_submodule(module), name, None) is None:
            return None
        return self.tensor(f"{module}.{name}" if module else name).numpy()

    @property
    def arch(self) -> Arch:
        """The family's description (exporters/archs)."""
        return arch_of(self.config.model_type, self.local_dir)

    @property
    def layout(self) -> Layout:
        """What this base's config makes of its family's description (per-layer windows, ...)."""
        return layout(self.arch, self.config, self.dims)

    def linear_shapes(self) -> dict[str, list[int]]:
        """[in_features, out_features] of every slot-able linear layer, by short name, in the
        family's group order (the checkpoint's own layers: q_proj, ... or Phi-3's qkv_proj)."""
        layers, shapes = self.model.model.layers, {}
        for group in self.arch.groups:
            # the first layer that has the group's module (a hybrid's layers differ in kind)
            parent = next(getattr(layer, group.parent) for layer in layers if hasattr(layer, group.parent))
            for member in group.members:
                m = getattr(parent, member)
                shapes[member] = [int(m.in_features), int(m.out_features)]
        return shapes


def resolve_base_dir(source: str) -> Path:
    """A local HF directory, or a `builtin:` name materialised into the cache."""
    if source.startswith("builtin:"):
        from .builtin import materialize

        return materialize(source)
    path = Path(source)
    if not (path / "config.json").is_file():
        raise UnsupportedModel(f"{source}: not a Hugging Face model directory (no config.json)")
    return path


def _dims(config) -> dict:
    heads = config.num_attention_heads
    arch = arch_of(config.model_type)
    # A family whose layers differ in head size (Layout.heads): the first layer's, which
    # transformers gives through per_layer_config (it guards the config's own value).
    own = config.per_layer_config[0] if arch.per_layer_heads else config
    head_dim = getattr(own, "head_dim", None) or config.hidden_size // heads
    window = getattr(config, "sliding_window", None)
    flag = arch.sliding_window_flag
    if flag is not None and not getattr(config, flag, False):
        window = None
    blocks = {k: v for _, block in arch.mixers for k, v in block.manifest_dims(config).items()}
    return {
        "hidden_size": config.hidden_size,
        "num_layers": config.num_hidden_layers,
        "num_heads": heads,
        "num_kv_heads": getattr(own, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
        "intermediate_size": arch.mlp_size(config) if arch.mlp_size else config.intermediate_size,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": float(getattr(config, arch.norm_eps_field)),
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "max_position_embeddings": int(getattr(config, "max_position_embeddings", 2048)),
        "sliding_window": int(window) if window else None,
        **blocks,  # a hybrid's mixer blocks' own sizes (DeltaNet: linear_heads)
    }


def fingerprint_state_dict(state_dict) -> str:
    """sha256 over every weight (name, shape, float32 bytes) in name order: the base's identity.
    The same weights give the same fingerprint whatever file format they came from."""
    return fingerprint_tensors(state_dict, lambda name: state_dict[name])


def fingerprint_tensors(names, read) -> str:
    """fingerprint_state_dict over tensors read one at a time by `read(name)`."""
    import numpy as np

    h = hashlib.sha256()
    for name in sorted(names):
        t = read(name).detach().float().cpu().contiguous().numpy()
        h.update(name.encode() + b"\0" + str(list(t.shape)).encode() + b"\0")
        h.update(memoryview(np.ascontiguousarray(t)))  # its bytes, without a copy of them
        del t
    return "sha256:" + h.hexdigest()


def read_config(local: Path):
    """The base's transformers config, checked against the architecture table (one line if the
    family or one of its options is not supported). Cheap: no weights are read."""
    transformers = require("transformers", "export")
    try:
        config = transformers.AutoConfig.from_pretrained(local, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UnsupportedModel(f"{local}/config.json: cannot be read ({str(e).splitlines()[0]})") from None
    config = text_config(config, local)
    arch = arch_of(config.model_type, local)
    for field, want, what in arch.refused:
        if getattr(config, field, want) != want:
            raise UnsupportedModel(f"{local}/config.json: {field}={getattr(config, field)!r} ({what}) is not "
                                   "supported yet")
    if getattr(config, "mlp_bias", False):
        raise UnsupportedModel(f"{local}: mlp_bias=True is not supported yet")
    return config


def text_config(config, local):
    """A vision-language checkpoint's text config (VLM_TEXT), which the exporters export (its
    text weights under model.language_model., checkpoint.CheckpointTensors; the vision tower is
    left out); any other config as it is. The head's tie is the outer config's, as the VLM ties."""
    text_type = VLM_TEXT.get(config.model_type)
    if text_type is None:
        return config
    inner = getattr(config, "text_config", None)
    if getattr(inner, "model_type", None) != text_type:
        raise UnsupportedModel(f"{local}/config.json: a {config.model_type} config without its {text_type} "
                               "text_config")
    inner.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
    return inner


def config_layout(config) -> tuple[dict, Layout]:
    """The manifest dims of `config` and what its family makes of it."""
    dims = _dims(config)
    return dims, layout(arch_of(config.model_type), config, dims)


def reference_kwargs(config) -> dict:
    """from_pretrained arguments that load the model as it was designed: transformers' default
    sdpa attention silently drops Gemma 2's attention soft-cap (only its eager attention applies
    it, as llama.cpp and onnxruntime's GroupQueryAttention do)."""
    return {"attn_implementation": "eager"} if getattr(config, "attn_logit_softcapping", None) else {}


@contextmanager
def quiet_loading():
    """transformers' own progress bars off while we load (5.x draws one per checkpoint): the
    export's progress says where it stands."""
    hf_logging = require("transformers", "export").utils.logging
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_base(source: str, lazy: bool = True) -> BaseModel:
    """Load `source` (local HF dir or builtin:NAME) for export: with `lazy`, a float32 skeleton
    whose weights stay in the checkpoint until a step reads them (exporters/checkpoint.py); else
    the whole model in float32 (what the tests compare the lazy base against)."""
    torch = require("torch", "export")
    transformers = require("transformers", "export")
    local = resolve_base_dir(source)
    config = read_config(local)
    dims = _dims(config)
    if lazy:
        tensors = CheckpointTensors(local)
        model = skeleton(config, transformers, torch, **reference_kwargs(config))
        check_names(model, tensors, dims["tie_word_embeddings"])
        base = BaseModel(source=source, local_dir=local, model=model, config=config, dims=dims, fingerprint="",
                         tensors=tensors)
        base.fingerprint = fingerprint_tensors(base.tensor_names(), base.tensor)
        return base
    try:
        # use_safetensors: a base with only pickled weights (pytorch_model.bin) is refused, not unpickled.
        with quiet_loading():
            model = transformers.AutoModelForCausalLM.from_pretrained(
                local, config=config, dtype=torch.float32, local_files_only=True, use_safetensors=True,
                **reference_kwargs(config)).eval()
    except OSError as e:
        raise UnsupportedModel(f"{local}: cannot load its weights; edgepeft reads safetensors only, not "
                               f"pickled .bin files ({str(e).splitlines()[0][:160]})") from None
    return BaseModel(source=source, local_dir=local, model=model, config=config,
                     dims=dims, fingerprint=fingerprint_state_dict(model.state_dict()))


def copy_tokenizer(base: BaseModel, dest: Path) -> dict:
    """Copy the tokenizer files into the bundle; return the manifest's tokenizer section."""
    copied = []
    for name in TOKENIZER_FILES:
        src = base.local_dir / name
        if src.is_file():
            shutil.copyfile(src, dest / name)
            copied.append(name)
    tok_cfg = json.loads((base.local_dir / "tokenizer_config.json").read_text()) \
        if (base.local_dir / "tokenizer_config.json").is_file() else {}
    gen_cfg = json.loads((base.local_dir / "generation_config.json").read_text()) \
        if (base.local_dir / "generation_config.json").is_file() else {}
    # A base without tokenizer.json (e.g. a bare test checkpoint) still exports: the bundle then
    # scores token ids but cannot encode text.
    tok_json = json.loads((base.local_dir / "tokenizer.json").read_text()) \
        if (base.local_dir / "tokenizer.json").is_file() else {}
    vocab = tok_json.get("model", {}).get("vocab", {})
    added = {t["content"]: t["id"] for t in tok_json.get("added_tokens", [])}

    def token_id(tok):
        if isinstance(tok, dict):
            tok = tok.get("content")
        if tok is None:
            return None
        return added.get(tok, vocab.get(tok) if isinstance(vocab, dict) else None)

    eos = gen_cfg.get("eos_token_id", base.config.eos_token_id)
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if token_id(tok_cfg.get("eos_token")) is not None:
        eos_ids.add(token_id(tok_cfg.get("eos_token")))
    return {
        "files": copied,
        "bos_token_id": token_id(tok_cfg.get("bos_token")),
        "eos_token_ids": sorted(i for i in eos_ids if i is not None),
        "pad_token_id": token_id(tok_cfg.get("pad_token")),
        "chat_template": bool(tok_cfg.get("chat_template")) or "chat_template.jinja" in copied,
    }
