"""The ONNX half of `export`: the base graph (onnx_graph), quantized as it is built
(onnx_quant.WeightQuantizer) or, with --int4-target-kl, after a sensitivity search; then the
base path and the manifest's backends["onnx"] entry."""

from __future__ import annotations

from pathlib import Path

from edgepeft.bundle import Bundle
from edgepeft.errors import require

from . import sensitivity
from .builtin import source_level_bits
from .calibration import activation_importance, linear_modules
from .decode_bytes import onnx_decode_bytes
from .hf_base import BaseModel
from .onnx_external import ExternalData
from .onnx_graph import add_base_path, build_decoder, head_is_tied
from .onnx_quant import (EIGHT_BIT_GROUPS, EXACT_HEAD_TOP_K, WEIGHT_ONLY, WeightQuantizer, base_matmuls,
                         importance_blocks, rtn_blocks, to_matmul_nbits)
from .progress import Progress

# The version of the ONNX export recipe, written into every bundle's ONNX backend entry. Bump it
# when an export of the same base and options would write a different graph or different weights
# (layout, slots, quantization), so that the demo and the benchmarks re-export older bundles.
ONNX_RECIPE = 3
DATA_FILE = "model.onnx.data"


def onnx_export_current(onnx: dict) -> bool:
    """Whether a bundle's ONNX backend entry comes from the current export recipe (ONNX_RECIPE);
    bundles from before the recipe was recorded have none. Older bundles still run; the demo and
    the benchmarks re-export them so that they measure this one."""
    recipe = onnx.get("recipe")
    return type(recipe) is int and recipe == ONNX_RECIPE


def _eight_bit_groups(exact_head: int, source: str) -> tuple[list[str], list[str]]:
    """int4's default 8-bit projection groups: EIGHT_BIT_GROUPS (the head only when no exact head
    recomputes its top logits), then any group a builtin base holds at more than 4 bits in its
    GGUF (Gemma 3 270M's gate/up are Q5_0). 4 bits on top of a 5-bit grid is a second rounding
    the source never had: on builtin:gemma3-270m it put a trained LoRA outside verify's bounds
    (benchmarks/results/gemma3_eight_bit.md). Returns (groups, those added for the source)."""
    groups = [g for g in EIGHT_BIT_GROUPS if not (exact_head and g == "lm_head")]
    finer = [g for g, bits in source_level_bits(source).items() if bits > 4 and g not in groups]
    return groups + finer, finer


def _streamed_blocks(base: BaseModel, quant: str, graph_dtype: str, build: dict, block_size: int,
                     eight: set[str], progress: Progress, path: Path, before_head=None) -> tuple:
    """Build the graph with each base MatMul quantized as it is made (onnx_quant.WeightQuantizer),
    the projection groups in `eight` at 8 bits (int4):
    the activation statistics first (int4, int4-pure), then the graph. Returns (proto, info,
    blocks); fp16/fp32 keep float weights and have no blocks. The quantized blocks and the fp16
    embedding table go to the data file of the model at `path` as they are made (onnx_external)."""
    if quant not in WEIGHT_ONLY:
        if before_head is not None:  # the float graph holds every weight: nothing beside it
            before_head()
        progress.step(f"building ONNX graph ({quant})")
        proto, info = build_decoder(base, graph_dtype, **build)
        progress.done()
        return proto, info, {}
    importance = {}
    if quant != "int8":
        progress.step("calibrating 4-bit weights")
        importance = activation_importance(base, linear_modules(base.model), progress)
        progress.done()
    progress.step(f"building ONNX graph ({quant})")
    # zero points where a block's weighted error drops with one (int4_blocks); int4-pure stays
    # symmetric, as onnxruntime-genai's int4 is
    external = ExternalData(path, DATA_FILE)
    quantizer = WeightQuantizer(lambda group: 8 if quant == "int8" or group in eight else 4, importance,
                                block_size, zero_points=quant == "int4", progress=progress,
                                total=len(base.arch.groups) * base.dims["num_layers"] + 1, external=external,
                                before_head=before_head)
    try:
        proto, info = build_decoder(base, graph_dtype, quantizer=quantizer, external=external, **build)
    finally:
        blocks = quantizer.results()
        external.close()
    progress.done()
    return proto, info, blocks


def _measured_blocks(base: BaseModel, graph_dtype: str, build: dict, block_size: int, exact_head: int,
                     target_kl: float, progress: Progress) -> tuple:
    """--int4-target-kl: the float graph, 4-bit blocks for every base MatMul, then the 8-bit
    MatMuls chosen by measured sensitivity down to `target_kl` (sensitivity.py). Returns (proto,
    info, blocks, eight-bit MatMuls, what the manifest says of the choice)."""
    onnx = require("onnx", "export")
    progress.step("building ONNX graph (int4)")
    proto, info = build_decoder(base, graph_dtype, **build)
    progress.done()
    progress.step("calibrating 4-bit weights")
    importance = activation_importance(base, info["base_matmuls"], progress)
    four = importance_blocks(proto, info["lora_nodes"], importance, block_size, zero_points=True, progress=progress)
    progress.done()
    progress.step("measuring which MatMuls need 8 bits")
    weights = {i.name: i for i in proto.graph.initializer}
    float_w = {n.name: onnx.numpy_helper.to_array(weights[n.input[1]]) for n in base_matmuls(proto, info["lora_nodes"])}
    chosen, mix = _measured_mix(base, info, four, float_w, block_size, exact_head, target_kl)
    progress.done()
    blocks = {n: (8, *rtn_blocks(w, 8, block_size), w.shape[0]) if n in chosen else
              (4, *four[n], w.shape[0]) if n in four else (4, *rtn_blocks(w, 4, block_size), w.shape[0])
              for n, w in float_w.items()}
    return proto, info, blocks, list(chosen), mix


