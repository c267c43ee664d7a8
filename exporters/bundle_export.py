"""`export` and `add-adapter`: write a bundle (base + adapters) atomically."""

from __future__ import annotations

from pathlib import Path

from edgepeft.bundle import Bundle, new_manifest
from edgepeft.errors import AdapterMismatch, BundleError, UnsupportedAdapter, UnsupportedModel, require
from edgepeft.files import TMP_PREFIX
from edgepeft.layout import adapter_file, check_adapter_name
from edgepeft.recovery import recover, writer_lock
from edgepeft.kinds import KINDS, SUPPORT, AdapterSpec, features, needed_slots, needs_full_slots, read_checked_adapter

from . import sensitivity
from .calibration import activation_importance
from .hf_base import (BaseModel, config_layout, copy_tokenizer, fingerprint_state_dict, load_base, read_config,
                      resolve_base_dir)
from .gguf_adapter import export_adapter_gguf
from .gguf_base import check_gguf_layout, gguf_ftype, quantize_gguf, write_base_gguf
from .onnx_adapter import export_adapter_onnx
from .onnx_graph import add_base_path, build_decoder, check_onnx_shapes, head_is_tied
from .onnx_quant import (EIGHT_BIT_GROUPS, EXACT_HEAD_TOP_K, ONNX_QUANTS, WEIGHT_ONLY, base_matmuls,
                         importance_blocks, quantize)
from .staging import Progress, replace_dir, staging_dir

FORMATS = ("onnx", "gguf")


def _parse_formats(formats) -> list[str]:
    formats = [f.strip() for f in (formats.split(",") if isinstance(formats, str) else formats) if f.strip()]
    for f in formats:
        if f not in FORMATS:
            raise BundleError(f"format {f!r} is not available (choose from {', '.join(FORMATS)})")
    if not formats:
        raise BundleError("no output format given")
    return formats


def _check_kind(spec: AdapterSpec, backend: str, name: str) -> None:
    for feature in features(spec):  # the kind, and LoRA extras (embedding/lm_head, biases)
        row = SUPPORT.get(feature, {})
        how = row.get(backend, "no")
        if how != "swap":
            others = [b for b, h in row.items() if h == "swap" and b != backend]
            hint = (f"; use --merge {name}" + (f", or the {others[0]} backend" if others else "") if how == "merge"
                    else f"; it runs on the {others[0]} backend (--format {others[0]})" if others else "")
            raise UnsupportedAdapter(f"{spec.path}: adapter {name!r} ({feature}) cannot be hot-swapped on {backend}{hint}")


# The version of the ONNX export recipe, written into every bundle's ONNX backend entry. Bump it
# when an export of the same base and options would write a different graph or different weights
# (layout, slots, quantization), so that the demo and the benchmarks re-export older bundles.
ONNX_RECIPE = 2


def onnx_export_current(onnx: dict) -> bool:
    """Whether a bundle's ONNX backend entry comes from the current export recipe (ONNX_RECIPE);
    bundles from before the recipe was recorded have none. Older bundles still run; the demo and
    the benchmarks re-export them so that they measure this one."""
    recipe = onnx.get("recipe")
    return type(recipe) is int and recipe == ONNX_RECIPE


def _check_mergeable(spec: AdapterSpec, name: str) -> None:
    """Kinds that add virtual tokens (prompt, prefix) have no weight delta to bake in."""
    if not KINDS[spec.kind].MERGEABLE:
        raise UnsupportedAdapter(
            f"{spec.path}: --merge {name}: {spec.kind} adapters add virtual tokens, not weight changes, and cannot "
            "be merged into the base; export it as a swappable adapter (--format onnx)"
        )


def _base_loader(bundle: Bundle):
    """Load the bundle's base from its recorded source, on first use, for kinds computed from the
    base at export (prompt tuning); refuse a source whose weights changed since the export."""
    loaded = []

    def load() -> BaseModel:
        if not loaded:
            source = bundle.base["source"]
            try:
                base = load_base(source)
            except Exception as e:
                raise BundleError(f"{bundle.root}: this adapter kind needs the base model, and its source "
                                  f"{source} cannot be loaded ({str(e).splitlines()[0]})") from None
            if base.fingerprint != bundle.fingerprint:
                raise AdapterMismatch(f"{bundle.root}: the base at {source} is not the one this bundle was "
                                      "exported from (fingerprint differs)")
            loaded.append(base)
        return loaded[0]

    return load


