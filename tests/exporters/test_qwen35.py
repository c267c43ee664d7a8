"""Qwen3.5 (gated DeltaNet layers beside gated full attention) in the fp32 ONNX graph: logits
match PyTorch+PEFT with LoRA on every linear layer (the DeltaNet's in_proj_qkv/z/b/a and
out_proj, q/k/v/o, gate/up/down), rank and alpha patterns, DoRA, IA3 and lora_bias, switched in
any order, over
a prompt far longer than the convolution kernel and than LinearAttention's chunk; a prefill
followed by single-token decode steps, carrying each DeltaNet layer's convolution and recurrent
states and each attention layer's KV cache, gives the logits of scoring the whole text. A
vision-language checkpoint's text weights (model.language_model.) export as the text model.
The F32 GGUF base and GGUF LoRA files load in stock llama-cpp-python (llama.cpp's qwen35, value
heads reordered for its tiled key-head repeat) and match PyTorch+PEFT, logits and greedy
tokens. Both run on onnxruntime and llama-cpp-python directly: edgepeft's runtime does not carry
per-sequence states yet, and export refuses Qwen3.5 bundles until it does (tested below)."""

import numpy as np
import pytest

from edgepeft.errors import UnsupportedModel
from edgepeft.exporters.hf_base import load_base
from edgepeft.exporters.onnx_adapter import adapter_tensors
from edgepeft.exporters.onnx_graph import add_base_path, build_decoder
from edgepeft.kinds import read_peft_adapter
from edgepeft.runtime_contract import kv_names, state_names
from factory import all_linear, make_base, make_lora, reference_logits
from test_families import make_ia3
from hybrid_checks import (f32_gguf_files, fp32_graph, GGUF_REL, TOL, assert_decode_steps_are_peft, assert_onnx_scores_are_peft,
                           assert_stock_logits_are_peft, empty_cache, ort_session, peft_greedy, run, stock_greedy, stock_llama)

ARCH = "qwen3_5_text"
KERNEL, CHANNELS = 4, 2 * 2 * 16 + 4 * 16  # tests/factory.py's config: q and k of 2 key heads, v of 4 value heads
# Far longer than the kernel and than LinearAttention's default chunk (64).
PROMPT_IDS = [int(i) for i in np.random.default_rng(3).integers(3, 260, 150)]


