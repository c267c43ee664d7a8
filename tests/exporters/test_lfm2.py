"""LFM2 (gated short-convolution layers between full-attention layers) in the fp32 ONNX graph:
logits match PyTorch+PEFT with LoRA on every linear layer (both out_proj kinds, in_proj, q/k/v,
w1/w2/w3), rank and alpha patterns, DoRA, IA3 and lora_bias, switched in any order; a prefill
followed by single-token decode steps, carrying each convolution layer's state and each
attention layer's KV cache, gives the logits of scoring the whole text (int4 too, as export
builds it). The F32 GGUF base and GGUF LoRA files load in stock llama-cpp-python (llama.cpp's
lfm2 architecture) and match PyTorch+PEFT, logits and greedy tokens. Both run here on
onnxruntime and llama-cpp-python directly; edgepeft's runtime on whole bundles is
tests/runtime/test_lfm2_runtime.py."""

import numpy as np
import onnxruntime as ort
import pytest

from edgepeft.errors import UnsupportedModel
from edgepeft.exporters.hf_base import load_base
from edgepeft.exporters.onnx_graph import build_decoder
from edgepeft.runtime_contract import kv_names, state_names
from factory import all_linear, make_base, make_lora, reference_logits
from hybrid_checks import (f32_gguf_files, fp32_graph, TOL, assert_decode_steps_are_peft, assert_onnx_scores_are_peft, assert_stock_logits_are_peft,
                           empty_cache, ort_session, peft_greedy, run, stock_greedy)
from test_families import make_ia3

KERNEL = 5  # tests/factory.py's lfm2 config: conv_L_cache
PROMPT_IDS = [int(i) for i in np.random.default_rng(3).integers(3, 260, 80)]  # far longer than the kernel


@pytest.fixture(scope="module")
def lfm2(tmp_path_factory):
    """The tiny LFM2 (tied head, as LFM2 ships), its adapters, and an onnxruntime session on its
    fp32 graph with the base path."""
    root = tmp_path_factory.mktemp("lfm2")
    base = make_base(root / "base", "lfm2", seed=7, tie=True)
    linear = all_linear("lfm2")
    adapters = {
        "all": make_lora(base, root / "all", seed=2, r=8, lora_alpha=16, use_rslora=True, target_modules=linear),
        "pattern": make_lora(base, root / "pattern", seed=3, r=2, lora_alpha=4, target_modules=linear[-4:],
                             rank_pattern={"in_proj": 6}, alpha_pattern={"w1": 9}),
        "dora": make_lora(base, root / "dora", seed=4, r=4, lora_alpha=8, use_dora=True,
                          target_modules=["in_proj", "out_proj", "q_proj"]),
        "ia3": make_ia3(base, root / "ia3", seed=5, target_modules=["in_proj", "v_proj", "w2"],
                        feedforward_modules=["w2"]),
        "bias": make_lora(base, root / "bias", seed=6, r=4, lora_alpha=8, lora_bias=True,
                          target_modules=["in_proj", "out_proj"]),
    }
    return (base, adapters, *fp32_graph(base, adapters))


@pytest.fixture(scope="module")
def lfm2_gguf(lfm2, tmp_path_factory):
    """The F32 GGUF base and the GGUF LoRA files of the adapters that have one (DoRA has not)."""
    return f32_gguf_files(*lfm2[:2], tmp_path_factory.mktemp("lfm2_gguf"))


def test_graph_carries_a_state_for_conv_layers_and_a_kv_cache_for_attention_layers(lfm2):
    _, _, session, info, _ = lfm2
    names = {i.name: i.shape for i in session.get_inputs()}
    assert info["kv"]["layers"] == [1, 3]
    for i in (0, 2):
        assert names[state_names(i, "conv")[0]] == ["batch", 64, KERNEL - 1]
        assert kv_names(i)[0] not in names
    for i in (1, 3):
        assert kv_names(i)[0] in names and state_names(i, "conv")[0] not in names
    slots = {s["module"] for s in info["slots"]}
    for i in (0, 2):
        assert {f"model.layers.{i}.conv.conv_in_proj", f"model.layers.{i}.conv.conv_out_proj"} <= slots


def test_fp32_onnx_scores_like_peft_with_every_adapter_in_any_order(lfm2):
    assert_onnx_scores_are_peft(*lfm2, PROMPT_IDS, ["all", None, "dora", "ia3", "pattern", "bias", "all", None, "dora"])


@pytest.mark.parametrize("adapter", [None, "all"])
def test_prefill_then_single_token_decode_matches_scoring_the_whole_text(lfm2, adapter):
    """A prefill of 7 tokens (past the kernel), then 73 steps of one token each (past 64 new
    tokens), each step reading the state and KV cache the previous one wrote."""
    cache = assert_decode_steps_are_peft(*lfm2, adapter, PROMPT_IDS, 7)
    state = cache[state_names(0, "conv")[0]]
    assert state.shape == (1, 64, KERNEL - 1) and np.abs(state).max() > 0