def _write_adapter(bundle: Bundle, name: str, spec: AdapterSpec, formats: list[str], base=None) -> None:
    """`base`: the loaded BaseModel or a function returning it (for kinds computed from it)."""
    files = {}
    for backend in formats:
        _check_kind(spec, backend, name)
    for backend in formats:
        rel = adapter_file(name, backend)
        if backend == "onnx":
            export_adapter_onnx(spec, bundle.backends["onnx"], bundle.fingerprint, bundle.file(rel),
                                base=base if base is not None else _base_loader(bundle))
        elif backend == "gguf":
            export_adapter_gguf(spec, bundle.base, bundle.file(rel))
        bundle.record_file(rel)
        files[backend] = rel
    bundle.adapters[name] = {**spec.summary(), "source": str(spec.path), "files": files}


def _merge(base: BaseModel, spec: AdapterSpec) -> None:
    """Bake a PEFT adapter into the base weights, with PEFT itself (the reference semantics)."""
    peft = require("peft", "export")
    merged = peft.PeftModel.from_pretrained(base.model, str(spec.path)).merge_and_unload()
    base.model = merged.eval()
    base.fingerprint = fingerprint_state_dict(base.model.state_dict())


def _read_request(base: str, adapters: dict[str, str], formats, onnx_quant: str, gguf_quant: str,
                  merge: str | None, slots: str | None) -> tuple[list[str], dict[str, AdapterSpec]]:
    """Check an export's arguments and read its adapters, before the (slow) base export, so that
    bad input fails in a second. Returns the formats and the adapter specs by name."""
    formats = _parse_formats(formats)
    if onnx_quant not in ONNX_QUANTS:
        raise BundleError(f"unknown ONNX precision {onnx_quant!r} (choose from {', '.join(ONNX_QUANTS)})")
    specs = {check_adapter_name(n): read_checked_adapter(p) for n, p in adapters.items()}
    if merge is not None:
        if merge not in specs:
            raise BundleError(f"--merge {merge}: no adapter of that name was given with --adapter")
        if len(specs) > 1:
            raise BundleError("--merge makes a dedicated base; export the other adapters to another bundle")
        _check_mergeable(specs[merge], merge)
    for name, spec in specs.items():
        if name != merge:
            for backend in formats:
                _check_kind(spec, backend, name)
    if slots == "none" and "onnx" in formats:
        swappable = [n for n, sp in specs.items() if n != merge and needed_slots(sp) != "none"]
        if swappable:
            raise BundleError(f"--slots none leaves the ONNX base no adapter slots, and adapter {swappable[0]!r} needs "
                              "them; export with --slots lora (or full), or bake it in with --merge")

    # A wrong path, family, shape or quant type fails here, before anything slow starts.
    local = resolve_base_dir(base)
    config = read_config(local)
    dims, lay = config_layout(config)
    if "onnx" in formats:
        check_onnx_shapes(local, dims, lay.rotary_dim)
    if "gguf" in formats:
        check_gguf_layout(local, config, dims, lay)
        gguf_ftype(gguf_quant)
    return formats, specs


def _base_entry(source: str, base: BaseModel, merged: dict | None) -> dict:
    """The manifest's `base`: where it came from, what it is, and the adapter baked into it."""
    config = base.config
    return {"source": source, "architecture": config.architectures[0]
            if getattr(config, "architectures", None) else config.model_type,
            "model_type": config.model_type, "fingerprint": base.fingerprint,
            "dims": base.dims, "linear_shapes": base.linear_shapes(),
            **({"merged_adapter": merged} if merged else {})}


def _group_mix(info: dict, exact_head: int) -> tuple[list[str], dict]:
    """int4's default 8-bit MatMuls, the EIGHT_BIT_GROUPS (the head only when no exact head
    recomputes its top logits), and what the manifest says of the choice."""
    groups = [g for g in EIGHT_BIT_GROUPS if not (exact_head and g == "lm_head")]
    return [n for n in info["base_matmuls"] if info["projections"].get(n) in groups], {"by": "groups", "groups": groups}