def perturb_vectors(base_dir, seed: int):
    """The base's 1-D weights (norms, A_log, dt_bias) moved off their initial values, saved in
    place: a norm left at zero would not show whether `1 + w` is applied."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(base_dir, safe_serialization=True)
    return base_dir


@pytest.fixture(scope="module")
def qwen35(tmp_path_factory):
    """The tiny Qwen3.5 (tied head, as the small releases ship), its adapters, and an
    onnxruntime session on its fp32 graph with the base path."""
    root = tmp_path_factory.mktemp("qwen35")
    base = perturb_vectors(make_base(root / "base", ARCH, seed=7, tie=True), seed=8)
    linear = all_linear(ARCH)
    adapters = {
        "all": make_lora(base, root / "all", seed=2, r=8, lora_alpha=16, use_rslora=True, target_modules=linear),
        "pattern": make_lora(base, root / "pattern", seed=3, r=2, lora_alpha=4, target_modules=linear[4:],
                             rank_pattern={"in_proj_qkv": 6}, alpha_pattern={"out_proj": 9}),
        "dora": make_lora(base, root / "dora", seed=4, r=4, lora_alpha=8, use_dora=True,
                          target_modules=["in_proj_qkv", "in_proj_a", "out_proj", "q_proj"]),
        "ia3": make_ia3(base, root / "ia3", seed=5, target_modules=["in_proj_z", "out_proj", "v_proj", "down_proj"],
                        feedforward_modules=["down_proj"]),
        "bias": make_lora(base, root / "bias", seed=6, r=4, lora_alpha=8, lora_bias=True,
                          target_modules=["in_proj_qkv", "in_proj_b", "o_proj"]),
    }
    return (base, adapters, *fp32_graph(base, adapters))


@pytest.fixture(scope="module")
def qwen35_gguf(qwen35, tmp_path_factory):
    """The F32 GGUF base and the GGUF LoRA files of the adapters that have one (DoRA has not)."""
    return f32_gguf_files(*qwen35[:2], tmp_path_factory.mktemp("qwen35_gguf"))


def test_graph_carries_deltanet_states_and_a_kv_cache_for_attention_layers(qwen35):
    _, _, session, info, _ = qwen35
    names = {i.name: i.shape for i in session.get_inputs()}
    assert info["kv"]["layers"] == [3]
    for i in (0, 1, 2):
        assert names[state_names(i, "conv")[0]] == ["batch", CHANNELS, KERNEL - 1]
        assert names[state_names(i, "recurrent")[0]] == ["batch", 4, 16, 16]
        assert kv_names(i)[0] not in names
    assert kv_names(3)[0] in names and state_names(3, "conv")[0] not in names
    slots = {s["module"] for s in info["slots"]}
    assert {"model.layers.0.linear_attn.linear_in_proj", "model.layers.0.linear_attn.linear_out_proj",
            "model.layers.3.self_attn.qkv_proj", "model.layers.3.self_attn.o_proj"} <= slots


def test_fp32_onnx_scores_like_peft_with_every_adapter_in_any_order(qwen35):
    assert_onnx_scores_are_peft(*qwen35, PROMPT_IDS, ["all", None, "dora", "ia3", "pattern", "bias", "all", None, "dora"])


@pytest.mark.parametrize("adapter", [None, "all"])
def test_prefill_then_single_token_decode_matches_scoring_the_whole_text(qwen35, adapter):
    """A prefill of 7 tokens (past the kernel), then 143 steps of one token each (past 64 new
    tokens), each step reading the states and KV cache the previous one wrote."""
    cache = assert_decode_steps_are_peft(*qwen35, adapter, PROMPT_IDS, 7)
    for state in ("conv", "recurrent"):
        assert np.abs(cache[state_names(0, state)[0]]).max() > 0


def test_gguf_base_has_llama_cpps_qwen35_layout(qwen35_gguf):
    from gguf import GGUFReader

    reader = GGUFReader(qwen35_gguf[0])
    fields = {f.name: f.contents() for f in reader.fields.values()}
    assert fields["general.architecture"] == "qwen35"
    assert fields["qwen35.ssm.conv_kernel"] == KERNEL and fields["qwen35.ssm.state_size"] == 16
    assert fields["qwen35.ssm.group_count"] == 2 and fields["qwen35.ssm.time_step_rank"] == 4
    assert fields["qwen35.full_attention_interval"] == 4 and fields["qwen35.rope.dimension_count"] == 16
    tensors = {t.name: t for t in reader.tensors}
    conv = tensors["blk.0.ssm_conv1d.weight"]
    assert list(conv.shape) == [KERNEL, CHANNELS] and conv.tensor_type.name == "F32"  # ggml order: [kernel, channels]
    assert list(tensors["blk.3.attn_q.weight"].shape) == [64, 2 * 4 * 64]  # query and gate per head
    for name in ("attn_qkv", "attn_gate", "ssm_beta", "ssm_alpha", "ssm_out", "ssm_norm"):
        assert f"blk.0.{name}.weight" in tensors, name
    assert "blk.0.ssm_a" in tensors and "blk.0.ssm_dt.bias" in tensors and "output.weight" not in tensors


def test_f32_gguf_with_lora_in_stock_llama_cpp_matches_peft(qwen35, qwen35_gguf):
    base, adapters = qwen35[:2]
    assert_stock_logits_are_peft(base, adapters, *qwen35_gguf, [None, "all", "pattern"], PROMPT_IDS)


@pytest.mark.parametrize("adapter", [None, "all"])
def test_stock_llama_cpp_greedy_tokens_are_peft_generates(qwen35, qwen35_gguf, adapter):
    """70 new tokens: llama.cpp carries each DeltaNet layer's states from step to step."""
    base, adapters = qwen35[:2]
    model, files = qwen35_gguf
    prompt = PROMPT_IDS[:9]
    assert stock_greedy(model, files[adapter], prompt, 70) == peft_greedy(base, adapters.get(adapter), prompt, 70)


