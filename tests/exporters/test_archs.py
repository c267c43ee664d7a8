"""The architecture table: what each model_type means to the exporters, the one-line refusal of
a type outside it, and the shapes and configs a backend cannot run, refused at export."""

import json
import subprocess
import sys

import pytest

from edgepeft.errors import UnsupportedModel
from edgepeft.exporters import export_bundle
from edgepeft.exporters.archs import ARCHS, arch_of, layout
from edgepeft.exporters.gguf_base import needs_permutation
from edgepeft.exporters.hf_base import _dims
from factory import ARCHS as FACTORY_ARCHS
from factory import make_base

SUPPORTED = "llama, mistral, qwen2, qwen3, gemma2, gemma3_text, gemma4_text, phi3, lfm2, qwen3_5_text"


def test_an_architecture_outside_the_table_is_refused_in_one_line():
    with pytest.raises(UnsupportedModel, match=rf"^base/: architecture 'gpt2' is not supported \(supported: {SUPPORTED}\)$"):
        arch_of("gpt2", "base/")


def test_every_family_in_the_table_has_a_test_config():
    import transformers

    covered = {getattr(transformers, cfg).model_type for cfg, _, _ in FACTORY_ARCHS.values()}
    assert set(ARCHS) <= covered


def test_only_llama_layout_families_permute_q_and_k_rows_for_gguf():
    assert {t for t in ARCHS if needs_permutation(t)} == {"llama", "mistral"}


@pytest.mark.parametrize("model_type, flag, want", [
    ("qwen2", False, None),  # Qwen2 configs carry a window that applies only with use_sliding_window
    ("qwen2", True, 16),
    ("mistral", False, 16),  # Mistral's window always applies
])
def test_sliding_window_follows_the_familys_switch(model_type, flag, want):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=64, num_hidden_layers=1, vocab_size=50, sliding_window=16,
                               use_sliding_window=flag)
    assert _dims(cfg)["sliding_window"] == want


def test_gemma3_layers_take_their_window_and_rotary_table_from_layer_types():
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("gemma3_text", hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                               head_dim=16, intermediate_size=64, num_hidden_layers=7, vocab_size=50,
                               sliding_window=12, query_pre_attn_scalar=32)
    lay = layout(ARCHS["gemma3_text"], cfg, _dims(cfg))
    assert lay.windows == (12, 12, 12, 12, 12, None, 12)
    assert lay.rope == ("local",) * 5 + ("global", "local")
    assert lay.attention_scale == pytest.approx(32 ** -0.5)
    assert lay.embed_multiplier == pytest.approx(32 ** 0.5)


def test_partial_rotary_sets_the_rotary_width():
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("phi3", hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=64, num_hidden_layers=1, vocab_size=50, partial_rotary_factor=0.75,
                               pad_token_id=0)
    assert layout(ARCHS["phi3"], cfg, _dims(cfg)).rotary_dim == 24


def cli_export(base, out, *args):
    return subprocess.run([sys.executable, "-m", "edgepeft", "export", str(base), "--out", str(out), *args],
                          capture_output=True, text=True)


def assert_refused(p, *needles):
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_an_unsupported_base_fails_at_export_with_exit_2_naming_the_families(tiny_llama, tmp_path):
    base = tmp_path / "gpt2"
    base.mkdir()
    cfg = json.loads((tiny_llama / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    p = cli_export(base, tmp_path / "out")
    assert_refused(p, "architecture 'gpt2' is not supported", SUPPORTED)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_head_size_groupqueryattention_cannot_run_is_refused_at_onnx_export(arch, tmp_path):
    base = make_base(tmp_path / "base", arch, hidden=32)  # 4 heads of 8
    p = cli_export(base, tmp_path / "out", "--format", "onnx", "--onnx-quant", "fp32")
    assert_refused(p, "head_dim 8", "multiples of 16", "--format gguf")
    assert not (tmp_path / "out").exists()


def test_a_partial_rotary_width_groupqueryattention_cannot_run_is_refused_at_onnx_export(tmp_path):
    from factory import _longrope

    base = make_base(tmp_path / "base", "phi3_longrope", partial_rotary_factor=0.375, rope_scaling=_longrope(12))
    p = cli_export(base, tmp_path / "out", "--format", "onnx", "--onnx-quant", "fp32")
    assert_refused(p, "rotary width of 12", "multiple of 8", "--format gguf")
    assert not (tmp_path / "out").exists()


def test_the_same_head_size_exports_and_runs_on_gguf(tmp_path):
    from edgepeft.runtime import Engine

    base = make_base(tmp_path / "base", "qwen2", hidden=32)
    bundle = export_bundle(str(base), tmp_path / "b", formats="gguf", gguf_quant="F32", quiet=True)
    assert Engine.open(bundle.root, backend="gguf").score([5, 6, 7]).shape[0] == 3


def test_a_config_llama_cpp_would_run_differently_is_refused_at_gguf_export(tmp_path):
    base = make_base(tmp_path / "base", "gemma3_scaled", tie=True)  # query_pre_attn_scalar != head_dim
    p = cli_export(base, tmp_path / "out", "--format", "gguf", "--gguf-quant", "F32")
    assert_refused(p, "llama.cpp's gemma3", "--format onnx")


@pytest.mark.parametrize("uncapped", ["attn_logit_softcapping", "final_logit_softcapping"])
def test_a_gemma2_config_without_both_soft_caps_is_refused_at_gguf_export(uncapped, tmp_path):
    """llama.cpp's gemma2 caps both, with its own defaults where the file has no cap."""
    base = make_base(tmp_path / "base", "gemma2", tie=True, **{uncapped: None})
    p = cli_export(base, tmp_path / "out", "--format", "gguf", "--gguf-quant", "F32")
    assert_refused(p, "always soft-caps", "uncapped", "--format onnx")
    assert not (tmp_path / "out").exists()


def test_an_uncapped_gemma2_config_exports_and_matches_on_onnx(tmp_path):
    import numpy as np

    from edgepeft.runtime import Engine
    from factory import reference_logits

    base = make_base(tmp_path / "base", "gemma2", tie=True, attn_logit_softcapping=None, final_logit_softcapping=None)
    bundle = export_bundle(str(base), tmp_path / "b", onnx_quant="fp32", quiet=True)
    ids = [5, 6, 7, 40, 41, 42, 3, 9, 11, 12]
    assert np.abs(Engine.open(bundle.root).score(ids) - reference_logits(base, None, ids)).max() <= 1e-3