def _measured_mix(base: BaseModel, proto, info: dict, blocks: dict, block_size: int,
                  exact_head: int, target_kl: float) -> tuple[list[str], dict]:
    """int4's 8-bit MatMuls chosen by measured sensitivity down to `target_kl` (sensitivity.py),
    and what the manifest says of the choice."""
    head = {n for n in blocks if info["projections"].get(n) == "lm_head"} if exact_head else set()
    onnx = require("onnx", "export")
    weights = {i.name: i for i in proto.graph.initializer}
    float_w = {n.name: onnx.numpy_helper.to_array(weights[n.input[1]]) for n in base_matmuls(proto, info["lora_nodes"])
               if n.name in blocks}
    candidates = [n for n in blocks if n not in head]
    extra = {n: float_w[n].size // 2 for n in candidates}  # 8 bits over 4: half a byte per weight more
    with sensitivity.Simulation(base, info, blocks, float_w, block_size, frozen=head) as sim:
        chosen, measured = sensitivity.choose(sim, candidates, extra, target_kl)
    mix = {"by": "sensitivity", "target_kl": target_kl, "candidates": len(candidates),
           "kl_4bit": round(measured["kl_4bit"], 5), "kl_mix": round(measured["kl_mix"], 5),
           "gain": {n: round(measured["gains"][n], 5) for n in chosen}}
    return chosen, mix


def _export_onnx(bundle: Bundle, base: BaseModel, quant: str, slot_set: str, block_size: int,
                 accuracy_level: int, context_length: int | None, progress: Progress,
                 int4_target_kl: float | None = None) -> dict:
    """Write onnx/ (the base graph, quantized, with `slot_set` adapter slots) into the bundle,
    list its files, and return the manifest's backends["onnx"] entry."""
    progress.step(f"building ONNX graph ({quant})")
    graph_dtype = "fp16" if quant == "fp16" else "fp32"
    # int4 with a tied head: the head at 4 bits, its top logits recomputed exactly
    exact_head = EXACT_HEAD_TOP_K if quant == "int4" and head_is_tied(base) else 0
    proto, info = build_decoder(base, graph_dtype, context_length, slot_set=slot_set,
                                fp16_embedding=quant in WEIGHT_ONLY, exact_head_top_k=exact_head)
    progress.done()
    blocks, eight_bit, mix = None, [], None
    if quant in ("int4", "int4-pure"):
        progress.step("calibrating 4-bit weights")
        importance = activation_importance(base, info["base_matmuls"])
        if quant == "int4" and int4_target_kl is None:  # the fixed groups: no 4-bit blocks needed for them
            eight_bit, mix = _group_mix(info, exact_head)
            importance = {n: v for n, v in importance.items() if n not in eight_bit}
        # zero points where a block's weighted error drops with one (int4_blocks); int4-pure stays
        # symmetric, as onnxruntime-genai's int4 is
        blocks = importance_blocks(proto, info["lora_nodes"], importance, block_size, zero_points=quant == "int4")
        progress.done()
    if quant == "int4" and int4_target_kl is not None:
        progress.step("measuring which MatMuls need 8 bits")
        eight_bit, mix = _measured_mix(base, proto, info, blocks, block_size, exact_head, int4_target_kl)
        progress.done()
    progress.step(f"quantizing ({quant})")
    proto = quantize(proto, quant, info["lora_nodes"], block_size, accuracy_level, blocks, set(eight_bit))
    if slot_set != "none":
        proto = add_base_path(proto, info)
    progress.done()
    progress.step("writing onnx/model.onnx")
    _save_onnx(proto, bundle.root / "onnx" / "model.onnx")
    for rel in ("onnx/model.onnx", "onnx/model.onnx.data"):
        if bundle.file(rel).exists():
            bundle.record_file(rel)
    progress.done()
    return {
        "model": "onnx/model.onnx", "quant": quant, "recipe": ONNX_RECIPE,
        **({"block_size": block_size, "accuracy_level": accuracy_level} if quant in WEIGHT_ONLY else {}),
        **({"eight_bit": eight_bit, "int4_mix": mix} if quant == "int4" else {}),
        **({"exact_head_top_k": exact_head} if exact_head else {}),
        # zero_points: how many 4-bit MatMuls have some (the 8-bit ones are onnxruntime's, symmetric)
        **({"int4_rounding": "importance-weighted",
            "zero_points": sum(b[2] is not None for n, b in blocks.items() if n not in eight_bit)} if blocks else {}),
        "dtype": info["dtype"], "context_length": info["context_length"],
        "kv": info["kv"], "slot_set": slot_set, "slots": info["slots"],
        **({"base_path": True} if info.get("base_path") else {}),
        **({"row_masks": True} if info.get("row_masks") else {}),
        **({"longrope_switch": info["longrope_switch"]} if info.get("longrope_switch") else {}),
        "logits_to_keep": True,
    }


def _export_gguf(bundle: Bundle, base: BaseModel, quant: str, context_length: int | None,
                 progress: Progress) -> dict:
    """Write the base GGUF into the bundle, list it, and return the manifest's backends["gguf"]."""
    progress.step(f"writing GGUF ({quant})")
    rel = _write_gguf(base, bundle.root, quant)
    bundle.record_file(rel)
    progress.done()
    return {"model": rel, "quant": quant.upper(),
            "context_length": int(context_length or min(base.dims["max_position_embeddings"], 8192))}


def export_bundle(base: str, out: str | Path, adapters: dict[str, str] | None = None,
                  formats="onnx", onnx_quant: str = "int4", gguf_quant: str = "Q4_K_M", block_size: int = 32,
                  accuracy_level: int = 4, context_length: int | None = None,
                  merge: str | None = None, quiet: bool = False, slots: str | None = None,
                  int4_target_kl: float | None = None) -> Bundle:
    """Export `base` (HF dir or builtin:NAME) and PEFT `adapters` {name: dir} into bundle `out`.

    int4_target_kl: int4 chooses its 8-bit MatMuls by measured sensitivity, until the calibration KL
    is at most this (sensitivity.py). Larger is faster and less faithful. Default: the fixed groups
    (onnx_quant.EIGHT_BIT_GROUPS).

    slots: the ONNX base's adapter slots, "lora" (LoRA only), "full" (also the scale and bias
    slots IA3, DoRA and bias tuning need; slower in calls with an adapter, so not the default)
    or "none" (no hot-swap: a base with nothing to swap). Default: "none" with `merge`, else
    "full" when one of `adapters` needs it, else "lora"."""
    out = Path(out)
    adapters = dict(adapters or {})
    if int4_target_kl is not None and not (0 < int4_target_kl < float("inf")):
        raise UnsupportedModel(f"--int4-target-kl {int4_target_kl}: must be a KL above 0")
    if int4_target_kl is not None and onnx_quant != "int4":
        raise UnsupportedModel(f"--int4-target-kl applies to --onnx-quant int4, not {onnx_quant}")
    formats, specs = _read_request(base, adapters, formats, onnx_quant, gguf_quant, merge, slots)
    progress = Progress(2 + 3 * ("onnx" in formats) + ("gguf" in formats) + len(specs), quiet)
    try:
        progress.step("loading base")
        base_model = load_base(base)
        progress.done()
        merged = None
        if merge is not None:
            spec = specs.pop(merge)
            merged = {"name": merge, **spec.summary(), "source": str(Path(adapters[merge]))}
            _merge(base_model, spec)
        with staging_dir(out) as tmp:
            tokenizer = copy_tokenizer(base_model, tmp)
            bundle = Bundle(tmp, new_manifest(base=_base_entry(base, base_model, merged), tokenizer=tokenizer))
            for name in tokenizer["files"]:
                bundle.record_file(name)
            if "onnx" in formats:
                slot_set = slots or ("none" if merge is not None else
                                     "full" if any(needs_full_slots(sp) for sp in specs.values()) else "lora")
                bundle.backends["onnx"] = _export_onnx(bundle, base_model, onnx_quant, slot_set, block_size,
                                                       accuracy_level, context_length, progress, int4_target_kl)
            if "gguf" in formats:
                bundle.backends["gguf"] = _export_gguf(bundle, base_model, gguf_quant, context_length, progress)
            for name, spec in specs.items():
                progress.step(f"adapter {name}")
                _write_adapter(bundle, name, spec, formats, base=base_model)
                progress.done()
            bundle.save()
            replace_dir(tmp, out)
            progress.done()
    finally:
        progress.close()
    return Bundle.open(out)


def _write_gguf(base: BaseModel, root: Path, quant: str) -> str:
    """Write the base GGUF: F32/F16 directly, anything else through llama.cpp's quantizer."""
    quant = quant.upper()
    rel = f"gguf/base-{quant}.gguf"
    (root / "gguf").mkdir(exist_ok=True)
    if quant in ("F32", "F16"):
        write_base_gguf(base, root / rel, quant)
    else:
        source = root / "gguf" / f"{TMP_PREFIX}base-F32.gguf"
        write_base_gguf(base, source, "F32")
        try:
            quantize_gguf(source, root / rel, quant)
        finally:
            source.unlink(missing_ok=True)
    return rel


def _save_onnx(proto, path: Path) -> None:
    onnx = require("onnx", "export")
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)


