"""Layer-major runs of the base (exporters/layerwise.py) compute what the whole model computes
sequence by sequence."""

import numpy as np
import pytest
import torch

from edgepeft.exporters import hf_base
from edgepeft.exporters.calibration import _token_batches, activation_importance, linear_modules
from edgepeft.exporters.checkpoint import float32_compute

from factory import bf16_copy, make_base

# Gemma 3: sliding layers (window 8, shorter than the calibration texts) and global ones, tied
# head, hidden 96 (its embedding scale sqrt(96) is not a bf16 number); Gemma 2 scales its
# embeddings in the model's forward and soft-caps attention (eager); Phi-3: fused projections,
# partial rotary with LongRoPE, switching to its long factors past 96 positions, which some texts
# reach and some do not (batched together, the short ones would rotate by the long factors).
# LFM2: short-convolution layers (their Conv1d's weights read by the block, not through the
# Conv1d's forward) between attention layers, right-padded texts through both.
CASES = [("llama", {}), ("gemma3_text", {"tie": True, "hidden": 96}), ("gemma2", {}),
         ("phi3_longrope", {"original_max_position_embeddings": 96}), ("lfm2", {"tie": True})]


def per_text_importance(base, modules):
    """The statistics as the model computes them one whole forward per text (the reference)."""
    sums = {}

    def hook(name):
        def record(_m, args, _out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            acc = sums.setdefault(name, [0.0, 0])
            acc[0], acc[1] = acc[0] + (x * x).sum(0), acc[1] + x.shape[0]
        return record

    hooks = [m.register_forward_hook(hook(n)) for n, m in base.model.named_modules() if n in set(modules.values())]
    with torch.no_grad(), float32_compute(base):
        for ids in _token_batches(base, int(base.dims["vocab_size"])):
            base.model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return {k: (sums[n][0] / sums[n][1]).numpy() for k, n in modules.items() if n in sums}


@pytest.mark.parametrize("family,opts", CASES, ids=[c[0] for c in CASES])
def test_layer_major_calibration_equals_the_per_text_forward(family, opts, tmp_path):
    src = bf16_copy(make_base(tmp_path / "f32", family, seed=0, layers=3, **opts), tmp_path / "bf16")
    lazy = hf_base.load_base(str(src))
    modules = linear_modules(lazy.model)
    lengths = [len(ids) for ids in _token_batches(lazy, lazy.dims["vocab_size"])]
    assert max(lengths) > 96 >= min(lengths) > 8  # past Gemma's window; both sides of LongRoPE's switch
    want = per_text_importance(lazy, modules)
    got = activation_importance(lazy, modules)
    assert set(got) == set(want) == set(modules) and len(got) >= 3 * 4 + 1  # every projection and the head
    for key in want:
        # batched, the products round differently in float32: the same up to that
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=0, err_msg=key)
    # a base loaded whole in float32 runs the same way and gets the same statistics
    whole = activation_importance(hf_base.load_base(str(src), lazy=False), modules)
    assert all(np.array_equal(whole[k], got[k]) for k in got)
    assert {p.device.type for p in lazy.model.parameters()} == {"meta"}  # no weight left behind


def test_the_sensitivity_search_measures_a_lazy_base_as_the_whole_float32_one(tmp_path):
    import onnx

    from edgepeft.exporters.onnx_graph import build_decoder
    from edgepeft.exporters.onnx_quant import base_matmuls, importance_blocks
    from edgepeft.exporters.sensitivity import Simulation

    src = bf16_copy(make_base(tmp_path / "f32", "gemma3_text", seed=0, layers=2, tie=True, hidden=96), tmp_path / "bf16")
    kls = {}
    for lazy in (True, False):
        base = hf_base.load_base(str(src), lazy=lazy)
        before = {k: v.clone() for k, v in base.model.state_dict().items()}
        proto, info = build_decoder(base, slot_set="lora")
        blocks = importance_blocks(proto, info["lora_nodes"], activation_importance(base, info["base_matmuls"]),
                                   32, True)
        inits = {i.name: i for i in proto.graph.initializer}
        weights = {n.name: onnx.numpy_helper.to_array(inits[n.input[1]])
                   for n in base_matmuls(proto, info["lora_nodes"])}
        some = sorted(blocks)[:2]
        with Simulation(base, info, blocks, weights, 32) as sim:
            kls[lazy] = [sim.kl(set()), sim.kl({some[0]}), sim.kl(set(some)), sim.kl(set())]
        after = base.model.state_dict()
        # the whole model's weights given back; the lazy one's still in the checkpoint
        assert all(after[k].is_meta if lazy else torch.equal(before[k], after[k]) for k in before)
    assert kls[True] == kls[False]
    four, one, two, again = kls[True]
    assert four > 0 and one != four and two != one and again == four
