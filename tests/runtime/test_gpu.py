"""GPU paths: they run whenever this machine has a GPU the installed engines can use, and are
skipped (with the reason) only when it has none. CI has no GPU."""

import statistics

import numpy as np
import pytest

from edgepeft.exporters import export_bundle
from edgepeft.runtime import Engine

IDS = [5, 17, 99, 3, 42, 250, 7, 61]


def _has_cuda_provider() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def _has_llama_gpu() -> bool:
    try:
        import llama_cpp
    except ImportError:
        return False
    return bool(llama_cpp.llama_supports_gpu_offload())


@pytest.fixture(scope="module")
def gpu_bundle(tiny_llama, llama_adapters, tmp_path_factory):
    """fp16 ONNX (GPU precision, fp16 adapter slots) + F16 GGUF of the tiny Llama with adapters."""
    return export_bundle(str(tiny_llama), tmp_path_factory.mktemp("gpu") / "bundle",
                         {n: str(p) for n, p in llama_adapters.items()}, formats="onnx,gguf",
                         onnx_quant="fp16", gguf_quant="F16", quiet=True)


def _close(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


@pytest.mark.skipif(not _has_cuda_provider(), reason="no CUDAExecutionProvider in this onnxruntime (no GPU)")
def test_onnx_runs_on_cuda_matches_cpu_and_switches_fast(gpu_bundle):
    gpu = Engine.open(gpu_bundle.root, device="cuda")
    cpu = Engine.open(gpu_bundle.root, device="cpu")
    assert gpu.backend.device == "cuda" and gpu.backend.providers[0] == "CUDAExecutionProvider"
    for name in (None, "qv", "all", "mixed", None):
        assert _close(gpu.score(IDS, adapter=name), cpu.score(IDS, adapter=name)) < 2e-2, name
    # Greedy generation on the GPU takes, at every step, the token the CPU ranks first, within the
    # bound above: fp16 on two devices may order a near-tie either way, so equality is too strict.
    prompt, got = gpu.encode_prompt("abc"), gpu.complete("abc", adapter="all", max_new_tokens=8)
    assert len(got.tokens) == 8 or got.stop_reason == "stop"
    rows = cpu.score(prompt + got.tokens, adapter="all")[len(prompt) - 1:]
    bound = 2e-2 * max(1.0, float(np.abs(rows).max()))
    chosen = [row[t] for row, t in zip(rows, got.tokens)]
    if got.stop_reason == "stop":  # the step that ended the call chose a stop token
        chosen.append(max(rows[-1][t] for t in cpu.tokenizer.stop_ids(False)))
    assert all(c >= row.max() - bound for c, row in zip(chosen, rows))
    for name in ("qv", "all", "mixed"):
        assert statistics.median(gpu.switch_seconds(name, 100)) < 2e-3, name


@pytest.mark.skipif(not _has_llama_gpu(), reason="llama-cpp-python built without GPU offload (no GPU)")
def test_gguf_offloads_to_the_gpu_matches_cpu_and_switches_fast(gpu_bundle):
    gpu = Engine.open(gpu_bundle.root, backend="gguf", device="cuda")
    cpu = Engine.open(gpu_bundle.root, backend="gguf", device="cpu")
    assert gpu.backend.device == "gpu"
    for name in (None, "qv", "all", "mixed", None):
        assert _close(gpu.score(IDS, adapter=name), cpu.score(IDS, adapter=name)) < 2e-2, name
    partial = Engine.open(gpu_bundle.root, backend="gguf", device="cuda", gpu_layers=1)
    assert _close(partial.score(IDS, adapter="all"), cpu.score(IDS, adapter="all")) < 2e-2
    for name in ("qv", "all", "mixed"):
        assert statistics.median(gpu.switch_seconds(name, 100)) < 1e-4, name