def test_gguf_base_has_llama_cpps_lfm2_layout(lfm2_gguf):
    from gguf import GGUFReader

    reader = GGUFReader(lfm2_gguf[0])
    fields = {f.name: f for f in reader.fields.values()}
    assert fields["general.architecture"].contents() == "lfm2"
    assert fields["lfm2.attention.head_count_kv"].contents() == [0, 1, 0, 1]  # 0: a convolution layer
    assert fields["lfm2.shortconv.l_cache"].contents() == KERNEL
    assert fields["lfm2.feed_forward_length"].contents() == 96
    tensors = {t.name: t for t in reader.tensors}
    conv = tensors["blk.0.shortconv.conv.weight"]
    assert list(conv.shape) == [KERNEL, 64] and conv.tensor_type.name == "F32"  # ggml order: [kernel, channels]
    assert "blk.0.shortconv.in_proj.weight" in tensors and "blk.1.attn_q_norm.weight" in tensors
    assert "blk.0.attn_q.weight" not in tensors and "output.weight" not in tensors  # tied head


def test_f32_gguf_with_lora_in_stock_llama_cpp_matches_peft(lfm2, lfm2_gguf):
    base, adapters = lfm2[:2]
    assert_stock_logits_are_peft(base, adapters, *lfm2_gguf, [None, "all", "pattern"], PROMPT_IDS)


@pytest.mark.parametrize("adapter", [None, "all"])
def test_stock_llama_cpp_greedy_tokens_are_peft_generates(lfm2, lfm2_gguf, adapter):
    """70 new tokens: llama.cpp carries each convolution layer's state from step to step."""
    base, adapters = lfm2[:2]
    model, files = lfm2_gguf
    prompt = PROMPT_IDS[:9]
    assert stock_greedy(model, files[adapter], prompt, 70) == peft_greedy(base, adapters.get(adapter), prompt, 70)


def test_convolution_biases_run_on_onnx_and_are_refused_for_gguf(tmp_path):
    """conv_bias (biases on in_proj, the convolution and out_proj): llama.cpp's lfm2 loads none."""
    from edgepeft.exporters.gguf_base import write_base_gguf

    base = make_base(tmp_path / "base", "lfm2", seed=8, conv_bias=True)
    loaded = load_base(str(base))
    proto, info = build_decoder(loaded, "fp32")
    got, _ = run(ort_session(proto), info, PROMPT_IDS, 0, empty_cache(info))
    assert np.abs(got - reference_logits(base, None, PROMPT_IDS)).max() <= TOL
    with pytest.raises(UnsupportedModel, match="no biases in its convolution blocks.*--format onnx"):
        write_base_gguf(loaded, tmp_path / "b.gguf", "F32")


def test_a_lazy_base_computes_what_the_float32_model_computes(lfm2):
    """Calibration and prompt tuning run the lazy base (checkpoint.float32_compute), whose
    hooks read each module's weights before its forward: the convolution's weights, which
    Lfm2ShortConv reads without calling its Conv1d, must be read too."""
    import torch

    from edgepeft.exporters.checkpoint import float32_compute
    from factory import load_reference

    base = lfm2[0]
    lazy = load_base(str(base))
    with torch.no_grad(), float32_compute(lazy):
        got = lazy.model(torch.tensor([PROMPT_IDS])).logits
    with torch.no_grad():
        want = load_reference(base)(torch.tensor([PROMPT_IDS])).logits
    assert torch.equal(got, want)


def test_int4_graph_as_export_builds_it_decodes_with_its_states_and_stays_close(lfm2, tmp_path):
    """The int4 path export takes (calibration, importance-weighted 4-bit blocks, MatMulNBits,
    the exact head of a tied lm_head), written and read back: decoding through the states gives
    the graph's own scoring, and its KL from PyTorch is small (NaN calibration statistics made
    it 0.34)."""
    from edgepeft.bundle import Bundle, new_manifest
    from edgepeft.exporters.onnx_export import export_onnx
    from edgepeft.exporters.progress import QUIET

    base = lfm2[0]
    entry = export_onnx(Bundle(tmp_path, new_manifest(base={}, tokenizer={})), load_base(str(base)), "int4", "lora",
                        32, 4, None, QUIET)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(tmp_path / entry["model"]), options, providers=["CPUExecutionProvider"])
    full, _ = run(session, entry, PROMPT_IDS, 0, empty_cache(entry))
    logits, cache = run(session, entry, PROMPT_IDS[:7], 0, empty_cache(entry))
    steps = [logits]
    for t in range(7, 30):
        logits, cache = run(session, entry, PROMPT_IDS[t:t + 1], t, cache)
        steps.append(logits)
    assert np.abs(np.concatenate(steps) - full[:30]).max() <= TOL
    ref = reference_logits(base, None, PROMPT_IDS)
    p = np.exp(ref - ref.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    log_q = full - full.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    assert (p * (np.log(p) - log_q)).sum(-1).mean() < 0.05


def test_layer_kinds_states_and_mlp_width_come_from_the_config():
    from transformers import Lfm2Config

    from edgepeft.exporters.archs import ARCHS, SHORT_CONV, layout
    from edgepeft.exporters.hf_base import _dims

    # LFM2-350M's MLP: intermediate_size 6656 adjusted to 4608; no layer_types: full_attn_idxs
    cfg = Lfm2Config(hidden_size=1024, intermediate_size=6656, num_hidden_layers=4, num_attention_heads=16,
                     num_key_value_heads=8, conv_L_cache=3, full_attn_idxs=[2], norm_eps=1e-5)
    dims = _dims(cfg)
    assert dims["intermediate_size"] == 4608 and dims["rms_norm_eps"] == 1e-5
    lay = layout(ARCHS["lfm2"], cfg, dims)
    assert lay.mixers == (SHORT_CONV, SHORT_CONV, "attention", SHORT_CONV)
    assert lay.states == ({"conv": (1024, 2)},) * 2 + ({},) + ({"conv": (1024, 2)},)
    assert lay.attention_layers() == [2]
