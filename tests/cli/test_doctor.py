"""`edgepeft doctor` against the real machine, and its advice from reports made up here."""

import json
import os
import subprocess
import sys

from edgepeft.cli.doctor import advice
from edgepeft.native_check import llama_cpp_amx_problem


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


def report(memory: int | None = None, llama: dict | None = None, features=("avx2",)) -> dict:
    return {"cpu": {"features": list(features)}, "memory": {"total": memory, "available": memory},
            "engines": {"onnxruntime": {"auto": "cpu"}, "llama_cpp": llama}}


def test_small_memory_reads_in_a_unit_that_shows_it():
    (line,) = [a for a in advice(report(memory=300 * 2**20)) if a.startswith("memory")]
    assert "300.0 MiB available" in line  # not "0.3 GiB", nor "0.0 GiB" for a few MiB


def test_a_llama_cpp_build_with_amx_kernels_on_an_amx_cpu_is_a_problem_in_the_advice():
    info = "CPU : SSE3 = 1 | AVX512 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | "
    problem = llama_cpp_amx_problem(info, ["avx512f", "amx_tile"])
    assert problem and "AMX" in problem and "GGML_NATIVE=OFF" in problem and "\n" not in problem
    assert llama_cpp_amx_problem(info.replace("AMX_INT8 = 1", "AMX_INT8 = 0"), ["amx_tile"]) is None
    assert llama_cpp_amx_problem(info, ["avx512f"]) is None  # the kernels never run without AMX
    llama = {"gpu_offload": False, "problem": problem}
    assert f"gguf: {problem}" in advice(report(llama=llama))
