"""Where things live in a bundle directory: the manifest's name and the adapter files' paths.

The bundle reader (bundle.py) and the crash recovery (recovery.py) both need these, and the
reader also calls recovery; holding them here lets both import one way. docs/bundle.md
describes the whole layout.
"""

from __future__ import annotations

import re

from .errors import BundleError

MANIFEST = "edgepeft.json"
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# Suffix of each backend's adapter file.
ADAPTER_SUFFIX = {"onnx": ".onnx_adapter", "gguf": ".gguf"}
# The folders of a bundle that writers put files (and, killed, temporary files) in.
FOLDERS = ("adapters", "onnx", "gguf")


def check_adapter_name(name: str) -> str:
    if not ADAPTER_NAME.match(name) or name in (".", ".."):
        raise BundleError(
            f"adapter name {name!r} is invalid: use letters, digits, '_', '-', '.', at most 64"
        )
    return name


def adapter_file(name: str, backend: str) -> str:
    return f"adapters/{name}{ADAPTER_SUFFIX[backend]}"
