"""The hybrids (LFM2, Qwen3.5) quantized as the scale benchmark exports them (Q4_K_M, a LoRA on
every linear layer): our GGUF backend's greedy tokens, base and adapter, are stock
llama-cpp-python's on the same two files (benchmarks/export_scale.py compares their speeds)."""

import numpy as np
import pytest

from edgepeft.exporters import export_bundle
from factory import all_linear, make_base, make_lora
from hybrid_checks import greedy_engine, stock_greedy

PROMPT = [int(i) for i in np.random.default_rng(11).integers(3, 260, 9)]
NEW = 24


# hidden 256 and (LFM2) an MLP 512 wide, so most linear weights really are Q4_K/Q6_K (k-quants
# pack rows in blocks of 256); the tiny DeltaNet's narrower ones take llama.cpp's fallback type.
@pytest.mark.parametrize("arch, widths", [("lfm2", {"block_multiple_of": 256}), ("qwen3_5_text", {})])
def test_q4_k_m_greedy_tokens_with_the_adapter_are_stock_llama_cpp_pythons(tmp_path, arch, widths):
    import gguf

    base = make_base(tmp_path / "base", arch, seed=7, tie=True, hidden=256, **widths)
    lora = make_lora(base, tmp_path / "lora", seed=2, r=8, lora_alpha=16, target_modules=all_linear(arch))
    bundle = export_bundle(str(base), tmp_path / "bundle", {"a": str(lora)}, formats="gguf", gguf_quant="Q4_K_M",
                           quiet=True)
    model = bundle.file(bundle.backends["gguf"]["model"])
    types = {t.tensor_type.name for t in gguf.GGUFReader(model).tensors}
    assert "Q4_K" in types, types
    engine = greedy_engine(bundle, "gguf")
    got = {}
    for adapter in (None, "a"):
        lora_file = bundle.adapter_path("a", "gguf") if adapter else None
        got[adapter] = engine.complete(PROMPT, adapter=adapter, max_new_tokens=NEW).tokens
        assert got[adapter] == stock_greedy(model, lora_file, PROMPT, NEW, f32=False), adapter
    assert got[None] != got["a"]  # the adapter changes the answer