def add_adapter(bundle_dir: str | Path, name: str, peft_dir: str | Path, formats=None) -> Bundle:
    """Export one more adapter into an existing bundle. Base files are never rewritten."""
    with writer_lock(bundle_dir):
        recover(bundle_dir)
        return _add_adapter(bundle_dir, name, peft_dir, formats)


def _add_adapter(bundle_dir, name, peft_dir, formats) -> Bundle:
    bundle = Bundle.open(bundle_dir)
    check_adapter_name(name)
    if name in bundle.adapters:
        raise BundleError(f"{bundle.root}: already has an adapter named {name!r}; remove-adapter it first")
    formats = _parse_formats(formats) if formats else [b for b in bundle.backends if b in FORMATS]
    for backend in formats:
        if backend not in bundle.backends:
            raise BundleError(f"{bundle.root}: has no {backend} base; export it with --format {backend}")
    spec = read_checked_adapter(peft_dir)
    try:
        _write_adapter(bundle, name, spec, formats)
    except BaseException:
        # Nothing but the adapter files may have been written; the manifest is untouched.
        for backend in formats:
            bundle.file(adapter_file(name, backend)).unlink(missing_ok=True)
        raise
    bundle.save()  # the commit point: killed before it, the adapter files are orphans recover() removes
    return bundle
