"""Small facts both sides of the ONNX path must agree on (exporter writes, runtime checks)."""

from __future__ import annotations


def fingerprint_version(fingerprint: str) -> int:
    """The base fingerprint folded to 31 bits, stored as the adapter file's model_version.

    onnxruntime's adapter format has no free-form metadata; its `model_version` field is meant to
    identify the model an adapter belongs to, so it carries (a digest of) the base fingerprint and
    the runtime refuses an adapter file exported for another base."""
    digest = fingerprint.split(":", 1)[-1]
    return int(digest[:8], 16) & 0x7FFFFFFF


def prefix_names(layer: int) -> tuple[str, str]:
    """Adapter-file parameter names of a layer's KV prefix (prompt and prefix tuning): each is
    [num_kv_heads, P, head_dim] in the base graph's float type. They are not graph inputs: the
    runtime copies them into the first P positions of a sequence's KV cache."""
    return f"prefix.{layer}.key", f"prefix.{layer}.value"


# Graph input that picks the path of a base with slots (exporters/onnx_graph.add_base_path):
# float [1], default 0 (the base without slot operators); non-zero runs the slots. Adapter
# files carry it as 1, so onnxruntime's own adapter API (RunOptions.add_active_adapter) selects
# the slot path too.
ADAPTERS_ACTIVE = "adapters_active"

# Graph input (int64 [1], default 0 = all positions): logits for the last n positions only, as
# transformers' logits_to_keep. The runtime asks for 1 when it only samples from a prompt's last
# position. Bundles from before it have no such input and compute every position.
LOGITS_TO_KEEP = "logits_to_keep"
