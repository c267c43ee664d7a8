"""Checks of GGUF files before llama.cpp opens them, with a pure-Python header reader: a file
that came over the network is parsed by Python first, so a corrupt or hostile one gets a one-line
error instead of reaching llama.cpp's C++ parser. Value types, keys, magic and versions are
gguf-py's (gguf.constants); the layout they describe is walked here.

Base: the header, then architecture, layer count and widths against the manifest. Adapter: a LoRA
adapter for this base's architecture and fingerprint (recorded at export), every tensor a
lora_a/lora_b pair of a base tensor with matching widths, rank within edgepeft.limits.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from edgepeft.bundle import GGUF_FINGERPRINT_KEY
from edgepeft.errors import AdapterError, AdapterMismatch, BundleError, require
from edgepeft.limits import MAX_RANK, MAX_TENSORS

require("gguf", "gguf")  # MissingExtra, one line naming the extra, on every path that reaches here
from gguf.constants import (  # noqa: E402
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    MODEL_TENSOR,
    TENSOR_NAMES,
    GGMLQuantizationType,
    GGUFType,
    GGUFValueType,
    Keys,
)
from gguf.gguf_reader import READER_SUPPORTED_VERSIONS  # noqa: E402

_MAX_KV = 1 << 16
_MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
_TOKEN_EMBD = TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD] + ".weight"
_LORA = "lora"  # adapter.type of a LoRA adapter (llama.cpp's convert_lora_to_gguf.py; no gguf-py constant)

# Little-endian layout of each scalar value type (the GGUF spec; gguf-py's own table is internal).
_V = GGUFValueType
_SCALARS = {_V.UINT8: "<B", _V.INT8: "<b", _V.UINT16: "<H", _V.INT16: "<h", _V.UINT32: "<I", _V.INT32: "<i",
            _V.FLOAT32: "<f", _V.BOOL: "<?", _V.UINT64: "<Q", _V.INT64: "<q", _V.FLOAT64: "<d"}
_MAX_STRING = 1 << 20
_MAX_ARRAY = 1 << 24
_PER_LAYER = 1024  # scalar arrays up to this length are read (per-layer values); longer ones skipped


class _Header:
    """A GGUF header walker that keeps scalars and strings and skips array contents.

    Why not gguf-py's GGUFReader: it builds a numpy view per metadata value, one per vocabulary
    string included, which costs more than the whole engine load (docs/experiments.md), and
    bounds no count by the file's size. This walks the same layout with every length bounded by
    the file size, so a hostile file can neither crash nor hang it."""

    def __init__(self, data: bytes | memoryview, size: int):
        self.data, self.size, self.pos = data, size, 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > self.size:
            raise ValueError(f"truncated at byte {self.pos} (wants {n} more)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > _MAX_STRING:
            raise ValueError(f"string of {n} bytes")
        return bytes(self.take(n)).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            etype, n = self.unpack("<I"), self.unpack("<Q")
            if n > _MAX_ARRAY:
                raise ValueError(f"array of {n} values")
            if etype in _SCALARS and n <= _PER_LAYER:  # per-layer values (a hybrid's head_count_kv)
                fmt = _SCALARS[etype]
                return list(struct.unpack(f"{fmt[0]}{n}{fmt[1:]}", self.take(n * struct.calcsize(fmt))))
            if etype in _SCALARS:
                self.take(n * struct.calcsize(_SCALARS[etype]))
            elif etype == GGUFValueType.STRING:
                for _ in range(n):
                    self.take(self.unpack("<Q"))
            else:
                raise ValueError(f"array of value type {etype}")
            return None  # longer arrays (vocabularies, scores) are not checked
        raise ValueError(f"value type {vtype}")


def _read(path: Path, error: type[Exception]):
    """Parse `path`'s header and tensor table; any failure is `error`, one line."""
    import mmap

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(24)
            if len(head) < 24 or struct.unpack("<I", head[:4])[0] != GGUF_MAGIC:
                raise error(f"{path}: not a GGUF file (bad magic or truncated header)")
            version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:])
            if version not in READER_SUPPORTED_VERSIONS or n_tensors > MAX_TENSORS or n_kv > _MAX_KV:
                raise error(f"{path}: GGUF header out of range (version {version}, {n_tensors} tensors, {n_kv} keys)")
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from None
    try:
        with memoryview(data) as view:
            h = _Header(view, size)
            h.pos = 24
            fields = {}
            for _ in range(n_kv):
                key = h.string()
                fields[key] = h.value(h.unpack("<I"))
            infos = []
            for _ in range(n_tensors):
                name, n_dims = h.string(), h.unpack("<I")
                if n_dims > _MAX_DIMS:
                    raise ValueError(f"tensor {name[:40]!r} has {n_dims} dimensions")
                shape = [h.unpack("<Q") for _ in range(n_dims)]
                infos.append((name, shape, GGMLQuantizationType(h.unpack("<I")), h.unpack("<Q")))
            align = fields.get(Keys.General.ALIGNMENT, GGUF_DEFAULT_ALIGNMENT)
            if not isinstance(align, int) or align <= 0 or align & (align - 1):
                raise ValueError(f"alignment {align}")
            start = -(-h.pos // align) * align
            tensors = {}
            for name, shape, qtype, offset in infos:
                block, nbytes = GGML_QUANT_SIZES[qtype]
                count = 1
                for d in shape:
                    count *= d
                if shape and shape[0] % block or start + offset + count // block * nbytes > size:
                    raise ValueError(f"tensor {name[:40]!r} lies outside the file or is misshapen")
                tensors[name] = (shape, qtype)
    except error:
        raise
    except Exception as e:  # ValueError, struct.error, KeyError (unknown quant type)...
        raise error(f"{path}: corrupt GGUF file ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
    finally:
        data.close()
    return fields, tensors


def check_base_gguf(path: Path, base: dict) -> tuple[str, dict[str, list[int]]]:
    """Check the base GGUF against the manifest's base; return its architecture and tensor shapes
    (ggml order)."""
    fields, tensors = _read(path, BundleError)
    arch = fields.get(Keys.General.ARCHITECTURE)
    if not isinstance(arch, str) or fields.get(Keys.General.TYPE, GGUFType.MODEL) != GGUFType.MODEL:
        raise BundleError(f"{path}: not a GGUF model file")
    dims = base["dims"]
    want = {Keys.LLM.BLOCK_COUNT: dims["num_layers"], Keys.LLM.EMBEDDING_LENGTH: dims["hidden_size"],
            Keys.Attention.HEAD_COUNT: dims["num_heads"], Keys.Attention.HEAD_COUNT_KV: dims["num_kv_heads"]}
    want = {key.format(arch=arch): value for key, value in want.items()}
    kv_key = Keys.Attention.HEAD_COUNT_KV.format(arch=arch)
    per_layer = fields.get(kv_key)
    if (isinstance(per_layer, list) and len(per_layer) == dims["num_layers"]
            and set(per_layer) <= {0, dims["num_kv_heads"]} and any(per_layer)):
        del want[kv_key]  # a hybrid's KV heads per layer: 0 for a layer without attention (LFM2's convolutions, Qwen3.5's DeltaNets)
    for key, value in want.items():
        if fields.get(key) != value:
            raise BundleError(f"{path}: {key} is {str(fields.get(key))[:20]}, the manifest says {value} "
                              "(a GGUF of another model?)")
    embd = tensors.get(_TOKEN_EMBD)
    if embd is None or embd[0] != [dims["hidden_size"], dims["vocab_size"]]:
        raise BundleError(f"{path}: {_TOKEN_EMBD} does not match the manifest's hidden size and vocabulary")
    return arch, {name: shape for name, (shape, _) in tensors.items()}


def check_adapter_gguf(path: Path, arch: str, fingerprint: str, base_shapes: dict[str, list[int]]) -> None:
    """Refuse, before llama.cpp reads it, an adapter file that is not a LoRA for this base."""
    fields, tensors = _read(path, AdapterError)
    if fields.get(Keys.General.TYPE) != GGUFType.ADAPTER or fields.get(Keys.Adapter.TYPE) != _LORA:
        raise AdapterError(f"{path}: not a GGUF LoRA adapter")
    if fields.get(Keys.General.ARCHITECTURE) != arch:
        raise AdapterMismatch(f"{path}: adapter for architecture {str(fields.get(Keys.General.ARCHITECTURE))[:30]}, "
                              f"the base is {arch}")
    recorded = fields.get(GGUF_FINGERPRINT_KEY)
    if recorded is not None and recorded != fingerprint:  # files from before the key have none
        raise AdapterMismatch(f"{path}: exported for another base model (fingerprint differs)")
    if not tensors:
        raise AdapterError(f"{path}: a GGUF LoRA adapter with no tensors")
    for name, (shape, dtype) in tensors.items():
        target, _, part = name.rpartition(".")
        if part not in ("lora_a", "lora_b") or dtype not in _FLOAT_TYPES or len(shape) != 2:
            raise AdapterError(f"{path}: unexpected tensor {name[:80]!r} ({dtype.name}{shape}) in a LoRA adapter")
        other = f"{target}.{'lora_b' if part == 'lora_a' else 'lora_a'}"
        if other not in tensors:
            raise AdapterError(f"{path}: tensor {name[:80]!r} has no {other.rpartition('.')[2]}")
        base = base_shapes.get(target)
        if base is None or len(base) != 2:
            raise AdapterMismatch(f"{path}: {target[:80]} is not a matrix of this base (adapter for another base?)")
        a, b = (shape, tensors[other][0]) if part == "lora_a" else (tensors[other][0], shape)
        # ggml order: base [in, out], lora_a [in, r], lora_b [r, out]
        if a[0] != base[0] or b[1] != base[1] or a[1] != b[0]:
            raise AdapterMismatch(f"{path}: {target[:80]} is lora_a{a} lora_b{b}, the base's is {base} "
                                  "(adapter for another base?)")
        if a[1] > MAX_RANK:
            raise AdapterError(f"{path}: {target[:80]} has rank {a[1]}, over the limit of {MAX_RANK}")
