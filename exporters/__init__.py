"""Workstation side: base and adapter exporters. Needs `pip install 'edgepeft[export]'`."""

import logging

from .bundle_export import add_adapter, export_bundle

# onnxruntime's quantizer and gguf-py log every tensor at INFO; our progress bar says enough.
for _name in ("onnxruntime.quantization", "onnxruntime.quantization.matmul_nbits_quantizer", "gguf", "gguf.gguf_writer"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# transformers 5 asks the author of a LongRoPE config (Phi-3.5, Phi-4-mini) to restate it; an
# exporting user cannot act on that, and the tables come out the same.
logging.getLogger("transformers.modeling_rope_utils").setLevel(logging.ERROR)

__all__ = ["add_adapter", "export_bundle"]
