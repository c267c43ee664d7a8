"""verify's reference keeps the base in the checkpoint's dtype and computes a decoder layer at a
time in float32 (verify.reference_model, checkpoint.float32_layers): its answers and logits are
those of the whole model loaded in float32, with PEFT's adapters on it."""

import peft
import pytest
import torch

from edgepeft.exporters.verify import reference_model, reference_sequences

from factory import bf16_copy, load_reference, make_base, make_lora, make_prompt_adapter

PROMPTS = [[1, 5, 9, 12, 7, 3, 30, 11, 4, 8, 2, 21], [1, 5, 7]]


def _float32_reference(base_dir, adapter):
    """What verify loaded before: the whole model in float32 (with PEFT's adapter)."""
    model = load_reference(base_dir)
    return model if adapter is None else peft.PeftModel.from_pretrained(model, str(adapter)).eval()


# fp32: the builtin bundles' checkpoints (nothing to upcast); bf16 Gemma 3 with a tied head, sliding
# windows and hidden 96 (its embedding scale is not a bf16 number); DoRA reads its base weight
# outside the base layer's own forward; prompt tuning runs the embedding on its own.
CASES = [("llama", "fp32", {}), ("llama", "bf16", {}), ("gemma3_text", "bf16", {"tie": True, "hidden": 96})]


@pytest.mark.parametrize("family,dtype,opts", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_the_reference_computes_what_the_float32_model_computes(family, dtype, opts, tmp_path):
    base = make_base(tmp_path / "f32", family, seed=0, **opts)
    if dtype == "bf16":
        base = bf16_copy(base, tmp_path / "bf16")
    adapters = {None: None,
                "lora": make_lora(base, tmp_path / "lora", seed=1, r=4, target_modules=["q_proj", "down_proj"]),
                "dora": make_lora(base, tmp_path / "dora", seed=2, r=4, use_dora=True, target_modules=["v_proj"]),
                "prompt": make_prompt_adapter(base, tmp_path / "prompt", "PROMPT_TUNING", num_virtual_tokens=3)}
    for name, adapter in adapters.items():
        model = reference_model(str(base), adapter)
        stored = {p.dtype for n, p in model.named_parameters() if "lora_" not in n and "prompt" not in n}
        assert stored == {getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype])}, name
        got = reference_sequences(model, PROMPTS, stop_ids=set(), answer_tokens=4)
        want = reference_sequences(_float32_reference(base, adapter), PROMPTS, stop_ids=set(), answer_tokens=4)
        assert got[0] == want[0], name
        for g, w in zip(got[1], want[1]):
            assert g.dtype == w.dtype and (g == w).all(), name
        # and nothing of the float32 compute is left on the model
        assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n and "prompt" not in n} == stored
