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


def _map_checkout_layout() -> None:
    """In a checkout, runtime/ and exporters/ sit beside this package; installed, pyproject's
    package-dir puts them inside it as edgepeft.runtime and edgepeft.exporters. Map those two
    names the same way here, ahead of any other installation's finder, so that a checkout on
    sys.path imports as installed and never half from somewhere else."""
    import importlib.abc
    import importlib.util
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    root = here.parent
    folders = {f"{__name__}.{sub}": root / sub for sub in ("runtime", "exporters")}
    if (here / "runtime").is_dir() or not all((d / "__init__.py").is_file() for d in folders.values()):
        return  # installed (or not a checkout): the package already holds them

    class CheckoutLayout(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            folder = folders.get(name)
            if folder is None:
                return None
            return importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                          submodule_search_locations=[str(folder)])

    sys.meta_path.insert(0, CheckoutLayout())


_map_checkout_layout()
