import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from factory import make_base, make_lora  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("llama"), "llama", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("qwen2"), "qwen2", seed=0)


@pytest.fixture(scope="session")
def llama_adapters(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """Several LoRA adapters on the tiny Llama: different ranks, alphas, targets, rsLoRA, patterns."""
    root = tmp_path_factory.mktemp("llama_adapters")
    return {
        "qv": make_lora(tiny_llama, root / "qv", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "all": make_lora(tiny_llama, root / "all", seed=2, r=8, lora_alpha=16, use_rslora=True,
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        "mixed": make_lora(tiny_llama, root / "mixed", seed=3, r=2, lora_alpha=4,
                           target_modules=["k_proj", "o_proj", "down_proj"],
                           rank_pattern={"down_proj": 6}, alpha_pattern={"o_proj": 11}),
    }


@pytest.fixture(autouse=True, scope="session")
def _llama_cpp_as_edgepeft_loads_it():
    """Stock llama-cpp-python in these tests loads models as our GGUF backend does: without
    llama.cpp's extra buffer types on a CPU whose AMX kernels crash (native_check.skip_amx_buffers)."""
    from edgepeft.native_check import llama_cpp_problem, skip_amx_buffers

    if importlib.util.find_spec("llama_cpp") is not None and llama_cpp_problem() is None:
        import llama_cpp

        skip_amx_buffers(llama_cpp)
