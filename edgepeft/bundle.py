"""The bundle: a directory with edgepeft.json (the manifest) and the files it lists.

Layout (docs/bundle.md has every manifest field):
    edgepeft.json, tokenizer.json, tokenizer_config.json, ...
    onnx/model.onnx (+ model.onnx.data), gguf/base-<QUANT>.gguf,
    adapters/<name>.onnx_adapter, adapters/<name>.gguf
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import BundleError, unknown_adapter
from .files import read_json_object, sha256_file, write_json_atomic
# The layout names are re-exported here, where readers of a bundle have always found them.
from .layout import ADAPTER_NAME, ADAPTER_SUFFIX, MANIFEST, adapter_file, check_adapter_name  # noqa: F401
from .limits import MAX_ADAPTER_FILE_BYTES, MAX_ADAPTERS, MAX_MANIFEST_FILES, MAX_RANK
from .recovery import recover, writer_lock

FORMAT = "edgepeft-bundle"
FORMAT_VERSION = 1

# GGUF adapters carry their base's fingerprint under this key (stock llama.cpp ignores it).
GGUF_FINGERPRINT_KEY = "edgepeft.base_fingerprint"

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Base dims every reader of a bundle relies on (inspect, the runtime's checks).
_DIMS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size")


def _need(ok: bool, path: Path, what: str) -> None:
    if not ok:
        raise BundleError(f"{path}: {what}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_manifest_schema(m: dict, path: Path) -> None:
    """The manifest's structure: every field a reader of the bundle indexes exists with its type,
    within the limits of edgepeft.limits. Contents of files are checked elsewhere."""
    for key in ("base", "tokenizer", "backends", "adapters", "files"):
        _need(isinstance(m.get(key), dict), path, f"field {key!r} is missing or not an object")
    files, base = m["files"], m["base"]
    _need(len(files) <= MAX_MANIFEST_FILES, path, f"lists more than {MAX_MANIFEST_FILES} files")
    for rel, info in files.items():
        _need(isinstance(info, dict) and _is_int(info.get("size")) and info["size"] >= 0
              and isinstance(info.get("sha256"), str) and bool(_SHA256.match(info["sha256"])),
              path, f"file entry {rel[:80]!r} needs an integer size and a sha256")
    _need(isinstance(base.get("fingerprint"), str), path, "base.fingerprint is missing")
    dims = base.get("dims")
    _need(isinstance(dims, dict) and all(_is_int(dims.get(k)) and dims[k] > 0 for k in _DIMS),
          path, f"base.dims needs positive integers {', '.join(_DIMS)}")
    tok = m["tokenizer"]
    _need(isinstance(tok.get("files", []), list) and all(isinstance(f, str) for f in tok.get("files", [])),
          path, "tokenizer.files must be a list of paths")
    _need(all(f in files for f in tok.get("files", [])), path, "a tokenizer file is not in 'files'")
    _need(isinstance(tok.get("eos_token_ids") or [], list) and all(_is_int(i) for i in tok.get("eos_token_ids") or []),
          path, "tokenizer.eos_token_ids must be a list of integers")
    for name, info in m["backends"].items():
        _need(name in ADAPTER_SUFFIX, path, f"unknown backend {name[:40]!r}")
        _need(isinstance(info, dict) and isinstance(info.get("model"), str) and info["model"] in files
              and isinstance(info.get("quant"), str),
              path, f"backend {name!r} needs a model listed in 'files' and a quant")
        _need(_is_int(info.get("context_length")) and info["context_length"] > 0, path,
              f"backend {name!r} needs a positive context_length")
        if name == "onnx":
            kv = info.get("kv")
            _need(isinstance(kv, dict) and all(_is_int(kv.get(k)) and kv[k] > 0
                                               for k in ("num_layers", "num_kv_heads", "head_dim")),
                  path, "backend 'onnx' needs kv.num_layers, kv.num_kv_heads, kv.head_dim")
            _need(isinstance(info.get("slots", []), list), path, "backend 'onnx' slots must be a list")
    _need(len(m["adapters"]) <= MAX_ADAPTERS, path, f"lists more than {MAX_ADAPTERS} adapters")
    for name, entry in m["adapters"].items():
        _need(bool(ADAPTER_NAME.match(name)), path, f"adapter name {name[:80]!r} is invalid")
        _need(isinstance(entry, dict) and isinstance(entry.get("files"), dict), path,
              f"adapter {name!r} needs a 'files' object")
        rank = entry.get("rank")
        ranks = rank if isinstance(rank, list) else [rank] if rank is not None else []
        _need(all(_is_int(r) and 0 <= r <= MAX_RANK for r in ranks), path,
              f"adapter {name!r} rank {str(rank)[:40]} is outside 0..{MAX_RANK}")
        for backend, rel in entry["files"].items():
            # An adapter's file is exactly adapters/<name><suffix>: never a base file or another's.
            _need(backend in ADAPTER_SUFFIX and rel == adapter_file(name, backend), path,
                  f"adapter {name!r} file {str(rel)[:80]!r} is not {ADAPTER_SUFFIX.get(backend, '?')} under adapters/")
            _need(rel in files, path, f"adapter {name!r} file {rel} is not in 'files'")
            _need(files[rel]["size"] <= MAX_ADAPTER_FILE_BYTES, path,
                  f"adapter {name!r} file is larger than {MAX_ADAPTER_FILE_BYTES >> 30} GiB")


@dataclass
class Bundle:
    """A bundle directory and its parsed manifest."""

    root: Path
    manifest: dict

    # ---- reading ---------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path, verify_hashes: bool = False) -> "Bundle":
        """Read and check a bundle before anything native touches its files: the manifest's
        schema and version, every path (inside the bundle, symlinks included), every file's size
        and sha256 (from the hash cache when the file is unchanged since it was last hashed;
        `verify_hashes=True` re-reads every file)."""
        root = Path(root)
        path = root / MANIFEST
        if not root.is_dir():
            raise BundleError(f"{root}: not a bundle directory (does not exist)")
        if not path.is_file():
            raise BundleError(f"{root}: not a bundle ({MANIFEST} is missing)")
        bundle = cls(root, {})
        bundle.file(MANIFEST)  # a manifest symlinked from elsewhere is refused like any file
        bundle.manifest = read_json_object(path, BundleError, "manifest")
        bundle.validate()
        bundle.check_hashes(full=verify_hashes)
        return bundle

    def validate(self) -> None:
        """Check the manifest's schema and that every file it lists exists with its size."""
        m, path = self.manifest, self.root / MANIFEST
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise BundleError(f"{path}: not an edgepeft manifest")
        if m.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"{path}: format version {str(m.get('format_version'))[:20]} is not supported "
                f"(this edgepeft reads {FORMAT_VERSION})"
            )
        for rel in m.get("files") if isinstance(m.get("files"), dict) else ():
            self.file(rel)  # paths first: a path that leaves the bundle is the clearest message
        check_manifest_schema(m, path)
        for rel, info in m["files"].items():
            f = self.file(rel)
            if not f.is_file():
                raise BundleError(f"{f}: listed in the manifest but missing")
            if f.stat().st_size != info["size"]:
                raise BundleError(f"{f}: size differs from the manifest (truncated or replaced?)")

    def file(self, rel: str) -> Path:
        """Resolve a manifest-relative path, refusing anything that escapes the bundle: absolute
        paths, `..`, and symlinks (of the file or a folder on its way) that lead outside."""
        if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel \
                or (p := Path(rel)).is_absolute() or ".." in p.parts:
            raise BundleError(f"{self.root / MANIFEST}: path {str(rel)[:80]!r} escapes the bundle")
        f = self.root / p
        try:
            inside = f.resolve().is_relative_to(self.root.resolve())
        except (OSError, RuntimeError):  # a symlink loop
            inside = False
        if not inside:
            raise BundleError(f"{f}: a symlink that leads outside the bundle; refused")
        return f

    def check_hashes(self, full: bool = False) -> None:
        """sha256 of every listed file against the manifest. full=False trusts the hash cache for
        files unchanged (device, inode, size, mtime) since they were last hashed."""
        from .hash_cache import file_hashes

        files = {self.file(rel): info["sha256"] for rel, info in self.manifest["files"].items()}
        try:
            got = file_hashes(list(files), use_cache=not full)
        except OSError as e:
            raise BundleError(f"{self.root}: cannot read a bundle file ({e})") from None
        for f, want in files.items():
            if got[f] != want:
                raise BundleError(f"{f}: sha256 differs from the manifest (corrupt or modified)")

    def verify_hashes(self) -> None:
        """Full sha256 check of every file, bypassing the hash cache (`verify` and
        `--verify-hashes` run it)."""
        self.check_hashes(full=True)

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
            raise unknown_adapter(name, self.adapters, self.root)
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
    with writer_lock(bundle_dir):
        recover(bundle_dir)
        bundle = Bundle.open(bundle_dir)
        entry = bundle.adapters.pop(name, None)
        if entry is None:
            raise unknown_adapter(name, bundle.adapters, bundle.root)
        rels = list((entry.get("files") or {}).values())
        for rel in rels:
            bundle.forget_file(rel)
        bundle.save()  # the commit point; files left by a kill after it are removed by recover()
        for rel in rels:
            bundle.file(rel).unlink(missing_ok=True)
    return bundle
