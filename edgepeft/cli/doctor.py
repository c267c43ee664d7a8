"""Show what this machine offers for running bundles: CPU and its features, memory, GPUs, the
installed engines (onnxruntime and its execution providers, llama-cpp-python and its GPU
offload), what `--device auto` picks for each backend, and which formats and precisions will run
well here. Reads nothing from the network and loads no model."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from edgepeft import __version__
    from edgepeft.byte_sizes import format_bytes
    from edgepeft.runtime.devices import probe

    r = probe()
    r["edgepeft"] = __version__
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    cpu, mem = r["cpu"], r["memory"]
    print(f"edgepeft {__version__} on {r['platform']}, Python {r['python']}")
    print(f"cpu      {cpu['model'] or cpu['machine']}, {cpu['cores']} cores; features: {', '.join(cpu['features']) or 'none detected'}")
    print(f"memory   {format_bytes(mem['total'], 'GiB')} total, {format_bytes(mem['available'], 'GiB')} available")
    print("gpu      " + ("; ".join(f"{g['name']} ({g['memory_mib']} MiB, driver {g['driver']})" for g in r["gpus"])
                         or "none found (no nvidia-smi)"))
    ort, llama = r["engines"]["onnxruntime"], r["engines"]["llama_cpp"]
    print("onnx     " + (f"onnxruntime {ort['version']}; providers: {', '.join(ort['providers'])}; auto -> {ort['auto']}; "
                         f"telemetry {ort['telemetry']}"
                         if ort else "not installed (pip install 'edgepeft[onnx]' or 'edgepeft[onnx-gpu]')"))
    if not llama:
        gguf = "not installed (pip install 'edgepeft[gguf]')"
    elif llama.get("broken"):
        gguf = f"llama-cpp-python {llama['version']}; cannot load here (see advice)"
    else:
        gguf = (f"llama-cpp-python {llama['version']}; GPU offload: {'yes' if llama['gpu_offload'] else 'no'}; "
                f"mmap: {'yes' if llama['mmap'] else 'no'}; auto -> {llama['auto']}")
    print("gguf     " + gguf)
    for line in r["advice"]:
        print(f"advice   {line}")
    return 0
