"""`export` and `add-adapter`: write a bundle (base + adapters) atomically."""

from __future__ import annotations

from pathlib import Path

from edgepeft.bundle import Bundle, new_manifest
from edgepeft.errors import AdapterMismatch, BundleError, UnsupportedAdapter, UnsupportedModel, require
from edgepeft.layout import adapter_file, check_adapter_name
from edgepeft.recovery import recover, replace_dir, staging_dir, writer_lock
from edgepeft.kinds import KINDS, SUPPORT, AdapterSpec, features, needed_slots, needs_full_slots, read_checked_adapter

from . import heap
from .hf_base import (BaseModel, config_layout, copy_tokenizer, fingerprint_state_dict, fingerprint_tensors, load_base,
                      read_config, resolve_base_dir)
from .gguf_adapter import export_adapter_gguf
from .gguf_base import check_gguf_layout, gguf_ftype
from .gguf_job import DIRECT as GGUF_DIRECT, GgufJob
from .merge import MergedWeights
from .onnx_adapter import export_adapter_onnx
from .onnx_export import export_onnx
from .onnx_graph import check_onnx_shapes
from .onnx_quant import ONNX_QUANTS, check_quant
from .progress import Progress

STATE_WORDS = {"conv": "convolution"}  # state names (runtime_contract.state_names) in an error

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
    if "onnx" in formats:  # add-adapter to a hybrid's bundle: the layers with a state, from its graph's entry
        kv = bundle.backends["onnx"]["kv"]
        states = kv.get("states", [])
        stateful = sorted({s["layer"] for s in states})
        _check_hybrid_kinds({name: spec}, stateful, {s["name"] for s in states}, None)
        own = set(kv.get("layers", range(kv["num_layers"]))) | set(stateful)
        _check_kv_sharing_kinds({name: spec}, [i for i in range(kv["num_layers"]) if i not in own], None)
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
    """Bake a PEFT adapter into the base weights, with PEFT itself (the reference semantics): on a
    lazy base each changed weight as it is read (exporters/merge.py), else the whole model."""
    if base.tensors is not None:
        base.merged = MergedWeights(base, str(spec.path))
        base.fingerprint = fingerprint_tensors(base.tensor_names(), base.tensor)
        return
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
    stateful = lay.state_layers()
    _check_hybrid_kinds(specs, stateful, {n for i in stateful for n in lay.states[i]}, merge)
    _check_kv_sharing_kinds(specs, lay.kv_consumers(), merge)
    if "onnx" in formats:
        check_onnx_shapes(local, lay)
        if onnx_quant not in ("fp32", "fp16") and (lay.per_layer_input or lay.kv_consumers()):
            raise UnsupportedModel(f"{local}: --onnx-quant {onnx_quant} of {config.model_type} (per-layer inputs, KV "
                                   "sharing) is not supported yet; export with --onnx-quant fp32 or fp16")
    if "gguf" in formats:
        check_gguf_layout(local, config, dims, lay)
        gguf_ftype(gguf_quant)
    return formats, specs


def _check_hybrid_kinds(specs: dict[str, AdapterSpec], stateful: list[int], states: set[str],
                        merge: str | None) -> None:
    """Refuse prompt-learning adapters (prompt and prefix tuning) on a base whose layers carry
    `states` other than a KV cache (a hybrid's convolution, a DeltaNet's recurrent matrix): their
    virtual tokens reach the runtime as a KV-cache prefix of every layer, and such a layer has no
    KV cache (prefix tuning's keys and values have nothing to attach to there; prompt tuning would
    need each layer's state after the virtual tokens, which no adapter file carries)."""
    if not stateful:
        return
    kinds = " and ".join(STATE_WORDS.get(n, n) for n in sorted(states))
    for name, spec in specs.items():
        if name != merge and needed_slots(spec) == "none":
            raise UnsupportedAdapter(f"{spec.path}: adapter {name!r} ({spec.kind} tuning) cannot run on a base whose "
                                     f"layers {stateful[:4]}{'...' if len(stateful) > 4 else ''} carry a {kinds} "
                                     "state instead of a KV cache; use a LoRA, DoRA or IA3 adapter")


def _check_kv_sharing_kinds(specs: dict[str, AdapterSpec], consumers: list[int], merge: str | None) -> None:
    """Refuse prompt-learning adapters on a base whose `consumers` layers attend over an earlier
    layer's KV cache (Gemma 4): their virtual tokens reach the runtime as a KV-cache prefix of
    every layer, and such a layer has none of its own to carry its prefix."""
    for name, spec in specs.items():
        if consumers and name != merge and needed_slots(spec) == "none":
            raise UnsupportedAdapter(f"{spec.path}: adapter {name!r} ({spec.kind} tuning) cannot run on a base whose "
                                     f"layers {consumers[:4]}{'...' if len(consumers) > 4 else ''} reuse an earlier "
                                     "layer's KV cache; use a LoRA, DoRA or IA3 adapter")


