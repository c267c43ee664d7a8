"""A base whose weights stay in its checkpoint until a step needs them.

The export's model is a float32 skeleton whose parameters sit on torch's meta device (no memory;
buffers such as rotary frequencies are real, computed as a float32 model computes them). A step
that needs weights asks for one module, or one tensor, at a time: `materialized(base, modules)`
reads their parameters from the safetensors files (memory-mapped by the safetensors library),
upcast to float32 (exact from bf16/fp16), and puts the meta parameters back after, so that one
decoder layer at a time is in memory. `float32_compute(base)` does the same around each module's
forward, so that running the model (calibration, prompt tuning's virtual tokens) holds one
module's weights at a time and computes exactly what the float32 model computes.
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


def checkpoint_name(tensors: CheckpointTensors, name: str, tied: bool) -> str:
    """The checkpoint's name for model tensor `name`: itself, or the embedding for a tied head."""
    if name in tensors:
        return name
    if name == HEAD and tied and EMBEDDING in tensors:
        return EMBEDDING
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
    tied = base.dims["tie_word_embeddings"]
    for name, p in saved.items():
        if p is not None:
            full = f"{path}.{name}" if path else name
            value = base.tensors.get(checkpoint_name(base.tensors, full, tied)).float()
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
