"""The names and small facts both sides of the ONNX path agree on: the exporter writes them into the
graph and the adapter files, the runtime binds and checks them. Each is stated here once (as
gguf-py's constants.py states every GGUF key) and both sides build names only from these. They
are on disk in every bundle exported so far, so none may change. No onnx or torch here: the
runtime imports this module."""

from __future__ import annotations

from collections.abc import Iterable

# ---- the decoder's inputs and outputs (the names onnxruntime-genai and Optimum use) -------------
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
LOGITS = "logits"


def kv_names(layer: int) -> tuple[str, str, str, str]:
    """A layer's KV-cache graph inputs and outputs: past key, past value, present key, present
    value."""
    return (f"past_key_values.{layer}.key", f"past_key_values.{layer}.value",
            f"present.{layer}.key", f"present.{layer}.value")


def kv_shape(kv: dict, layer: int) -> tuple[int, int]:
    """(KV heads, head size) of `layer`'s KV cache from the manifest's kv: the same for every
    layer, or per KV layer where layers differ (kv["heads"], in kv["layers"] order: Gemma 4's
    full-attention layers have a larger head)."""
    if "heads" in kv:
        nkv, hd = kv["heads"][list(kv["layers"]).index(layer)]
        return int(nkv), int(hd)
    return int(kv["num_kv_heads"]), int(kv["head_dim"])


def state_names(layer: int, state: str) -> tuple[str, str]:
    """A state-carrying layer's per-sequence state (a hybrid family's layer without a KV cache:
    LFM2's short convolution carries its "conv" state, the last kernel-1 inputs of its
    convolution, [batch, hidden, kernel - 1]; Qwen3.5's gated DeltaNet its "conv" and
    "recurrent" states), as graph input and output: past and present. Named as onnxruntime-genai
    names LFM2's (past_conv.N / present_conv.N), one scheme for every state."""
    return f"past_{state}.{layer}", f"present_{state}.{layer}"


# Graph input that picks the path of a base with slots (exporters/onnx_base_path.add_base_path):
# float [1], default 0 (the base without slot operators); non-zero runs the slots. Adapter
# files carry it as 1, so onnxruntime's own adapter API (RunOptions.add_active_adapter) selects
# the slot path too.
ADAPTERS_ACTIVE = "adapters_active"

# Graph input (int64 [1], default 0 = all positions): logits for the last n positions only, as
# transformers' logits_to_keep. The runtime asks for 1 when it only samples from a prompt's last
# position. Bundles from before it have no such input and compute every position.
LOGITS_TO_KEEP = "logits_to_keep"

# ---- adapter slots: graph inputs with defaults, which an adapter file's parameters override -------
# By role (the keys of the manifest's slot entries): the family and the ending of each name,
# "<family>.<module><ending>". The LoRA pair is in every slot; the scales and the bias only in
# the full slot set.
_SLOT_INPUTS = {"A": ("lora", ".A"), "B": ("lora", ".B"), "scale_in": ("scale", ".in"),
                "scale_out": ("scale", ".out"), "bias": ("bias", "")}


def row_mask(module: str) -> str:
    """Graph input of `module`'s LoRA row mask (bundles whose manifest has "row_masks"): float
    [batch, 1, rank] ([batch, 1, 1, rank] for a packed group), multiplied into x A, so that in a
    batch whose slots hold several adapters' ranks side by side each row keeps only its own
    adapter's columns. Default ones [1, 1, 1] (or [1, 1, 1, 1]): every column, one adapter per
    call, as in bundles without masks. Never in adapter files: the runtime builds it per batch."""
    return f"lora.{module}.rows"


def slot_inputs(module: str) -> dict[str, str]:
    """Graph input names of `module`'s slot by role: "A", "B", "scale_in", "scale_out", "bias"."""
    return {role: f"{family}.{module}{ending}" for role, (family, ending) in _SLOT_INPUTS.items()}


def slot_params(modules: Iterable[str]) -> dict[str, tuple[str, str]]:
    """{graph input name: (module, role)} for the slots of `modules`, from slot_inputs: how the
    runtime tells slot inputs and adapter parameters apart without parsing their names."""
    return {name: (module, role) for module in modules for role, name in slot_inputs(module).items()}


def slot_family(role: str) -> str:
    """What a role's inputs are together: "lora", "scale" or "bias"."""
    return _SLOT_INPUTS[role][0]


# ---- KV prefixes (prompt and prefix tuning): adapter-file parameters, not graph inputs -----------
_PREFIX = "prefix"


def prefix_names(layer: int) -> tuple[str, str]:
    """Adapter-file parameter names of a layer's KV prefix (prompt and prefix tuning): each is
    [num_kv_heads, P, head_dim] in the base graph's float type. They are not graph inputs: the
    runtime copies them into the first P positions of a sequence's KV cache."""
    return f"{_PREFIX}.{layer}.key", f"{_PREFIX}.{layer}.value"


def is_prefix_param(name: str) -> bool:
    """Whether an adapter file's parameter claims to be part of a KV prefix. Files come from
    outside, so the runtime sorts them by family first, then checks each layer's names."""
    return name.startswith(f"{_PREFIX}.")


def fingerprint_version(fingerprint: str) -> int:
    """The base fingerprint folded to 31 bits, stored as the adapter file's model_version.

    onnxruntime's adapter format has no free-form metadata; its `model_version` field is meant to
    identify the model an adapter belongs to, so it carries (a digest of) the base fingerprint and
    the runtime refuses an adapter file exported for another base."""
    digest = fingerprint.split(":", 1)[-1]
    return int(digest[:8], 16) & 0x7FFFFFFF


# ---- the base path's branches --------------------------------------------------------------------
# add_base_path wraps the graph in If(ADAPTERS_ACTIVE); each branch tags its node and value names,
# since a subgraph may not reuse the outer graph's names.
PATH_TAGS = {"then_branch": "slots", "else_branch": "base"}


def tagged(tag: str, name: str) -> str:
    """A node or value name as it is inside the branch tagged `tag`."""
    return f"{tag}:{name}"
