"""The adapters shipped inside the package (trained by scripts/train_demo_adapters.py)."""

from __future__ import annotations

import json
from pathlib import Path

from edgepeft.errors import BundleError

DATA = Path(__file__).parent.parent / "data" / "adapters"


def shipped_adapters(base: str = "smollm2-135m") -> dict[str, Path]:
    """{task name: PEFT directory} of the adapters shipped for builtin `base`."""
    root = DATA / base
    found = {p.name: p for p in sorted(root.iterdir()) if (p / "adapter_config.json").is_file()} if root.is_dir() else {}
    if not found:
        raise BundleError(f"{root}: no shipped adapters found (broken installation?)")
    return found


def shipped_metrics(base: str = "smollm2-135m") -> dict:
    """PyTorch accuracy of each shipped adapter (and of the base) on its held-out prompts."""
    path = DATA / base / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}
