"""Where edgepeft keeps derived files: ~/.cache/edgepeft, or $EDGEPEFT_CACHE."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEPEFT_CACHE") or Path.home() / ".cache" / "edgepeft")