def test_gguf_refuses_layer_types_llama_cpp_would_run_otherwise(tmp_path):
    """llama.cpp's qwen35 reads the layer kinds from full_attention_interval, not layer_types."""
    from edgepeft.exporters.gguf_base import write_base_gguf

    types = ["linear_attention", "full_attention", "linear_attention", "full_attention"]
    base = make_base(tmp_path / "base", ARCH, seed=8, layer_types=types)
    with pytest.raises(UnsupportedModel, match="every 4th layer as attention.*--format onnx"):
        write_base_gguf(load_base(str(base)), tmp_path / "b.gguf", "F32")


def make_vlm(out, seed: int = 9):
    """A tiny Qwen3_5ForConditionalGeneration (the released checkpoints' class: text weights
    under model.language_model., a vision tower beside), the factory's text config inside."""
    import torch
    import transformers

    from factory import ARCHS, make_tokenizer

    tok = make_tokenizer(out)
    text = dict(ARCHS[ARCH][2], vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
    cfg = transformers.Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.Qwen3_5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08) if p.ndim == 2 else p.add_(torch.randn(p.shape) * 0.2)
    model.save_pretrained(out, safe_serialization=True)
    return out, model


def test_a_vision_language_checkpoints_text_exports_as_the_text_model(tmp_path):
    """Qwen3.5's released checkpoints: the text config and model.language_model.* weights are
    read (the vision tower left out), lazily and whole, and the graph and the GGUF file score as
    the VLM does on text."""
    import torch

    from edgepeft.exporters.gguf_base import write_base_gguf

    base, vlm = make_vlm(tmp_path / "vlm")
    assert any(k.startswith("model.visual.") for k in vlm.state_dict())
    with torch.no_grad():
        ref = vlm(input_ids=torch.tensor([PROMPT_IDS])).logits[0].numpy()
    for lazy in (True, False):
        loaded = load_base(str(base), lazy=lazy)
        assert loaded.config.model_type == ARCH and not loaded.dims["tie_word_embeddings"]
        proto, info = build_decoder(loaded, "fp32")
        got, _ = run(ort_session(proto), info, PROMPT_IDS, 0, empty_cache(info))
        err = np.abs(got - ref).max()
        assert err <= TOL, f"lazy={lazy}: max abs {err}"
    write_base_gguf(loaded, tmp_path / "vlm.gguf", "F32")
    llm = stock_llama(tmp_path / "vlm.gguf", None, logits_all=True)
    llm.eval(PROMPT_IDS)
    got = np.array(llm.scores[:len(PROMPT_IDS)])
    llm.close()
    assert np.abs(got - ref).max() / (ref.max() - ref.min()) <= GGUF_REL


def test_layer_kinds_and_states_come_from_the_config():
    from transformers import Qwen3_5TextConfig

    from edgepeft.exporters.archs import ARCHS, DELTA_NET, layout
    from edgepeft.exporters.hf_base import _dims

    cfg = Qwen3_5TextConfig(num_hidden_layers=8)  # the defaults are Qwen3.5-9B's text model
    dims = _dims(cfg)
    lay = layout(ARCHS[ARCH], cfg, dims)
    assert lay.mixers == (DELTA_NET,) * 3 + ("attention",) + (DELTA_NET,) * 3 + ("attention",)
    assert lay.states[0] == {"conv": (2 * 16 * 128 + 32 * 128, 3), "recurrent": (32, 128, 128)}
    assert lay.attention_layers() == [3, 7] and lay.rotary_dim == 64


def test_a_lazy_base_computes_what_the_float32_model_computes(qwen35):
    """Calibration runs the lazy base (checkpoint.float32_compute): the DeltaNet's convolution
    weights, which transformers reads without calling its Conv1d, and its A_log and dt_bias,
    which it reads as parameters of the block, must be read too."""
    import torch

    from edgepeft.exporters.checkpoint import float32_compute
    from factory import load_reference

    base = qwen35[0]
    lazy = load_base(str(base))
    with torch.no_grad(), float32_compute(lazy):
        got = lazy.model(torch.tensor([PROMPT_IDS])).logits
    with torch.no_grad():
        want = load_reference(base)(torch.tensor([PROMPT_IDS])).logits
    assert torch.equal(got, want)


