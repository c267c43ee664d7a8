"""A base whose weights stay in its checkpoint until a step needs them.

The export's model is a float32 skeleton whose parameters sit on torch's meta device (no memory;
buffers such as rotary frequencies are real, computed as a float32 model computes them). A step
that needs weights asks for one module, or one tensor, at a time: `materialized(base, modules)`
reads their parameters from the safetensors files (memory-mapped by the safetensors library),
upcast to float32 (exact from bf16/fp16), and puts the meta parameters back after, so that one
decoder layer at a time is in memory. `float32_compute(base)` does the same around each module's
forward, so that running the model (prompt tuning's virtual tokens) holds one module's weights at
a time and computes exactly what the float32 model computes; calibration runs it a layer at a
time over all its texts (layerwise.py).

`stored_model` and `float32_layers` are verify's reference: the weights in memory in their stored
dtype, upcast one decoder layer at a time for its forward.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path

from edgepeft.errors import UnsupportedModel, require

HEAD, EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"
# A vision-language checkpoint's text weights (Qwen3.5's): read under the text model's names.
TEXT_PREFIX, TEXT_MODEL = "model.language_model.", "model."


class CheckpointTensors:
    """The checkpoint's tensors by name, read one at a time (safetensors' safe_open, torch).

    Each read opens its file anew: a tensor is a view of the library's memory map, whose touched
    pages stay resident (and count in RSS) while the map is open, so a map held for the whole
    export would bring the whole checkpoint back into memory. A read's map closes with its tensor.
    A vision-language checkpoint's `model.language_model.X` is read as the text model's `model.X`."""

    def __init__(self, local: Path):
        self.local, self.where, self.shapes, self.dtypes, self.stored_as = local, {}, {}, {}, {}
        for path in sorted(local.glob("*.safetensors")):
            with self._open(path) as handle:
                for stored in handle.keys():
                    name = TEXT_MODEL + stored[len(TEXT_PREFIX):] if stored.startswith(TEXT_PREFIX) else stored
                    self.where[name], self.stored_as[name] = path, stored
                    self.shapes[name] = tuple(handle.get_slice(stored).get_shape())
                    self.dtypes[name] = handle.get_slice(stored).get_dtype()  # safetensors' spelling: BF16, F32, ...
        if not self.where:
            raise UnsupportedModel(f"{local}: no .safetensors weights (edgepeft reads safetensors only, "
                                   "not pickled .bin files)")

    @staticmethod
    def _open(path: Path):
        safetensors = require("safetensors", "export")
        try:
            return safetensors.safe_open(str(path), framework="pt")
        except Exception as e:  # the library's refusal of a damaged file, as one line
            raise UnsupportedModel(f"{path}: cannot be read as safetensors ({str(e).splitlines()[0][:160]})") from None

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str):
        """Tensor `name` in its stored dtype."""
        with self._open(self.where[name]) as handle:
            return handle.get_tensor(self.stored_as[name])

    def rows(self, name: str, start: int, stop: int):
        """Rows start:stop of tensor `name` in its stored dtype (a slice: the rest is not read)."""
        with self._open(self.where[name]) as handle:
            return handle.get_slice(self.stored_as[name])[start:stop]

    def equal(self, a: str, b: str, rows: int = 4096) -> bool:
        """Whether tensors a and b hold the same values, read a block of rows at a time."""
        if a == b:
            return True
        if self.shapes[a] != self.shapes[b]:
            return False
        return all(self.rows(a, r, r + rows).equal(self.rows(b, r, r + rows))
                   for r in range(0, self.shapes[a][0] if self.shapes[a] else 1, rows))


def checkpoint_name(tensors: CheckpointTensors, name: str, tied: bool) -> str:
    """The checkpoint's name for model tensor `name`: itself, or the embedding for a tied head (as
    transformers ties them, even where the checkpoint stores a head too)."""
    if name == HEAD and tied and EMBEDDING in tensors:
        return EMBEDDING
    if name in tensors:
        return name
    raise UnsupportedModel(f"{tensors.local}: the checkpoint has no tensor {name} (a checkpoint of another "
                           "model class, or renamed weights)")


def skeleton(config, transformers, torch, **kwargs):
    """The model of `config` in float32 with its parameters on the meta device and real buffers."""
    accelerate = require("accelerate", "export")
    with accelerate.init_empty_weights(include_buffers=False):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kwargs)
    return model.eval()


def check_names(model, tensors: CheckpointTensors, tied: bool) -> None:
    """Every parameter of `model` has a tensor of its shape in the checkpoint (one line if not)."""
    for name, p in model.named_parameters(remove_duplicate=False):
        ckpt = checkpoint_name(tensors, name, tied)
        shape = tensors.shapes[ckpt]
        if shape != tuple(p.shape):
            raise UnsupportedModel(f"{tensors.local}: tensor {ckpt} has shape {list(shape)}, the config "
                                   f"makes {list(p.shape)}")


def _module_paths(model) -> dict[int, str]:
    paths = getattr(model, "_edgepeft_paths", None)
    if paths is None:
        paths = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
        model._edgepeft_paths = paths
    return paths


@contextmanager
def _own_params(base, module):
    """`module`'s own parameters read from the checkpoint in float32 for the duration."""
    torch = require("torch", "export")
    path = _module_paths(base.model)[id(module)]
    saved = dict(module._parameters)
    for name, p in saved.items():
        if p is not None:
            full = f"{path}.{name}" if path else name
            value = base.stored(full).float()
            module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    try:
        yield
    finally:
        module._parameters.update(saved)


