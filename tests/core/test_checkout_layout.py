"""A checkout on sys.path imports as the installed package does: edgepeft.runtime and
edgepeft.exporters come from the checkout's runtime/ and exporters/, whatever else is installed."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import sys
# No installation's finder: only this checkout, first on the path.
sys.meta_path[:] = [f for f in sys.meta_path if not str(getattr(f, "__module__", "")).startswith("__editable__")]
sys.path.insert(0, {root!r})
import edgepeft.runtime.engine, edgepeft.exporters.reuse, edgepeft.exporters.archs.base
for m in ("edgepeft", "edgepeft.runtime.engine", "edgepeft.exporters.reuse", "edgepeft.exporters.archs.base"):
    print(sys.modules[m].__file__)
"""


def test_a_checkout_imports_its_runtime_and_exporters_under_the_installed_names(tmp_path):
    out = subprocess.run([sys.executable, "-P", "-c", CHILD.format(root=str(ROOT))], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    files = [Path(line) for line in out.stdout.split()]
    assert [f.relative_to(ROOT).as_posix() for f in files] == [
        "edgepeft/__init__.py", "runtime/engine.py", "exporters/reuse.py", "exporters/archs/base.py"]