def _base_entry(source: str, base: BaseModel, merged: dict | None) -> dict:
    """The manifest's `base`: where it came from, what it is, and the adapter baked into it."""
    config = base.config
    return {"source": source, "architecture": config.architectures[0]
            if getattr(config, "architectures", None) else config.model_type,
            "model_type": config.model_type, "fingerprint": base.fingerprint,
            "dims": base.dims, "linear_shapes": base.linear_shapes(),
            **({"merged_adapter": merged} if merged else {})}


def export_bundle(base: str, out: str | Path, adapters: dict[str, str] | None = None,
                  formats="onnx", onnx_quant: str = "int4", gguf_quant: str = "Q4_K_M", block_size: int = 32,
                  accuracy_level: int = 4, context_length: int | None = None,
                  merge: str | None = None, quiet: bool = False, slots: str | None = None,
                  int4_target_kl: float | None = None) -> Bundle:
    """Export `base` (HF dir or builtin:NAME) and PEFT `adapters` {name: dir} into bundle `out`.

    int4_target_kl: int4 chooses its 8-bit MatMuls by measured sensitivity, until the calibration KL
    is at most this (sensitivity.py). Larger is faster and less faithful. Default: the fixed groups
    (onnx_quant.EIGHT_BIT_GROUPS, and for a builtin base any group its GGUF holds at more than 4 bits).

    slots: the ONNX base's adapter slots, "lora" (LoRA only), "full" (also the scale and bias
    slots IA3, DoRA and bias tuning need; slower in calls with an adapter, so not the default)
    or "none" (no hot-swap: a base with nothing to swap). Default: "none" with `merge`, else
    "full" when one of `adapters` needs it, else "lora"."""
    out = Path(out)
    adapters = dict(adapters or {})
    heap.map_large_buffers()  # weights read a layer at a time: their buffers go back when freed
    if int4_target_kl is not None and not (0 < int4_target_kl < float("inf")):
        raise UnsupportedModel(f"--int4-target-kl {int4_target_kl}: must be a KL above 0")
    if int4_target_kl is not None and onnx_quant != "int4":
        raise UnsupportedModel(f"--int4-target-kl applies to --onnx-quant int4, not {onnx_quant}")
    formats, specs = _read_request(base, adapters, formats, onnx_quant, gguf_quant, merge, slots)
    if "onnx" in formats:
        check_quant(onnx_quant, block_size)
    onnx_steps = 3 + (onnx_quant in ("int4", "int4-pure")) + (int4_target_kl is not None)
    # loading, manifest, the backends' steps, one per adapter (the merged one's is its merge)
    gguf_steps = 0 if "gguf" not in formats else 1 if gguf_quant.upper() in GGUF_DIRECT else 2
    progress = Progress(2 + onnx_steps * ("onnx" in formats) + gguf_steps + len(specs), quiet)
    finished = False
    try:
        progress.step("loading base")
        # every step reads the base from its checkpoint; --merge merges each weight as it is read
        base_model = load_base(base)
        progress.done()
        merged = None
        if merge is not None:
            spec = specs.pop(merge)
            merged = {"name": merge, **spec.summary(), "source": str(Path(adapters[merge]))}
            progress.step(f"merging adapter {merge}")
            _merge(base_model, spec)
            progress.done()
        with staging_dir(out) as tmp:
            tokenizer = copy_tokenizer(base_model, tmp)
            bundle = Bundle(tmp, new_manifest(base=_base_entry(base, base_model, merged), tokenizer=tokenizer))
            for name in tokenizer["files"]:
                bundle.record_file(name)
            # the GGUF first: its quantizer then runs beside the ONNX export (gguf_job.py)
            gguf = GgufJob(tmp, base_model, gguf_quant, context_length, progress) if "gguf" in formats else None
            try:
                if "onnx" in formats:
                    slot_set = slots or ("none" if merge is not None else
                                         "full" if any(needs_full_slots(sp) for sp in specs.values()) else "lora")
                    bundle.backends["onnx"] = export_onnx(bundle, base_model, onnx_quant, slot_set, block_size,
                                                           accuracy_level, context_length, progress, int4_target_kl,
                                                           before_head=gguf.wait if gguf else None)
                if gguf:
                    bundle.backends["gguf"] = gguf.finish(progress)
                    bundle.record_file(gguf.rel)
            except Exception:
                if gguf:
                    gguf.abandon()
                raise
            for name, spec in specs.items():
                progress.step(f"adapter {name}")
                _write_adapter(bundle, name, spec, formats, base=base_model)
                progress.done()
            progress.step("writing the manifest")
            bundle.save()
            replace_dir(tmp, out)
            progress.done()
            finished = True
    finally:
        progress.close(summary=finished)
    return Bundle.open(out)


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