def test_int4_graph_as_export_builds_it_decodes_with_its_states_and_stays_close(qwen35, tmp_path):
    """The int4 path export takes (calibration, importance-weighted 4-bit blocks, MatMulNBits,
    the exact head of a tied lm_head), written and read back: decoding through the states gives
    the graph's own scoring, and its KL from PyTorch is small. The exact head recomputes the k
    largest 4-bit logits of each position, and a logit at the k-th rank can be in that set on
    one path and not the other: the top half of the k are compared."""
    import onnxruntime as ort

    from edgepeft.bundle import Bundle, new_manifest
    from edgepeft.exporters.onnx_export import export_onnx
    from edgepeft.exporters.onnx_quant import EXACT_HEAD_TOP_K
    from edgepeft.exporters.progress import QUIET

    base = qwen35[0]
    entry = export_onnx(Bundle(tmp_path, new_manifest(base={}, tokenizer={})), load_base(str(base)), "int4", "lora",
                        32, 4, None, QUIET)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(tmp_path / entry["model"]), options, providers=["CPUExecutionProvider"])
    full, _ = run(session, entry, PROMPT_IDS, 0, empty_cache(entry))
    logits, cache = run(session, entry, PROMPT_IDS[:7], 0, empty_cache(entry))
    steps = [logits]
    for t in range(7, 80):
        logits, cache = run(session, entry, PROMPT_IDS[t:t + 1], t, cache)
        steps.append(logits)
    steps, top = np.concatenate(steps), EXACT_HEAD_TOP_K // 2
    assert (steps.argmax(-1) == full[:80].argmax(-1)).all()
    assert np.abs(np.sort(steps, -1)[:, -top:] - np.sort(full[:80], -1)[:, -top:]).max() <= TOL
    ref = reference_logits(base, None, PROMPT_IDS)
    p = np.exp(ref - ref.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    log_q = full - full.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    kl = (p * (np.log(p) - log_q)).sum(-1).mean()
    assert kl < 0.05, kl


def test_an_adapter_trained_on_the_vision_language_model_exports_on_its_text(tmp_path):
    """PEFT on Qwen3_5ForConditionalGeneration names modules model.language_model.layers.N...:
    read as the text model's; logits match PeftModel on the VLM. One that adapts the vision
    tower is refused in one line."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from edgepeft.errors import UnsupportedAdapter

    base, vlm = make_vlm(tmp_path / "vlm")
    text = r".*language_model.*\.(in_proj_qkv|in_proj_z|out_proj|q_proj|v_proj|down_proj)"
    for name, targets in (("text", text), ("vision", r".*visual.*\.qkv")):
        peft = get_peft_model(vlm, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
        peft.save_pretrained(tmp_path / name, safe_serialization=True)
        vlm = peft.unload()
    with pytest.raises(UnsupportedAdapter, match="adapts a vision or audio tower") as e:
        read_peft_adapter(tmp_path / "vision")
    assert "\n" not in str(e.value)
    spec = read_peft_adapter(tmp_path / "text")
    assert "model.layers.0.linear_attn.in_proj_qkv" in spec.modules
    loaded = load_base(str(base))
    proto, info = build_decoder(loaded, "fp32")
    feeds = adapter_tensors(spec, info, loaded)
    got, _ = run(ort_session(add_base_path(proto, info)), info, PROMPT_IDS, 0, empty_cache(info), feeds)
    with torch.no_grad():
        peft = PeftModel.from_pretrained(vlm, tmp_path / "text").eval()
        ref = peft(input_ids=torch.tensor([PROMPT_IDS])).logits[0].numpy()
        with peft.disable_adapter():
            plain = peft(input_ids=torch.tensor([PROMPT_IDS])).logits[0].numpy()
    err = np.abs(got - ref).max()
    assert err <= TOL, f"max abs {err}"
    assert np.abs(ref - plain).max() > 0.05  # the adapter really changes the model