def _measured_mix(base: BaseModel, info: dict, four: dict, float_w: dict, block_size: int, exact_head: int,
                  target_kl: float) -> tuple[list[str], dict]:
    """int4's 8-bit MatMuls chosen by measured sensitivity down to `target_kl` (sensitivity.py),
    and what the manifest says of the choice; an exact head stays 4-bit."""
    head = {n for n in four if info["projections"].get(n) == "lm_head"} if exact_head else set()
    candidates = [n for n in four if n not in head]
    extra = {n: float_w[n].size // 2 for n in candidates}  # 8 bits over 4: half a byte per weight more
    with sensitivity.Simulation(base, info, four, float_w, block_size, frozen=head) as sim:
        chosen, measured = sensitivity.choose(sim, candidates, extra, target_kl)
    return chosen, {"by": "sensitivity", "target_kl": target_kl, "candidates": len(candidates),
                    "kl_4bit": round(measured["kl_4bit"], 5), "kl_mix": round(measured["kl_mix"], 5),
                    "gain": {n: round(measured["gains"][n], 5) for n in chosen}}


def export_onnx(bundle: Bundle, base: BaseModel, quant: str, slot_set: str, block_size: int,
                 accuracy_level: int, context_length: int | None, progress: Progress,
                 int4_target_kl: float | None = None, before_head=None) -> dict:
    """Write onnx/ (the base graph, quantized, with `slot_set` adapter slots) into the bundle,
    list its files, and return the manifest's backends["onnx"] entry. before_head() is called
    before the head's weight is read (with --int4-target-kl, which holds the whole float graph,
    before anything is)."""
    graph_dtype = "fp16" if quant == "fp16" else "fp32"
    # int4 with a tied head: the head at 4 bits, its top logits recomputed exactly
    exact_head = EXACT_HEAD_TOP_K if quant == "int4" and head_is_tied(base) else 0
    build = dict(context_length=context_length, slot_set=slot_set, fp16_embedding=quant in WEIGHT_ONLY,
                 exact_head_top_k=exact_head)
    if int4_target_kl is not None:
        if before_head is not None:
            before_head()
        proto, info, blocks, eight_bit, mix = _measured_blocks(base, graph_dtype, build, block_size, exact_head,
                                                                int4_target_kl, progress)
    else:
        # read once: for a builtin base, its GGUF's tensor types (gguf-py parses the whole vocabulary)
        groups, finer = _eight_bit_groups(exact_head, base.source) if quant == "int4" else ([], [])
        proto, info, blocks = _streamed_blocks(base, quant, graph_dtype, build, block_size, set(groups), progress,
                                               bundle.root / "onnx" / "model.onnx", before_head)
        eight_bit = [n for n in info["base_matmuls"] if blocks[n][0] == 8] if quant == "int4" else []
        mix = {"by": "groups", "groups": groups, **({"finer_in_source": finer} if finer else {})} \
            if quant == "int4" else None
    progress.step(f"quantizing ({quant})")
    zero_points = sum(b[3] is not None for b in blocks.values() if b[0] == 4)
    proto = to_matmul_nbits(proto, blocks, block_size, accuracy_level)  # empties `blocks`
    if slot_set != "none":
        proto = add_base_path(proto, info)
    progress.done()
    progress.step("writing onnx/model.onnx")
    decode_bytes = onnx_decode_bytes(proto, exact_head)
    _save_onnx(proto, bundle.root / "onnx" / "model.onnx")
    for rel in ("onnx/model.onnx", f"onnx/{DATA_FILE}"):
        if bundle.file(rel).exists():
            bundle.record_file(rel)
    progress.done()
    return {
        "model": "onnx/model.onnx", "quant": quant, "recipe": ONNX_RECIPE,
        **({"block_size": block_size, "accuracy_level": accuracy_level} if quant in WEIGHT_ONLY else {}),
        **({"eight_bit": eight_bit, "int4_mix": mix} if quant == "int4" else {}),
        **({"exact_head_top_k": exact_head} if exact_head else {}),
        # zero_points: how many 4-bit MatMuls have some (the 8-bit blocks are symmetric)
        **({"int4_rounding": "importance-weighted",
            "zero_points": zero_points}
           if quant in ("int4", "int4-pure") else {}),
        "dtype": info["dtype"], "context_length": info["context_length"],
        "kv": info["kv"], "slot_set": slot_set, "slots": info["slots"],
        **({"base_path": True} if info.get("base_path") else {}),
        **({"row_masks": True} if info.get("row_masks") else {}),
        **({"longrope_switch": info["longrope_switch"]} if info.get("longrope_switch") else {}),
        "logits_to_keep": True, "decode_bytes": decode_bytes,
    }


def _save_onnx(proto, path: Path) -> None:
    """Save `proto` with its initializers of 1 KiB or more in DATA_FILE: those still in the proto
    are appended after what onnx_external already wrote there."""
    onnx = require("onnx", "export")
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
