"""The bundle: a directory with edgepeft.json (the manifest) and the files it lists.

Layout (see docs/bundle.md):
    edgepeft.json, tokenizer.json, tokenizer_config.json,
    onnx/model.onnx (+ model.onnx.data), adapters/<name>.onnx_adapter
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import BundleError
from .files import read_json_object, sha256_file, write_json_atomic

MANIFEST = "edgepeft.json"
FORMAT = "edgepeft-bundle"
FORMAT_VERSION = 1
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# Suffix of each backend's adapter file.
ADAPTER_SUFFIX = {"onnx": ".onnx_adapter", "gguf": ".gguf"}


def check_adapter_name(name: str) -> str:
    if not ADAPTER_NAME.match(name) or name in (".", ".."):
        raise BundleError(
            f"adapter name {name!r} is invalid: use letters, digits, '_', '-', '.', at most 64"
        )
    return name


def adapter_file(name: str, backend: str) -> str:
    return f"adapters/{name}{ADAPTER_SUFFIX[backend]}"


@dataclass
class Bundle:
    """A bundle directory and its parsed manifest."""

    root: Path
    manifest: dict

    # ---- reading ---------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path) -> "Bundle":
        root = Path(root)
        path = root / MANIFEST
        if not root.is_dir():
            raise BundleError(f"{root}: not a bundle directory (does not exist)")
        if not path.is_file():
            raise BundleError(f"{root}: not a bundle ({MANIFEST} is missing)")
        bundle = cls(root, read_json_object(path, BundleError, "manifest"))
        bundle.validate()
        return bundle

    def validate(self) -> None:
        """Check the manifest's structure and that every file it lists exists with its size."""
        m, path = self.manifest, self.root / MANIFEST
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise BundleError(f"{path}: not an edgepeft manifest")
        if m.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"{path}: format version {m.get('format_version')} is not supported "
                f"(this edgepeft reads {FORMAT_VERSION})"
            )
        for key, typ in (("base", dict), ("tokenizer", dict), ("backends", dict),
                         ("adapters", dict), ("files", dict)):
            if not isinstance(m.get(key), typ):
                raise BundleError(f"{path}: field {key!r} is missing or not an object")
        for rel, info in m["files"].items():
            f = self.file(rel)
            if not f.is_file():
                raise BundleError(f"{f}: listed in the manifest but missing")
            if not isinstance(info, dict) or f.stat().st_size != info.get("size"):
                raise BundleError(f"{f}: size differs from the manifest (truncated or replaced?)")
        for name, entry in m["adapters"].items():
            for rel in (entry.get("files") or {}).values():
                if rel not in m["files"]:
                    raise BundleError(f"{path}: adapter {name!r} file {rel} is not in 'files'")

    def file(self, rel: str) -> Path:
        """Resolve a manifest-relative path, refusing anything that escapes the bundle."""
        p = Path(rel)
        if p.is_absolute() or ".." in p.parts:
            raise BundleError(f"{self.root / MANIFEST}: path {rel!r} escapes the bundle")
        return self.root / p

    def verify_hashes(self) -> None:
        """Full sha256 check of every file (slow for big bases; `verify` runs it)."""
        for rel, info in self.manifest["files"].items():
            if sha256_file(self.file(rel)) != info.get("sha256"):
                raise BundleError(f"{self.file(rel)}: sha256 differs from the manifest (corrupt?)")

    @property
    def base(self) -> dict:
        return self.manifest["base"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["base"]["fingerprint"]

    @property
    def adapters(self) -> dict[str, dict]:
        return self.manifest["adapters"]

    @property
    def backends(self) -> dict[str, dict]:
        return self.manifest["backends"]

    def adapter_path(self, name: str, backend: str) -> Path:
        entry = self.adapters.get(name)
        if entry is None:
            raise BundleError(f"{self.root}: no adapter named {name!r} (have: {', '.join(self.adapters) or 'none'})")
        rel = (entry.get("files") or {}).get(backend)
        if rel is None:
            raise BundleError(f"{self.root}: adapter {name!r} has no {backend} file")
        return self.file(rel)

    # ---- writing ---------------------------------------------------------------------------
    def record_file(self, rel: str) -> None:
        f = self.file(rel)
        self.manifest["files"][rel] = {"sha256": sha256_file(f), "size": f.stat().st_size}

    def forget_file(self, rel: str) -> None:
        self.manifest["files"].pop(rel, None)

    def save(self) -> None:
        """Write the manifest atomically (the last step of every command that changes a bundle)."""
        self.manifest["created_by"] = f"edgepeft {__version__}"
        write_json_atomic(self.root / MANIFEST, self.manifest)


def new_manifest(base: dict, tokenizer: dict) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": f"edgepeft {__version__}",
        "base": base,
        "tokenizer": tokenizer,
        "backends": {},
        "adapters": {},
        "files": {},
    }


def remove_adapter(bundle_dir: str | Path, name: str) -> Bundle:
    """Drop an adapter: the manifest first (atomically), then its files."""
    bundle = Bundle.open(bundle_dir)
    entry = bundle.adapters.pop(name, None)
    if entry is None:
        raise BundleError(f"{bundle.root}: no adapter named {name!r} (have: {', '.join(bundle.adapters) or 'none'})")
    rels = list((entry.get("files") or {}).values())
    for rel in rels:
        bundle.forget_file(rel)
    bundle.save()
    for rel in rels:
        bundle.file(rel).unlink(missing_ok=True)
    return bundle
