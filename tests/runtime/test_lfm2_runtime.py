"""LFM2 (short-convolution layers between attention layers) through edgepeft's runtime: bundles
exported by export_bundle with two LoRA adapters, run by the Engine on both backends. Greedy
tokens equal PeftModel.generate's with each adapter and the base, switched in any order, a
second call after the first starting again from zero states; each sequence owns its
convolution states (ONNX: OnnxSequence, reset to zeros, never trimmed; GGUF: llama.cpp's
hybrid memory, reset whole); both batchers decode rows on mixed adapters as each row alone
(the ONNX one carrying each row's convolution states); int4 ONNX decodes through its states as
it scores; --merge bakes an adapter in; prompt-learning kinds are refused at export; verify
runs (serve: tests/server/test_lfm2_serve.py)."""

import json
import numpy as np
import pytest

from edgepeft.errors import EngineError, UnsupportedAdapter
from edgepeft.exporters import add_adapter, export_bundle
from factory import all_linear, make_base, make_lora, make_prompt_adapter
from hybrid_checks import concurrent_completions, greedy_engine, peft_tokens_by_adapter

PROMPT = [int(i) for i in np.random.default_rng(3).integers(3, 260, 9)]  # longer than the kernel (5)
NEW = 70  # past 64 new tokens
ORDER = ["all", None, "conv", "all", None, "conv"]


@pytest.fixture(scope="module")
def lfm2(tmp_path_factory):
    """The tiny LFM2 (tied head), two LoRA adapters, and its fp32 + F32 bundle."""
    root = tmp_path_factory.mktemp("lfm2rt")
    base = make_base(root / "base", "lfm2", seed=7, tie=True)
    adapters = {
        "all": make_lora(base, root / "all", seed=2, r=8, lora_alpha=16, use_rslora=True,
                         target_modules=all_linear("lfm2")),
        "conv": make_lora(base, root / "conv", seed=3, r=4, lora_alpha=8, target_modules=["in_proj", "out_proj"],
                          rank_pattern={"in_proj": 6}),
    }
    bundle = export_bundle(str(base), root / "bundle", {n: str(p) for n, p in adapters.items()}, formats="onnx,gguf",
                           onnx_quant="fp32", gguf_quant="F32", quiet=True)
    return base, adapters, bundle


@pytest.fixture(scope="module")
def peft_tokens(lfm2):
    return peft_tokens_by_adapter(*lfm2[:2], PROMPT, NEW)


@pytest.mark.parametrize("backend", ["onnx", "gguf"])
def test_engine_greedy_tokens_are_peft_generates_switching_adapters_in_any_order(lfm2, peft_tokens, backend):
    """Each call is a new sequence: a second call on the same adapter gives the same tokens."""
    e = greedy_engine(lfm2[2], backend)
    for name in ORDER:
        assert e.complete(PROMPT, adapter=name, max_new_tokens=NEW).tokens == peft_tokens[name], name


@pytest.mark.parametrize("backend", ["onnx", "gguf"])
def test_a_sequence_resets_whole_and_never_drops_part_of_its_state(lfm2, backend):
    e = greedy_engine(lfm2[2], backend)
    handle = e.adapter_handle("conv")
    with e.backend.open_sequence(handle, 64) as fresh:
        want = np.array(fresh.forward(PROMPT, all_logits=True))
    with e.backend.open_sequence(handle, 64) as seq:
        seq.forward(PROMPT[:6])
        seq.forward(PROMPT[6:7])
        assert not seq.can_trim()
        with pytest.raises(EngineError, match="cannot drop"):
            seq.trim(2)
        seq.reset()
        assert seq.length == 0
        got = np.array(seq.forward(PROMPT, all_logits=True))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_onnx_sequence_holds_conv_states_beside_the_attention_layers_kv(lfm2):
    e = greedy_engine(lfm2[2], "onnx")
    assert e.backend.kv_layers == [1, 3]
    with e.backend.open_sequence(None, 32) as seq:
        assert [names for names, _, _ in seq.states] == [("past_conv.0", "present_conv.0"),
                                                         ("past_conv.2", "present_conv.2")]
        assert len(seq.kv) == 2 * 2  # key and value of the two attention layers
        seq.forward(PROMPT)
        past = seq.states[0][1].numpy()
        assert past.shape == (1, 64, 4) and np.abs(past).max() > 0  # the run's state is the next past
        seq.reset()
        assert not np.any(seq.states[0][1].numpy())


@pytest.mark.parametrize("backend", ["onnx", "gguf"])
def test_concurrent_calls_on_mixed_adapters_batch_and_give_peft_generates_tokens(lfm2, peft_tokens, backend):
    e = greedy_engine(lfm2[2], backend, threads=1)
    assert all(e.backend.can_batch(e.adapter_handle(n)) for n in (None, "all", "conv"))
    got = concurrent_completions(e, PROMPT, ORDER, NEW)
    assert e._scheduler  # the calls went through the batcher
    assert got == [peft_tokens[n] for n in ORDER]


