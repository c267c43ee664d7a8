"""Writing a bundle with one commit point: a staging directory beside the target, moved into place
whole, under the bundle's writer lock (edgepeft/recovery.py cleans up after a killed writer); and
the progress bar of the steps in between."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from edgepeft.errors import BundleError, require
from edgepeft.files import DIR_MODE, TMP_PREFIX
from edgepeft.layout import MANIFEST
from edgepeft.recovery import recover, writer_lock


class Progress:
    """A step counter drawn with tqdm; silent with quiet=True."""

    def __init__(self, total: int, quiet: bool):
        self.bar = None
        if not quiet:
            tqdm = require("tqdm", "export").tqdm
            # disable=None: drawn on a terminal only, so piped stderr carries just our messages.
            self.bar = tqdm(total=total, unit="step", disable=None, leave=False,
                            bar_format="{desc:<40}{bar}| {n}/{total} [{elapsed}]")

    def step(self, desc: str):
        if self.bar:
            self.bar.set_description_str(desc)

    def done(self):
        if self.bar:
            self.bar.update(1)

    def close(self):
        if self.bar:
            self.bar.close()


@contextmanager
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
