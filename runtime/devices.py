"""Which engine build and execution provider to use on this machine.

Pure selection logic over what the installed engines report (onnxruntime's available providers,
llama.cpp's GPU offload support), so it is testable with fakes, plus `probe()` that asks the real
engines and the OS for `edgepeft doctor`. Nothing here loads a model.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from edgepeft.byte_sizes import format_bytes
from edgepeft.errors import InvalidArgument

# --device value -> onnxruntime execution providers, best first; CPU is always appended as the
# fallback for operators a provider does not implement.
ONNX_PROVIDERS = {
    "cpu": [],
    "cuda": ["CUDAExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
    "coreml": ["CoreMLExecutionProvider"],
    "dml": ["DmlExecutionProvider"],
    "openvino": ["OpenVINOExecutionProvider"],
}
DEVICES = ("auto", *ONNX_PROVIDERS)
# What `auto` tries, in order. Only CUDA: the graph is made of onnxruntime's contrib operators
# (GroupQueryAttention, MatMulNBits, SkipSimplifiedLayerNormalization), which the CPU and CUDA
# providers implement; TensorRT needs an engine build on first load (minutes), and CoreML, DirectML
# and OpenVINO would run most of this graph on the CPU fallback anyway, so they are opt-in.
AUTO_ORDER = ("cuda",)


def check_device(device: str) -> None:
    """Refuse a --device value that names no device we know (InvalidArgument, exit 2)."""
    if device not in DEVICES:
        raise InvalidArgument(f"device {device!r} is not one of {', '.join(DEVICES)}")


@dataclass
class Choice:
    device: str          # what runs: cpu, cuda, tensorrt, coreml, dml, openvino, gpu (llama.cpp)
    providers: list      # onnxruntime providers (empty for GGUF)
    note: str | None     # one line to show when the choice differs from the request
    gpu_layers: int = 0  # llama.cpp layers offloaded


def pick_onnx(available: list[str], device: str = "auto") -> Choice:
    """Providers for `device` among `available` (onnxruntime.get_available_providers())."""
    check_device(device)
    if device == "auto":
        for candidate in AUTO_ORDER:
            wanted = ONNX_PROVIDERS[candidate]
            if all(p in available for p in wanted):
                return Choice(candidate, [*wanted, "CPUExecutionProvider"], None)
        return Choice("cpu", ["CPUExecutionProvider"], None)
    wanted = ONNX_PROVIDERS[device]
    missing = [p for p in wanted if p not in available]
    if missing:
        return Choice("cpu", ["CPUExecutionProvider"],
                      f"device {device}: this onnxruntime has no {missing[0]} (it has {', '.join(available)}); "
                      "running on the CPU")
    return Choice(device, [*wanted, "CPUExecutionProvider"], None)


def check_gpu_layers(gpu_layers: int | None) -> None:
    """Refuse a --gpu-layers value below -1 (-1, as llama.cpp's own tools take it, is every layer)."""
    if gpu_layers is not None and gpu_layers < -1:
        raise InvalidArgument(f"gpu layers {gpu_layers} must be -1 (every layer) or at least 0")


def pick_gguf(gpu_offload: bool, device: str = "auto", gpu_layers: int | None = None) -> Choice:
    """llama.cpp offload for `device`: all layers on the GPU when the build supports it (or
    `gpu_layers` of them; -1: all), none on the CPU."""
    check_device(device)
    check_gpu_layers(gpu_layers)
    if device == "cpu":
        return Choice("cpu", [], None, 0)
    if not gpu_offload:
        note = None if device == "auto" else (
            f"device {device}: this llama-cpp-python was built without GPU support; running on the CPU "
            "(rebuild it with CMAKE_ARGS=\"-DGGML_CUDA=on\" or -DGGML_METAL=on, see docs/devices.md)")
        return Choice("cpu", [], note, 0)
    layers = 999 if gpu_layers is None or gpu_layers == -1 else int(gpu_layers)
    return Choice("gpu" if layers else "cpu", [], None, layers)


# ---- probing the machine (doctor) -----------------------------------------------------------

CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "fma", "f16c", "asimd", "asimddp", "sve")


def _cpu() -> dict:
    info = {"machine": platform.machine(), "cores": os.cpu_count(), "model": platform.processor() or None,
            "features": []}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return info
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and not info["model"]:
            info["model"] = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    info["features"] = [f for f in CPU_FEATURES if f in flags]
    return info


