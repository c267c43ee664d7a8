"""edgepeft: ship PEFT adapters to devices.

The core package holds the shared language of the two sides: the bundle manifest, the neutral
adapter spec read from PEFT directories, errors and the CLI. It needs numpy, safetensors,
ml_dtypes, tokenizers and jinja2 only; `edgepeft.exporters` (workstation) and `edgepeft.runtime` (device) build on it.
"""

import os

# onnxruntime's Linux wheel records a device id and usage events under ~/.cache/Microsoft and
# holds an uploader for them; an offline tool must not. Only this variable, read when onnxruntime
# is imported, stops it, and every entry point imports this package first. setdefault: a user who
# sets ORT_DISABLE_TELEMETRY=0 keeps Microsoft's telemetry (docs/security.md).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
