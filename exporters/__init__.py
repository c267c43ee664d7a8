"""Workstation side: base and adapter exporters. Needs `pip install 'edgepeft[export]'`."""

import logging

from .bundle_export import add_adapter, export_bundle

# onnxruntime's quantizer and gguf-py log every tensor at INFO; our progress bar says enough.
for _name in ("onnxruntime.quantization", "onnxruntime.quantization.matmul_nbits_quantizer", "gguf", "gguf.gguf_writer"):
    logging.getLogger(_name).setLevel(logging.WARNING)

__all__ = ["add_adapter", "export_bundle"]
