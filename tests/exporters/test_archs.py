"""The architecture table: what each model_type means to the exporters, and the one-line refusal
of a type outside it."""

import pytest

from edgepeft.errors import UnsupportedModel
from edgepeft.exporters.archs import ARCHS, arch_of
from edgepeft.exporters.gguf_base import needs_permutation
from edgepeft.exporters.hf_base import _dims


def test_an_architecture_outside_the_table_is_refused_in_one_line():
    with pytest.raises(UnsupportedModel, match=r"^base/: architecture 'gpt2' is not supported \(supported: llama, "
                                               r"mistral, qwen2\)$"):
        arch_of("gpt2", "base/")


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