@contextmanager
def materialized(base, *modules):
    """The parameters of `modules` and everything below them in memory (float32) for the duration;
    nothing to do for a base loaded whole."""
    if base.tensors is None:
        yield
        return
    with ExitStack() as stack:
        for top in modules:
            for m in top.modules():
                if next(iter(m._parameters.values()), None) is not None:
                    stack.enter_context(_own_params(base, m))
        yield


@contextmanager
def float32_compute(base):
    """Run base.model with each module's own parameters read in float32 right before its forward
    and dropped after: one module's weights in memory at a time. Nothing to do for a base loaded
    whole in float32. A module whose weights its parent reads without calling it (LFM2's
    depthwise convolution, see _read_directly) is read around the parent's forward instead."""
    if base.tensors is None:
        yield base.model
        return
    hooks, open_ = [], {}

    def enter(key, module):
        open_[key] = _own_params(base, module)
        open_[key].__enter__()

    def leave(key):
        open_.pop(key).__exit__(None, None, None)

    for module in base.model.modules():
        if next(iter(module._parameters.values()), None) is not None:
            hooks += [module.register_forward_pre_hook(lambda m, _args: enter(id(m), m)),
                      module.register_forward_hook(lambda m, _args, _out: leave(id(m)))]
    for parent, child in _read_directly(base):
        key = ("read by parent", id(child))  # nests with the child's own hooks, should it be called
        hooks += [parent.register_forward_pre_hook(lambda _m, _args, k=key, c=child: enter(k, c)),
                  parent.register_forward_hook(lambda _m, _args, _out, k=key: leave(k))]
    try:
        yield base.model
    finally:
        for h in hooks:
            h.remove()
        for ctx in open_.values():  # a forward that raised
            ctx.__exit__(None, None, None)


def _read_directly(base) -> list:
    """(block, submodule) of every decoder layer's mixer block whose forward reads a submodule's
    weights without calling it (ShortConv.direct: transformers' Lfm2ShortConv hands its Conv1d
    to a function that reads conv.weight), so that no forward hook of the submodule fires."""
    pairs = []
    for _, block in base.arch.mixers:
        for layer in base.model.model.layers:
            parent = getattr(layer, block.parent, None)
            if parent is not None:
                pairs += [(parent, getattr(parent, name)) for name in block.direct]
    return pairs


def stored_model(local: Path, config, **kwargs):
    """The model of `config` with its weights from the checkpoint at `local` in their stored dtype
    (bf16 for a bf16 checkpoint: half of float32's memory) and its buffers as a float32 model
    computes them (rotary frequencies, Gemma's embedding scale). Run it under float32_layers()
    to compute what the float32 model computes."""
    torch = require("torch", "export")
    transformers = require("transformers", "export")
    model = skeleton(config, transformers, torch, **kwargs)
    tensors = CheckpointTensors(local)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    check_names(model, tensors, tied)
    read: dict[int, object] = {}  # a tied head shares the embedding's tensor, as in the model
    for path, module in model.named_modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in read:
                    full = f"{path}.{name}" if path else name
                    read[id(p)] = torch.nn.Parameter(tensors.get(checkpoint_name(tensors, full, tied)),
                                                     requires_grad=False)
                module._parameters[name] = read[id(p)]
    return model


def _units(model) -> list:
    """The pieces float32_layers upcasts one at a time: each decoder layer, and each module of the
    model outside them (embedding, final norm, head)."""
    inner = model.model
    return ([m for name, m in inner.named_children() if name != "layers"] + list(inner.layers)
            + [m for m in model.children() if m is not inner])


@contextmanager
def float32_layers(model):
    """Run `model` (a transformers causal LM, adapters injected or not) with the parameters of one
    decoder layer (or embedding, norm, head) at a time upcast to float32 for its forward: a model
    kept in bf16 computes what its float32 copy computes (bf16 to float32 is exact), holding one
    layer in float32 at a time. A piece's forward upcasts everything below it, adapter wrappers
    included, so code that reads a base weight outside that weight's own module (DoRA's norm)
    reads it in float32 too."""
    torch = require("torch", "export")
    saved: dict[int, list] = {}

    def before(unit, _args):
        saved[id(unit)] = []
        for m in unit.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and p.is_floating_point() and p.dtype != torch.float32:
                    saved[id(unit)].append((m, name, p))
                    m._parameters[name] = torch.nn.Parameter(p.float(), requires_grad=False)

    def restore(key):
        for m, name, p in saved.pop(key, []):
            m._parameters[name] = p

    hooks = []
    for unit in _units(model):
        hooks += [unit.register_forward_pre_hook(before),
                  unit.register_forward_hook(lambda u, _args, _out: restore(id(u)))]
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()
        for key in list(saved):  # a forward that raised
            restore(key)
