"""edgepeft: ship PEFT adapters to devices.

The core package holds the shared language of the two sides: the bundle manifest, the neutral
adapter spec read from PEFT directories, errors and the CLI. It needs numpy, safetensors and
tokenizers only; `edgepeft.exporters` (workstation) and `edgepeft.runtime` (device) build on it.
"""

__version__ = "0.1.0"
