"""An offline tool leaves nothing behind but what it was asked for: exporting and running a bundle
in a fresh HOME writes only the bundle and edgepeft's cache. onnxruntime's telemetry (a device id
and an event database under ~/.cache/Microsoft) is off unless the user turns it on."""

import json
import os
import subprocess
import sys
from pathlib import Path

from edgepeft.machine import onnx_telemetry

# Variables that point a library's files away from HOME would hide what it writes there.
MOVED = ("XDG_", "HF_", "TRANSFORMERS_", "TORCH", "TRITON_", "ORT_", "EDGEPEFT_")


def fresh_env(root: Path) -> dict:
    home, tmp = root / "home", root / "tmp"
    home.mkdir()
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(MOVED)}
    return {**env, "HOME": str(home), "TMPDIR": str(tmp), "EDGEPEFT_CACHE": str(home / ".cache" / "edgepeft")}


def edgepeft(env: dict, *args) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "edgepeft", *map(str, args)], capture_output=True, text=True,
                       env=env, cwd=env["HOME"])
    assert p.returncode == 0, p.stderr
    return p


def strays(root: Path, allowed: list[Path]) -> list[str]:
    """Paths under `root` that are neither inside an allowed folder nor a folder on the way to one."""
    out = []
    for p in root.rglob("*"):
        inside = any(p == a or a in p.parents for a in allowed)
        on_the_way = p.is_dir() and any(p in a.parents for a in allowed)
        if not (inside or on_the_way):
            out.append(str(p.relative_to(root)))
    return sorted(out)


def test_export_and_run_in_a_fresh_home_write_only_the_bundle_and_the_cache(tiny_llama, llama_adapters, tmp_path):
    env = fresh_env(tmp_path)
    home, tmp, cache = Path(env["HOME"]), Path(env["TMPDIR"]), Path(env["EDGEPEFT_CACHE"])
    bundle = home / "bundles" / "b"
    edgepeft(env, "export", tiny_llama, "--out", bundle, "--format", "onnx,gguf", "--onnx-quant", "fp32",
             "--gguf-quant", "F32", "--adapter", f"qv={llama_adapters['qv']}", "--quiet")
    assert (bundle / "edgepeft.json").is_file()
    assert strays(home, [bundle, cache]) == []
    # importing torch (through transformers) makes an empty cache folder in TMPDIR; no file may land there
    assert [p for p in tmp.rglob("*") if not p.is_dir()] == []
    tmp_before = sorted(tmp.rglob("*"))

    for backend in ("onnx", "gguf"):
        out = edgepeft(env, "run", bundle, "--backend", backend, "--adapter", "qv", "--json",
                       "--max-new-tokens", "3", "hello")
        assert json.loads(out.stdout)["backend"] == backend
    report = json.loads(edgepeft(env, "doctor", "--json").stdout)
    assert report["engines"]["onnxruntime"]["telemetry"] == "off"
    assert strays(home, [bundle, cache]) == []
    assert sorted(tmp.rglob("*")) == tmp_before  # the runtime writes nothing there at all


def test_a_user_can_turn_onnxruntime_telemetry_back_on(tmp_path, monkeypatch):
    code = "import os, edgepeft; print(os.environ['ORT_DISABLE_TELEMETRY'])"
    env = fresh_env(tmp_path)
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout == "1\n"
    env["ORT_DISABLE_TELEMETRY"] = "0"  # the user's choice wins over edgepeft's default
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout == "0\n"
    monkeypatch.setenv("ORT_DISABLE_TELEMETRY", "0")
    assert onnx_telemetry() == "on"
    monkeypatch.setenv("ORT_DISABLE_TELEMETRY", "1")
    assert onnx_telemetry() == "off"
