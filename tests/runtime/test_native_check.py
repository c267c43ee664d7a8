"""Whether a native engine loads here: a llama_cpp stand-in that dies of SIGILL, hangs or fails
to import, checked in a child process and remembered per build; doctor, run and export survive it."""

import json
import os
import subprocess
import sys

import pytest


# A stand-in for llama-cpp-python whose backend init dies as a build for the wrong CPU does
# (SIGILL, which no Python code in the process can catch). Only the child process ever runs it.
_FAKE_LLAMA = """
import os, signal
def llama_backend_init():
    if os.environ.get("FAKE_LLAMA_CRASH"):
        os.kill(os.getpid(), signal.SIGILL)
def llama_supports_gpu_offload():
    return False
def llama_supports_mmap():
    return True
"""


@pytest.fixture
def fake_llama(tmp_path, monkeypatch):
    """A fake llama_cpp importable here and in child processes, a fresh cache, and no memo."""
    from edgepeft import native_check

    pkg = tmp_path / "site" / "llama_cpp"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(_FAKE_LLAMA)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("EDGEPEFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native_check, "_checked", {})
    sys.modules.pop("llama_cpp", None)
    yield pkg
    sys.modules.pop("llama_cpp", None)


def test_a_native_engine_that_crashes_on_load_is_reported_in_one_line(fake_llama, monkeypatch):
    from edgepeft import native_check

    monkeypatch.setenv("FAKE_LLAMA_CRASH", "1")
    problem = native_check.llama_cpp_problem()
    assert problem and "SIGILL" in problem and "CPU instructions" in problem and "\n" not in problem
    assert "pip install --force-reinstall" in problem
    assert "llama_cpp" not in sys.modules  # the check never loads it into this process
    assert not (fake_llama.parent.parent / "cache" / "native-checks.json").exists()  # failures are not remembered


def test_a_native_engine_that_loads_is_checked_once_per_build(fake_llama, monkeypatch):
    from edgepeft import native_check

    assert native_check.llama_cpp_problem() is None
    store = fake_llama.parent.parent / "cache" / "native-checks.json"
    assert list(json.loads(store.read_text()).values()) == ["ok"]
    # Remembered on disk: a new process (no memo) runs no child, even where the child would now crash.
    monkeypatch.setattr(native_check, "_checked", {})
    monkeypatch.setenv("FAKE_LLAMA_CRASH", "1")
    assert native_check.llama_cpp_problem() is None
    # A different build (its files changed) is checked again.
    monkeypatch.setattr(native_check, "_checked", {})
    (fake_llama / "__init__.py").write_text(_FAKE_LLAMA + "\n# rebuilt\n")
    assert "SIGILL" in native_check.llama_cpp_problem()


def test_a_load_that_hangs_is_a_problem_said_once(fake_llama):
    import time

    from edgepeft import native_check

    problem = native_check.native_load_problem("llama_cpp", "import time; time.sleep(30)", timeout=1)
    assert problem == "llama-cpp-python: loading its native library did not finish in 1 s"
    start = time.monotonic()  # the same build in the same process: no second child, no second wait
    assert native_check.native_load_problem("llama_cpp", "import time; time.sleep(30)", timeout=1) == problem
    assert time.monotonic() - start < 0.5


def test_a_failing_import_is_a_one_line_problem_too(fake_llama):
    from edgepeft import native_check

    (fake_llama / "__init__.py").write_text("raise ImportError('libllama.so: cannot open shared object file')\n")
    problem = native_check.llama_cpp_problem()
    assert problem.startswith("llama-cpp-python fails to load (") and "libllama.so" in problem


def test_doctor_export_and_the_gguf_backend_survive_a_crashing_llama_cpp(fake_llama, monkeypatch, llama_bundle,
                                                                          tiny_llama, tmp_path):
    monkeypatch.setenv("FAKE_LLAMA_CRASH", "1")
    out = subprocess.run([sys.executable, "-m", "edgepeft", "doctor"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "cannot load here" in out.stdout and "SIGILL" in out.stdout
    r = json.loads(subprocess.run([sys.executable, "-m", "edgepeft", "doctor", "--json"],
                                  capture_output=True, text=True).stdout)
    assert "SIGILL" in r["engines"]["llama_cpp"]["broken"]
    # Opening a GGUF bundle says so in one line and exits 1, instead of the process dying.
    run = subprocess.run([sys.executable, "-m", "edgepeft", "run", str(llama_bundle.root), "hi", "--backend", "gguf"],
                         capture_output=True, text=True)
    assert run.returncode != 0 and run.returncode > 0, run.stderr  # an error exit, not death by a signal
    assert "SIGILL" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    # A quantized GGUF export refuses before anything slow, and writes nothing.
    out_dir = tmp_path / "q4"
    export = subprocess.run([sys.executable, "-m", "edgepeft", "export", str(tiny_llama), "--out", str(out_dir),
                             "--format", "gguf", "--gguf-quant", "Q4_K_M"], capture_output=True, text=True)
    assert export.returncode == 1 and "SIGILL" in export.stderr and len(export.stderr.strip().splitlines()) == 1
    assert not out_dir.exists()
