"""Whether a native engine library loads on this machine, asked in a child process: a build for
CPU instructions this machine lacks dies of SIGILL, which no Python code in the process can
catch. A build that loads is remembered per installation in the edgepeft cache."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
from pathlib import Path

from .machine import DISTRIBUTIONS, cpu_info

# What the child process runs: llama.cpp's CPU backend initialises on the first backend call,
# where a build for other CPUs (AVX-512 or AMX on an AVX2 machine) dies.
LLAMA_CPP_CHECK = "import llama_cpp; llama_cpp.llama_backend_init(); llama_cpp.llama_supports_gpu_offload()"
_CHECKS_FILE = "native-checks.json"
_checked: dict[str, str | None] = {}


def _build_signature(module: str) -> str | None:
    """A key for one installed build of `module` on this CPU: its files' names, sizes and times,
    the interpreter, and the CPU's model and features. None when the module is not installed."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        return None
    root = Path(spec.origin).parent
    parts = []
    for f in sorted(root.rglob("*")):
        if f.is_file() and f.suffix in (".so", ".dylib", ".dll", ".py"):
            st = f.stat()
            parts.append(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}")
    cpu = cpu_info()
    return "|".join([module, sys.executable, str(cpu["model"]), ",".join(cpu["features"]), *parts])


def native_load_problem(module: str, check: str, timeout: float = 120.0) -> str | None:
    """None when `check` (Python code that loads `module`'s native library) runs in a child
    process; else one line saying why not. Successes are remembered per build (_build_signature),
    so the child runs once per installation."""
    from edgepeft.cache import cache_dir
    from edgepeft.files import read_json_object, write_json_atomic

    key = _build_signature(module)
    if key is None:
        return None  # not installed: the caller's require() says so
    if key in _checked:
        return _checked[key]
    store = cache_dir() / _CHECKS_FILE
    try:  # a missing or corrupt record only means the child runs again
        known = read_json_object(store, ValueError, "native checks") if store.is_file() else {}
    except ValueError:
        known = {}
    if known.get(key) == "ok":
        _checked[key] = None
        return None
    dist = DISTRIBUTIONS.get(module, (module,))[0]
    try:
        r = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        r = None
    if r is None:
        problem = f"{dist}: loading its native library did not finish in {timeout:.0f} s"
    elif r.returncode < 0:
        try:
            name = signal.Signals(-r.returncode).name
        except ValueError:
            name = f"signal {-r.returncode}"
        why = ("built for CPU instructions this machine lacks" if name == "SIGILL" else "the build is broken here")
        problem = (f"{dist} crashes on load ({name}: {why}); rebuild it on this machine: "
                   f"pip install --force-reinstall --no-cache-dir --no-deps {dist}")
    elif r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no message"])[-1][:200]
        problem = f"{dist} fails to load ({last})"
    else:
        problem = None
        try:
            store.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(store, {**known, key: "ok"})
        except OSError:
            pass  # a read-only cache only means the check runs again next time
    _checked[key] = problem
    return problem


def llama_cpp_problem() -> str | None:
    """native_load_problem for llama-cpp-python (None when it loads, or is not installed)."""
    return native_load_problem("llama_cpp", LLAMA_CPP_CHECK)


def llama_cpp_amx_problem(system_info: str, cpu_features: list[str]) -> str | None:
    """One line when a llama.cpp build (its llama_print_system_info) multiplies with AMX on a CPU
    that has it: those kernels crash on quantized prefills (llama.cpp issue 20824), past what a
    load check can see."""
    if "AMX_INT8 = 1" not in system_info or "amx_tile" not in cpu_features:
        return None
    return ("llama-cpp-python uses AMX kernels here, which crash on quantized GGUF prefills (llama.cpp issue "
            "20824); rebuild it without them: CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON "
            "-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON\" pip install --force-reinstall --no-cache-dir --no-deps "
            "llama-cpp-python")
