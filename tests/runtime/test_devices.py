"""Device selection, with the engines' answers faked at the boundary."""

import pytest

from edgepeft.errors import InvalidArgument
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


def test_minus_one_gpu_layers_is_every_layer_and_below_is_refused():
    assert pick_gguf(True, "cuda", gpu_layers=-1).gpu_layers == pick_gguf(True).gpu_layers == 999
    assert pick_gguf(True, "cuda", gpu_layers=-1).device == "gpu"
    with pytest.raises(InvalidArgument, match="gpu layers -2"):
        pick_gguf(True, "cuda", gpu_layers=-2)
