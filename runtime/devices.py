"""Which execution provider, or how many llama.cpp GPU layers, a --device value means here.

Pure selection over what the installed engines report (onnxruntime's available providers,
llama.cpp's GPU offload support), so it is testable with fakes. What the machine has is
runtime/machine.py's business (`edgepeft doctor`); whether an engine loads at all,
runtime/native_check.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

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
