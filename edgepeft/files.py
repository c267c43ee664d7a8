"""Atomic file writes and content hashes: every write in a bundle goes through here."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .limits import MAX_MANIFEST_BYTES

TMP_PREFIX = ".edgepeft-tmp-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create private (0600/0700) entries; bundles are meant to be shared and
# deployed, so what we rename into place gets the modes a plain open()/mkdir() would give.
FILE_MODE = 0o666 & ~_umask()
DIR_MODE = 0o777 & ~_umask()


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `dest`; on success rename it onto `dest`, else delete it.

    The temporary file lives in the destination's directory so the final rename is atomic
    (same file system), and a crash never leaves a half-written `dest`.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + dest.name + ".", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, FILE_MODE)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(dest: str | os.PathLike, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(dest: str | os.PathLike, obj) -> None:
    write_bytes_atomic(dest, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json_object(path: str | os.PathLike, error: type[Exception], what: str = "JSON") -> dict:
    """Parse `path` as a JSON object, raising `error` with a one-line message naming the file."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror})") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise error(f"{path}: corrupt {what} (larger than {MAX_MANIFEST_BYTES >> 20} MiB)")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, or an over-long integer
        raise error(f"{path}: corrupt {what} ({str(e).splitlines()[0][:120]})") from None
    except RecursionError:
        raise error(f"{path}: corrupt {what} (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: corrupt {what} (expected a JSON object)")
    return obj


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
