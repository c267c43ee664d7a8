"""Upper bounds on what edgepeft reads from files it did not write itself (bundles that came over
the network, PEFT directories from anywhere). Each is far above any real model or adapter and
stops a hostile or corrupt file from making a reader allocate, loop or recurse without bound.
docs/security.md lists them; one place, so a reader and its test agree."""

from .errors import AdapterError

MAX_MANIFEST_BYTES = 16 << 20  # edgepeft.json, adapter_config.json, tokenizer_config.json
MAX_MANIFEST_FILES = 10_000  # entries in the manifest's "files"
MAX_ADAPTERS = 4_096  # adapters in one bundle
MAX_ADAPTER_FILE_BYTES = 4 << 30  # an adapter file (safetensors, .onnx_adapter, .gguf)
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors crate's own limit
MAX_TENSORS = 65_536  # tensors in one adapter file
MAX_TENSOR_DIMS = 8  # dimensions of one tensor
MAX_RANK = 4_096  # LoRA rank of one module


def check_adapter_limits(spec):
    """Return `spec`, or refuse it when beyond the limits above (any module's rank, module count)."""
    if len(spec.modules) + len(spec.biases) > MAX_TENSORS:
        raise AdapterError(f"{spec.path}: more than {MAX_TENSORS} adapted modules")
    for name, module in spec.modules.items():
        if module.rank > MAX_RANK:
            raise AdapterError(f"{spec.path}: module {name[:80]} has rank {module.rank}, over the limit of {MAX_RANK}")
    return spec
