"""Device selection with the engines' answers faked at the boundary, and `doctor` against the
real machine."""

import json
import os
import subprocess
import sys

import pytest

from edgepeft.runtime.devices import pick_gguf, pick_onnx

CPU = ["CPUExecutionProvider"]


def test_auto_picks_cuda_when_onnxruntime_has_it_else_cpu():
    assert pick_onnx(["CUDAExecutionProvider", *CPU]).providers == ["CUDAExecutionProvider", *CPU]
    assert pick_onnx(["TensorrtExecutionProvider", "CUDAExecutionProvider", *CPU]).device == "cuda"
    for others in ([], ["AzureExecutionProvider"], ["CoreMLExecutionProvider"], ["DmlExecutionProvider"]):
        choice = pick_onnx([*others, *CPU])
        assert (choice.device, choice.providers, choice.note) == ("cpu", CPU, None)


@pytest.mark.parametrize("device, provider", [("cuda", "CUDAExecutionProvider"), ("coreml", "CoreMLExecutionProvider"),
                                              ("dml", "DmlExecutionProvider"), ("openvino", "OpenVINOExecutionProvider")])
def test_explicit_device_uses_its_provider_or_falls_back_to_cpu_with_one_line(device, provider):
    assert pick_onnx([provider, *CPU], device).providers == [provider, *CPU]
    fallback = pick_onnx(CPU, device)
    assert fallback.device == "cpu" and fallback.providers == CPU
    assert provider in fallback.note and "\n" not in fallback.note


def test_tensorrt_keeps_cuda_for_what_tensorrt_does_not_run():
    both = ["TensorrtExecutionProvider", "CUDAExecutionProvider", *CPU]
    assert pick_onnx(both, "tensorrt").providers == both
    assert pick_onnx(["CUDAExecutionProvider", *CPU], "tensorrt").device == "cpu"


def test_gguf_offloads_all_or_some_layers_only_with_a_gpu_build():
    assert (pick_gguf(True).device, pick_gguf(True).gpu_layers) == ("gpu", 999)
    assert pick_gguf(True, "cuda", gpu_layers=10).gpu_layers == 10
    assert pick_gguf(True, "cpu").gpu_layers == 0
    auto_cpu = pick_gguf(False)
    assert (auto_cpu.device, auto_cpu.note) == ("cpu", None)
    asked = pick_gguf(False, "cuda")
    assert asked.device == "cpu" and "without GPU support" in asked.note
    with pytest.raises(ValueError):
        pick_onnx(CPU, "tpu")


def test_doctor_reports_this_machine():
    import onnxruntime as ort

    out = subprocess.run([sys.executable, "-m", "edgepeft", "doctor", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["cpu"]["cores"] == os.cpu_count()
    assert r["engines"]["onnxruntime"]["providers"] == ort.get_available_providers()
    assert r["engines"]["onnxruntime"]["auto"] == ("cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu")
    assert r["memory"]["total"] > 0 and r["advice"]
    text = subprocess.run([sys.executable, "-m", "edgepeft", "doctor"], capture_output=True, text=True).stdout
    assert "auto -> " in text and "cores" in text


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
    from edgepeft.runtime import devices

    pkg = tmp_path / "site" / "llama_cpp"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(_FAKE_LLAMA)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("EDGEPEFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(devices, "_checked", {})
    sys.modules.pop("llama_cpp", None)
    yield pkg
    sys.modules.pop("llama_cpp", None)


def test_a_native_engine_that_crashes_on_load_is_reported_in_one_line(fake_llama, monkeypatch):
    from edgepeft.runtime import devices

    monkeypatch.setenv("FAKE_LLAMA_CRASH", "1")
    problem = devices.llama_cpp_problem()
    assert problem and "SIGILL" in problem and "CPU instructions" in problem and "\n" not in problem
    assert "pip install --force-reinstall" in problem
    assert "llama_cpp" not in sys.modules  # the check never loads it into this process
    assert not (fake_llama.parent.parent / "cache" / "native-checks.json").exists()  # failures are not remembered


def test_a_native_engine_that_loads_is_checked_once_per_build(fake_llama, monkeypatch):
    from edgepeft.runtime import devices

    assert devices.llama_cpp_problem() is None
    store = fake_llama.parent.parent / "cache" / "native-checks.json"
    assert list(json.loads(store.read_text()).values()) == ["ok"]
    # Remembered on disk: a new process (no memo) runs no child, even where the child would now crash.
    monkeypatch.setattr(devices, "_checked", {})
    monkeypatch.setenv("FAKE_LLAMA_CRASH", "1")
    assert devices.llama_cpp_problem() is None
    # A different build (its files changed) is checked again.
    monkeypatch.setattr(devices, "_checked", {})
    (fake_llama / "__init__.py").write_text(_FAKE_LLAMA + "\n# rebuilt\n")
    assert "SIGILL" in devices.llama_cpp_problem()


def test_a_load_that_hangs_is_a_problem_said_once(fake_llama):
    import time

    from edgepeft.runtime import devices

    problem = devices.native_load_problem("llama_cpp", "import time; time.sleep(30)", timeout=1)
    assert problem == "llama-cpp-python: loading its native library did not finish in 1 s"
    start = time.monotonic()  # the same build in the same process: no second child, no second wait
    assert devices.native_load_problem("llama_cpp", "import time; time.sleep(30)", timeout=1) == problem
    assert time.monotonic() - start < 0.5


def test_a_failing_import_is_a_one_line_problem_too(fake_llama):
    from edgepeft.runtime import devices

    (fake_llama / "__init__.py").write_text("raise ImportError('libllama.so: cannot open shared object file')\n")
    problem = devices.llama_cpp_problem()
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
