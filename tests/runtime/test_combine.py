"""Several LoRA adapters active in one call, as PEFT's multiple active LoRA adapters."""

import numpy as np
import pytest

from edgepeft.errors import BundleError, EngineError
from edgepeft.runtime import Engine

IDS = [5, 17, 99, 3, 42, 250, 7, 61]


def peft_reference(base_dir, adapters: dict, ids) -> np.ndarray:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = list(adapters)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                      adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.base_model.set_adapter(names)  # all active: their updates add up
    with torch.no_grad():
        return model.eval()(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("backend", ["onnx", "gguf"])
def test_two_and_three_loras_together_match_peft(llama_bundle, tiny_llama, llama_adapters, backend):
    engine = Engine.open(llama_bundle.root, backend=backend)
    for combo in (["qv", "mixed"], ["all", "qv", "mixed"]):
        want = peft_reference(tiny_llama, {n: llama_adapters[n] for n in combo}, IDS)
        for spelled in ("+".join(combo), combo):
            got = engine.score(IDS, adapter=spelled)
            assert np.abs(got - want).max() < 1e-3 * max(1.0, np.abs(want).max()), (backend, combo)
        single = engine.score(IDS, adapter=combo[0])
        assert np.abs(single - want).max() > 1e-2  # the second adapter really takes part
    # alternating single and combined calls leaves no adapter behind
    np.testing.assert_allclose(engine.score(IDS, adapter="qv"), engine.score(IDS, adapter=["qv"]), atol=1e-6)
    # generating with a combination follows its own scores: the greedy chain of score()'s argmax
    ids, chain, stop = engine.encode_prompt("abc"), [], engine.tokenizer.stop_ids(False)
    while len(chain) < 4 and (token := int(engine.score(ids + chain, adapter="qv+mixed")[-1].argmax())) not in stop:
        chain.append(token)
    assert engine.complete("abc", adapter="qv+mixed", max_new_tokens=4).tokens == chain, backend
    assert engine.generate("abc", adapter="qv+mixed", max_new_tokens=4) == engine.tokenizer.decode(chain)


def test_combinations_fail_clearly(llama_bundle):
    engine = Engine.open(llama_bundle.root)
    with pytest.raises(EngineError, match="twice"):
        engine.score(IDS, adapter="qv+qv")
    with pytest.raises(BundleError, match="no adapter named 'nope'"):
        engine.score(IDS, adapter="qv+nope")
