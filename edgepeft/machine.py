"""What this machine is, for `edgepeft doctor` and for keying native-engine checks: its CPU and
features, memory (within a container's limit), GPUs, and the installed engines' versions. Reads
/proc, /sys/fs/cgroup and nvidia-smi; imports no engine."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "fma", "f16c", "asimd", "asimddp", "sve")


def cpu_info() -> dict:
    """Architecture, cores, model name and the CPU features engines care about."""
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


def memory_info() -> dict:
    """Total and available bytes; a container's memory limit (cgroup v2) bounds both."""
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
    total, available = out.get("MemTotal"), out.get("MemAvailable")
    limit, used = _cgroup("memory.max"), _cgroup("memory.current")
    if limit is not None and (total is None or limit < total):
        total = limit
        if used is not None:
            available = min(available if available is not None else limit, max(0, limit - used))
    return {"total": total, "available": available}


def _cgroup(name: str) -> int | None:
    """A number from this process's cgroup v2 directory ("max" or absent: None)."""
    try:
        value = (Path("/sys/fs/cgroup") / name).read_text().strip()
    except OSError:
        return None
    return int(value) if value.isdigit() else None


def nvidia_gpus() -> list[dict]:
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
DISTRIBUTIONS = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino"),
                  "llama_cpp": ("llama-cpp-python",)}


def engine_version(module: str) -> str | None:
    """"1.2.3 (distribution)" of the pip distribution that installed `module`, or None."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in DISTRIBUTIONS.get(module, (module,)):
        try:
            return f"{version(dist)} ({dist})"
        except PackageNotFoundError:
            continue
    return None


def onnx_telemetry() -> str:
    """"off" when ORT_DISABLE_TELEMETRY holds a value onnxruntime reads as "disable" (edgepeft sets
    "1" unless the user set it, see edgepeft/__init__.py), else "on"."""
    return "off" if os.environ.get("ORT_DISABLE_TELEMETRY", "").lower() in ("1", "true", "yes") else "on"
