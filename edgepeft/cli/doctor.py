"""Show what this machine offers for running bundles: CPU and its features, memory, GPUs, the
installed engines (onnxruntime and its execution providers, llama-cpp-python and its GPU
offload), what `--device auto` picks for each backend, and which formats and precisions will run
well here. Reads nothing from the network and loads no model."""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")


def probe() -> dict:
    """What this machine offers: CPU, memory, GPUs, engines and their devices, the choices
    `device="auto"` makes, and advice."""
    from edgepeft.runtime.devices import pick_gguf, pick_onnx
    from edgepeft.machine import cpu_info, engine_version, memory_info, nvidia_gpus, onnx_telemetry
    from edgepeft.native_check import llama_cpp_amx_problem, llama_cpp_problem

    report = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu_info(),
              "memory": memory_info(), "gpus": nvidia_gpus(), "engines": {"onnxruntime": None, "llama_cpp": None}}
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        report["engines"]["onnxruntime"] = {"version": engine_version("onnxruntime"), "providers": available,
                                            "auto": pick_onnx(available).device, "telemetry": onnx_telemetry()}
    broken = llama_cpp_problem()  # None when it loads, or is not installed
    if broken:  # importing it here would kill this process too
        report["engines"]["llama_cpp"] = {"version": engine_version("llama_cpp"), "broken": broken}
    elif importlib.util.find_spec("llama_cpp") is not None:
        import llama_cpp

        from edgepeft.llama_log import quiet_llama_cpp

        quiet_llama_cpp(llama_cpp)
        gpu = bool(llama_cpp.llama_supports_gpu_offload())
        system = llama_cpp.llama_print_system_info().decode(errors="replace")
        report["engines"]["llama_cpp"] = {"version": engine_version("llama_cpp"), "gpu_offload": gpu,
                                          "mmap": bool(llama_cpp.llama_supports_mmap()),
                                          "auto": pick_gguf(gpu).device,
                                          "problem": llama_cpp_amx_problem(system, report["cpu"]["features"])}
    report["advice"] = advice(report)
    return report


def advice(report: dict) -> list[str]:
    """Which bundle formats and precisions will run well here, from a probe() report."""
    from edgepeft.byte_sizes import format_bytes

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
    if llama and (llama.get("broken") or llama.get("problem")):
        out.append(f"gguf: {llama.get('broken') or llama['problem']}")
    elif llama:
        out.append("gguf: GPU offload available (all layers by default)" if llama["gpu_offload"]
                   else "gguf: CPU build; Q4_K_M is the usual speed/quality balance, Q8_0 for quality")
    mem = report["memory"].get("available") or report["memory"].get("total")
    if mem and mem < 4 * 2**30:
        out.append(f"memory: {format_bytes(mem)} available; use --max-context and --max-resident-adapters "
                   "(see docs/devices.md)")
    return out


def run(args) -> int:
    from edgepeft import __version__
    from edgepeft.byte_sizes import format_bytes

    r = probe()
    r["edgepeft"] = __version__
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    cpu, mem = r["cpu"], r["memory"]
    print(f"edgepeft {__version__} on {r['platform']}, Python {r['python']}")
    print(f"cpu      {cpu['model'] or cpu['machine']}, {cpu['cores']} cores; features: {', '.join(cpu['features']) or 'none detected'}")
    print(f"memory   {format_bytes(mem['total'])} total, {format_bytes(mem['available'])} available")
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
                f"mmap: {'yes' if llama['mmap'] else 'no'}; auto -> {llama['auto']}"
                + ("; crashes on quantized bases here (see advice)" if llama.get("problem") else ""))
    print("gguf     " + gguf)
    for line in r["advice"]:
        print(f"advice   {line}")
    return 0