@pytest.mark.parametrize("backend", ["onnx", "gguf"])
def test_batcher_rows_on_mixed_adapters_decode_as_each_row_alone(lfm2, backend):
    """Rows of different lengths and adapters; the first two decode (the second riding along
    the first's steps with a placeholder token) before the last two join."""
    e = greedy_engine(lfm2[2], backend, threads=1)
    be = e.backend
    rows_of = [(None, PROMPT[:6]), ("all", PROMPT), ("conv", PROMPT[:7]), ("all", PROMPT[2:])]
    batcher = be.batcher()
    rows, logits = [], []
    for k, (name, prompt) in enumerate(rows_of):
        row = batcher.open_row(e.adapter_handle(name), 64)
        rows.append(row)
        logits.append([row.forward(prompt)[-1].copy()])
        if k >= 2:
            continue  # the last two join, then all step together
        for _ in range(5):
            step = batcher.step([row], [int(np.argmax(logits[k][-1]))])
            logits[k].append(step[0].copy())
    for _ in range(8):
        step = batcher.step(rows, [int(np.argmax(lg[-1])) for lg in logits])
        for lg, out in zip(logits, step):
            lg.append(out.copy())
    assert not rows[0].can_trim()
    batcher.close()
    for (name, prompt), got in zip(rows_of, logits):
        with be.open_sequence(e.adapter_handle(name), 64) as seq:
            want = [seq.forward(prompt)[-1].copy()]
            for _ in range(len(got) - 1):
                want.append(seq.forward([int(np.argmax(want[-1]))])[-1].copy())
        assert np.abs(np.array(got) - np.array(want)).max() <= 1e-4, name


def test_int4_bundle_decodes_through_its_states_as_it_scores(lfm2, tmp_path):
    """Each greedy token of the int4 graph is the argmax of its scoring the whole text. (A
    quantized GGUF is not run here: llama.cpp's AMX kernels crash on this CPU, docs/devices.md.)"""
    base, adapters, _ = lfm2
    bundle = export_bundle(str(base), tmp_path / "q", {n: str(p) for n, p in adapters.items()}, formats="onnx",
                           onnx_quant="int4", quiet=True)
    e = greedy_engine(bundle, "onnx")
    for name in ("conv", None, "all"):
        tokens = e.complete(PROMPT, adapter=name, max_new_tokens=NEW).tokens
        scores = e.score(PROMPT + tokens, adapter=name)
        assert tokens == [int(t) for t in scores[len(PROMPT) - 1:-1].argmax(-1)], name


def test_a_merged_adapter_runs_as_peft_on_both_backends(lfm2, peft_tokens, tmp_path):
    """--merge on the lazy base (exporters/merge.py): the convolution blocks' weights as well."""
    base, adapters, _ = lfm2
    bundle = export_bundle(str(base), tmp_path / "m", {"all": str(adapters["all"])}, formats="onnx,gguf",
                           onnx_quant="fp32", gguf_quant="F32", merge="all", quiet=True)
    for backend in ("onnx", "gguf"):
        assert greedy_engine(bundle, backend).complete(PROMPT, max_new_tokens=NEW).tokens == peft_tokens["all"], backend


@pytest.mark.parametrize("kind", ["PROMPT_TUNING", "PREFIX_TUNING"])
def test_prompt_learning_kinds_are_refused_on_a_hybrid_in_one_line(lfm2, kind, tmp_path):
    base, _, bundle = lfm2
    adapter = make_prompt_adapter(base, tmp_path / "p", peft_type=kind)
    with pytest.raises(UnsupportedAdapter, match="carry a convolution state instead of a KV cache") as e:
        export_bundle(str(base), tmp_path / "b", {"p": str(adapter)}, formats="onnx", onnx_quant="fp32", quiet=True)
    assert "\n" not in str(e.value) and not (tmp_path / "b").exists()
    with pytest.raises(UnsupportedAdapter, match="carry a convolution state"):
        add_adapter(bundle.root, "p", adapter, formats="onnx")
    assert "p" not in type(bundle).open(bundle.root).adapters


def test_verify_passes_the_lfm2_bundle_on_both_backends(lfm2, capsys):
    from edgepeft.cli import main

    base, adapters, bundle = lfm2
    assert main(["verify", str(bundle.root), "--reference", str(base), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["ok"] and {(c["backend"], c["adapter"]) for c in r["checks"]} == {
        (b, a) for b in ("onnx", "gguf") for a in (None, *adapters)}
    assert all(c["top1"] == 1.0 for c in r["checks"])


def test_gguf_check_reads_kv_heads_per_layer(lfm2):
    """llama.cpp's lfm2 writes head_count_kv as one value per layer, 0 for a convolution layer."""
    from edgepeft.errors import BundleError
    from edgepeft.runtime.gguf_check import check_base_gguf

    bundle = lfm2[2]
    path = bundle.file(bundle.backends["gguf"]["model"])
    assert check_base_gguf(path, bundle.base)[0] == "lfm2"
    for field, value in (("num_kv_heads", 2), ("num_layers", 3)):
        other = {**bundle.base, "dims": {**bundle.base["dims"], field: value}}
        with pytest.raises(BundleError, match="a GGUF of another model") as e:
            check_base_gguf(path, other)
        assert "\n" not in str(e.value)
