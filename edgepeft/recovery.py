"""Crash safety of the commands that write a bundle (export, add-adapter, remove-adapter).

Each has one commit point, an atomic rename: export renames its finished staging directory onto
the bundle; add-adapter and remove-adapter rename the new manifest onto the old. A process killed
at any moment therefore leaves the old bundle or the new one, plus leftovers that `recover`
removes: staging directories and `TMP_PREFIX` files, the previous bundle parked aside by an
interrupted export (put back when the new one did not land), and adapter files no manifest lists.

Writers hold `writer_lock` (an flock on the bundle's parent directory, released by the kernel
when the process dies) from their first write to their commit, so `recover` never removes a live
writer's files: it runs under the same lock, and the CLI runs it before every command.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import BundleError, EdgepeftError
from .files import DIR_MODE, TMP_PREFIX, read_json_object
from .layout import ADAPTER_NAME, ADAPTER_SUFFIX, FOLDERS, MANIFEST

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; writers are not serialised there
    fcntl = None


@contextlib.contextmanager
def writer_lock(bundle_dir: str | Path, blocking: bool = True) -> Iterator[bool]:
    """Hold the write lock of the folder that holds `bundle_dir`. Yields False, without the
    lock, when blocking=False and another process holds it (or the folder cannot be opened)."""
    parent = Path(bundle_dir).absolute().parent
    if fcntl is None:
        yield True
        return
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(parent, os.O_RDONLY)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError:  # BlockingIOError: a live writer holds it
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _listed_files(root: Path) -> set[str] | None:
    try:
        files = read_json_object(root / MANIFEST, EdgepeftError, "manifest").get("files")
    except EdgepeftError:
        return None
    return set(files) if isinstance(files, dict) else None


def recover(bundle_dir: str | Path) -> str | None:
    """Undo what an interrupted write left at `bundle_dir`; return a one-line account of it, or
    None when there was nothing to do. The caller holds `writer_lock(bundle_dir)`."""
    root = Path(bundle_dir).absolute()
    parent, name = root.parent, root.name
    if not parent.is_dir():
        return None
    state, removed = None, 0
    old = parent / f"{TMP_PREFIX}{name}.old"
    if old.is_dir() and not old.is_symlink() and (old / MANIFEST).is_file():
        if not root.exists():  # killed between parking the old bundle and moving the new one in
            os.replace(old, root)
            state = "kept the previous bundle (an export was interrupted before replacing it)"
        else:
            state = "the new bundle is in place (an export was interrupted while removing the old one)"
    for p in parent.iterdir():  # staging directories, the parked bundle, temporary files
        if p.name.startswith(f"{TMP_PREFIX}{name}."):
            _remove(p)
            removed += 1
    if root.is_dir() and not root.is_symlink():
        for folder in (root, *(root / f for f in FOLDERS)):
            if folder.is_dir() and not folder.is_symlink():
                for p in folder.iterdir():
                    if p.name.startswith(TMP_PREFIX):
                        _remove(p)
                        removed += 1
        listed = _listed_files(root)
        adapters = root / "adapters"
        if listed is not None and adapters.is_dir() and not adapters.is_symlink():
            # Written by an add-adapter killed before its manifest, or left by a remove-adapter
            # killed after it: in either case the manifest in place says what the bundle is.
            for p in adapters.iterdir():
                stem, suffix = os.path.splitext(p.name)
                if (f"adapters/{p.name}" not in listed and suffix in ADAPTER_SUFFIX.values()
                        and ADAPTER_NAME.match(stem) and p.is_file() and not p.is_symlink()):
                    p.unlink()
                    removed += 1
            if state is None and removed:
                state = "the bundle is as its manifest says (an interrupted command did not commit)"
    if state is None and not removed:
        return None
    tail = f"; removed {removed} leftover file{'s' if removed != 1 else ''}" if removed else ""
    return f"{root}: {state or 'an interrupted command left temporary files'}{tail}"


def recover_unlocked(bundle_dir: str | Path) -> str | None:
    """`recover` if no writer is at work on `bundle_dir` now (else None): for commands that only
    read a bundle, which must not wait for a writer. Never raises for a file-system error."""
    with writer_lock(bundle_dir, blocking=False) as locked:
        if not locked:
            return None
        try:
            return recover(bundle_dir)
        except OSError as e:
            return f"{bundle_dir}: could not clean up after an interrupted command ({e.strerror})"


@contextlib.contextmanager
def staging_dir(out: Path):
    """A fresh directory beside `out`; removed unless the caller moved it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with writer_lock(out):  # held until the new bundle is in place (see edgepeft.recovery)
        recover(out)  # leftovers of an earlier export or add-adapter killed half-way
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{out.name}.", dir=out.parent))
        os.chmod(tmp, DIR_MODE)
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished bundle into place; an existing bundle at `out` is replaced whole."""
    if out.exists():
        if not (out / MANIFEST).is_file() and any(out.iterdir()):
            raise BundleError(f"{out}: exists and is not an edgepeft bundle; refusing to overwrite it")
        old = out.parent / f"{TMP_PREFIX}{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