def _memory() -> dict:
    out = {}
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        try:
            out["MemTotal"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            pass
    return {"total": out.get("MemTotal"), "available": out.get("MemAvailable")}


def _nvidia() -> list[dict]:
    """GPUs that nvidia-smi reports (a local command; absent on machines without the driver)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            gpus.append({"name": parts[0], "memory_mib": int(float(parts[1])), "driver": parts[2]})
    return gpus


# The pip distributions that install each engine module (the first is the one to reinstall).
_DISTRIBUTIONS = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino"),
                  "llama_cpp": ("llama-cpp-python",)}


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in _DISTRIBUTIONS.get(module, (module,)):
        try:
            return f"{version(dist)} ({dist})"
        except PackageNotFoundError:
            continue
    return None


def onnx_telemetry() -> str:
    """"off" when ORT_DISABLE_TELEMETRY holds a value onnxruntime reads as "disable" (edgepeft sets
    "1" unless the user set it, see edgepeft/__init__.py), else "on"."""
    return "off" if os.environ.get("ORT_DISABLE_TELEMETRY", "").lower() in ("1", "true", "yes") else "on"


# ---- does a native engine load here? ----------------------------------------------------------

# What the child process runs: llama.cpp's CPU backend initialises on the first backend call, and a
# build for instructions this CPU lacks (AVX-512 or AMX on an AVX2 machine, a wheel built on
# another host) dies there with SIGILL, which no Python code in the process can catch.
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
    cpu = _cpu()
    return "|".join([module, sys.executable, str(cpu["model"]), ",".join(cpu["features"]), *parts])


def native_load_problem(module: str, check: str, timeout: float = 120.0) -> str | None:
    """None when `check` (Python code that loads `module`'s native library) runs in a child
    process; else one line saying why not. A process that dies of a signal cannot report it, so
    the engine is tried where its death costs nothing. Successes are remembered per build
    (_build_signature) in the edgepeft cache, so the child runs once per installation."""
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
    dist = _DISTRIBUTIONS.get(module, (module,))[0]
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


def probe() -> dict:
    """What this machine offers: CPU, memory, GPUs, engines and their devices, and the choices
    `device="auto"` makes."""
    report = {"platform": platform.platform(), "python": platform.python_version(), "cpu": _cpu(),
              "memory": _memory(), "gpus": _nvidia(), "engines": {}}
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        choice = pick_onnx(available)
        report["engines"]["onnxruntime"] = {"version": _version("onnxruntime"), "providers": available,
                                            "auto": choice.device, "telemetry": onnx_telemetry()}
    else:
        report["engines"]["onnxruntime"] = None
    broken = llama_cpp_problem()  # None when it loads, or is not installed
    if broken:  # importing it here would kill this process too
        report["engines"]["llama_cpp"] = {"version": _version("llama_cpp"), "broken": broken}
    elif importlib.util.find_spec("llama_cpp") is not None:
        from edgepeft.llama_log import quiet_llama_cpp

        import llama_cpp

        quiet_llama_cpp(llama_cpp)

        gpu = bool(llama_cpp.llama_supports_gpu_offload())
        report["engines"]["llama_cpp"] = {"version": _version("llama_cpp"), "gpu_offload": gpu,
                                          "mmap": bool(llama_cpp.llama_supports_mmap()),
                                          "auto": pick_gguf(gpu).device}
    else:
        report["engines"]["llama_cpp"] = None
    report["advice"] = advice(report)
    return report


def advice(report: dict) -> list[str]:
    """Which bundle formats and precisions will run well here, from a probe() report."""
    out = []
    ort, llama = report["engines"].get("onnxruntime"), report["engines"].get("llama_cpp")
    feats = set(report["cpu"]["features"])
    if ort is None and llama is None:
        return ["no engine installed: pip install 'edgepeft[onnx]' or 'edgepeft[gguf]'"]
    if ort:
        if ort["auto"] == "cuda":
            out.append("onnx: CUDA available; fp16 (--onnx-quant fp16) or int4 bundles run on the GPU")
        else:
            vnni = feats & {"avx512_vnni", "avx_vnni", "asimddp", "amx_tile"}
            out.append("onnx: CPU; int4 bundles (MatMulNBits, accuracy level 4 = int8 compute) "
                       + ("use this CPU's int8 dot-product instructions" if vnni
                          else "run, without int8 dot-product instructions (expect lower speed)" if feats
                          else "run"))
    if llama and llama.get("broken"):
        out.append(f"gguf: {llama['broken']}")
    elif llama:
        out.append("gguf: GPU offload available (all layers by default)" if llama["gpu_offload"]
                   else "gguf: CPU build; Q4_K_M is the usual speed/quality balance, Q8_0 for quality")
    mem = report["memory"].get("available") or report["memory"].get("total")
    if mem and mem < 4 * 2**30:
        out.append(f"memory: {format_bytes(mem, 'GiB')} available; use --max-context and --max-resident-adapters "
                   "(see docs/devices.md)")
    return out
