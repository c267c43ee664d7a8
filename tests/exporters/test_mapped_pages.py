"""mapped_pages.released: the pages a mapping of a file has read stop counting in this process's
RSS while the block runs, and the mapping still reads the file's bytes."""

import mmap
import sys
import time

import numpy as np
import pytest

from edgepeft.exporters import mapped_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self/maps: Linux")

SIZE = 64 << 20


def _resident(start: int) -> int:
    """Resident bytes of the mapping that begins at `start` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if "-" in line.split(maxsplit=1)[0] and not line.startswith(("Rss", "Size")):
                inside = int(line.split("-", 1)[0], 16) == start
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no mapping at {start:#x}")


def test_pages_read_through_a_mapping_are_released_and_read_again_from_the_file(tmp_path):
    path = tmp_path / "weights.bin"
    data = np.random.default_rng(0).integers(0, 256, SIZE, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        view = np.frombuffer(m, np.uint8)
        (start, _), = mapped_pages.mappings(path)
        assert int(view.sum(dtype=np.int64)) == int(data.sum(dtype=np.int64))  # every page read
        before = _resident(start)
        assert before > SIZE // 2
        with mapped_pages.released(path, every_s=0.05):
            time.sleep(0.5)
            during = _resident(start)
        assert during < before // 4, (before, during)
        assert np.array_equal(view, data)  # read again, from the file
        del view


def test_a_file_not_mapped_has_no_mappings(tmp_path):
    path = tmp_path / "none.bin"
    path.write_bytes(b"x")
    assert mapped_pages.mappings(path) == []
    with mapped_pages.released(path, every_s=0.01):
        time.sleep(0.05)
