"""Prompt tuning, P-tuning and prefix tuning on the ONNX backend: a KV-cache prefix per adapter,
swapped per call, exact against PEFT; refused with one-line errors where they cannot run."""

import json
import subprocess
import sys

import numpy as np
import pytest

from edgepeft.errors import AdapterError, AdapterMismatch, EngineError, UnsupportedAdapter
from edgepeft.exporters import export_bundle
from edgepeft.kinds import read_peft_adapter
from edgepeft.runtime import Engine
from factory import make_base, make_lora, make_prompt_adapter, reference_logits

TOL = 1e-3
PROMPT = "the quick brown fox jumps over the lazy dog, then rests"

# name -> (peft_type, options): every prompt-learning variant we encode.
VARIANTS = {
    "prompt": ("PROMPT_TUNING", {"num_virtual_tokens": 5}),
    "ptune": ("P_TUNING", {"num_virtual_tokens": 4, "encoder_hidden_size": 32}),  # MLP encoder
    "prefix": ("PREFIX_TUNING", {"num_virtual_tokens": 3}),
    "prefixproj": ("PREFIX_TUNING", {"num_virtual_tokens": 6, "prefix_projection": True, "encoder_hidden_size": 16}),
}


def edgepeft(*args):
    p = subprocess.run([sys.executable, "-m", "edgepeft", *map(str, args)], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def peft_model(base_dir, adapter_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                     adapter_dir).eval()


def make_variants(base_dir, root, seed: int) -> dict:
    return {name: make_prompt_adapter(base_dir, root / name, peft_type, seed=seed + i, **opts)
            for i, (name, (peft_type, opts)) in enumerate(VARIANTS.items())}


@pytest.fixture(scope="module")
def llama_prompts(tiny_llama, tmp_path_factory):
    return make_variants(tiny_llama, tmp_path_factory.mktemp("llama_prompts"), seed=10)


@pytest.fixture(scope="module")
def qwen2_prompts(tiny_qwen2, tmp_path_factory):
    return make_variants(tiny_qwen2, tmp_path_factory.mktemp("qwen2_prompts"), seed=20)


@pytest.fixture(scope="module")
def llama_bundle(tiny_llama, llama_prompts, llama_adapters, tmp_path_factory):
    adapters = {**{n: str(p) for n, p in llama_prompts.items()}, "lora": str(llama_adapters["qv"])}
    return export_bundle(str(tiny_llama), tmp_path_factory.mktemp("prompt_bundle") / "b", adapters,
                         onnx_quant="fp32", quiet=True)


# ---- reading -------------------------------------------------------------------------------------
def test_reading_records_kind_peft_type_and_virtual_tokens(llama_prompts):
    for name, (peft_type, opts) in VARIANTS.items():
        spec = read_peft_adapter(llama_prompts[name])
        summary = spec.summary()
        assert summary["kind"] == ("prefix" if peft_type == "PREFIX_TUNING" else "prompt")
        assert summary["peft_type"] == peft_type
        assert summary["num_virtual_tokens"] == opts["num_virtual_tokens"]
        assert "rank" not in summary and "targets" not in summary


def test_prefix_reshape_matches_peft_get_prompt(tiny_llama, llama_prompts):
    from edgepeft.kinds.prefix import past_key_values

    for name in ("prefix", "prefixproj"):
        want = peft_model(tiny_llama, llama_prompts[name]).get_prompt(batch_size=1)
        got = past_key_values(read_peft_adapter(llama_prompts[name]))
        assert len(got) == len(want.layers) == 2
        for (k, v), layer in zip(got, want.layers):
            assert k.shape == (2, VARIANTS[name][1]["num_virtual_tokens"], 16)  # GQA: 2 KV heads, not 4
            assert np.array_equal(k, layer.keys[0].detach().numpy()) and np.array_equal(v, layer.values[0].detach().numpy())


def _rewrite(adapter_dir, dest, config=None, tensors=None):
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(adapter_dir, dest)
    cfg = json.loads((dest / "adapter_config.json").read_text())
    cfg.update(config or {})
    (dest / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        save_file(tensors(load_file(str(dest / "adapter_model.safetensors"))), str(dest / "adapter_model.safetensors"))
    return dest


@pytest.mark.parametrize("change, error, message", [
    ({"tensors": lambda t: {"prompt_embeddings": t["prompt_embeddings"][:, :-1]}}, AdapterError,
     "prompt_embeddings is [5, 63], expected [5, 64]"),
    ({"tensors": lambda t: {**t, "extra": t["prompt_embeddings"]}}, AdapterError, "exactly one tensor"),
    ({"config": {"task_type": "SEQ_CLS"}}, UnsupportedAdapter, "task_type SEQ_CLS"),
    ({"config": {"num_transformer_submodules": 2}}, UnsupportedAdapter, "num_transformer_submodules=2"),
    ({"config": {"peft_type": "MULTITASK_PROMPT_TUNING"}}, UnsupportedAdapter, "MULTITASK_PROMPT_TUNING is not supported"),
])
def test_bad_prompt_adapters_are_refused_naming_the_file(change, error, message, llama_prompts, tmp_path):
    bad = _rewrite(llama_prompts["prompt"], tmp_path / "bad", **change)
    with pytest.raises(error) as e:
        read_peft_adapter(bad)
    assert message in str(e.value) and str(bad) in str(e.value) and "\n" not in str(e.value)


# ---- parity --------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fp32_scores_match_peft_for_every_kind_in_any_switch_order(arch, tiny_llama, tiny_qwen2, llama_prompts,
                                                                 qwen2_prompts, llama_adapters, llama_bundle,
                                                                 tmp_path):
    if arch == "llama":
        base, prompts, bundle = tiny_llama, llama_prompts, llama_bundle
        loras = {"lora": llama_adapters["qv"]}
    else:
        base, prompts = tiny_qwen2, qwen2_prompts
        loras = {"lora": make_lora(tiny_qwen2, tmp_path / "lora", seed=6, r=4, target_modules=["q_proj", "v_proj"])}
        bundle = export_bundle(str(base), tmp_path / "b", {n: str(p) for n, p in {**prompts, **loras}.items()},
                               onnx_quant="fp32", quiet=True)
    engine = Engine.open(bundle.root)
    ids = engine.tokenizer.encode(PROMPT)
    refs = {None: reference_logits(base, None, ids), **{n: reference_logits(base, p, ids) for n, p in loras.items()}}
    for name, path in prompts.items():
        # PEFT's prompt tuning returns logits for the virtual tokens too; compare the real ones.
        refs[name] = reference_logits(base, path, ids)[-len(ids):]
        assert np.abs(refs[name] - refs[None]).max() > 0.1, f"{name} does not change the model"
    order = ["prompt", None, "prefix", "lora", "prompt", "ptune", "prefixproj", None, "prefix", "ptune", "lora"]
    for name in order:
        got = engine.score(ids, adapter=name)
        assert got.shape == refs[None].shape
        err = np.abs(got - refs[name]).max()
        assert err <= TOL, f"{arch} adapter={name}: max abs {err}"


@pytest.mark.parametrize("name", ["prompt", "ptune", "prefixproj"])
def test_greedy_generation_matches_peft_greedy_decoding(name, tiny_llama, llama_prompts, llama_bundle):
    import torch

    engine = Engine.open(llama_bundle.root)
    ids = engine.tokenizer.encode("once upon a time")
    # Greedy decoding by PeftModel's forward over the whole text at each step. PeftModel.generate
    # is the same on transformers 4.57, but on 5.x (PEFT 0.21) it drops prompt-learning adapters
    # and returns the base's tokens, so it cannot be the reference there.
    model, seq = peft_model(tiny_llama, llama_prompts[name]), list(ids)
    with torch.no_grad():
        for _ in range(10):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    want = seq[len(ids):]
    got = engine.complete("once upon a time", adapter=name, max_new_tokens=10, ignore_eos=True)
    assert got.tokens == want
    assert "".join(engine.stream("once upon a time", adapter=name, max_new_tokens=10)) == \
        engine.generate("once upon a time", adapter=name, max_new_tokens=10)


def test_add_adapter_computes_the_prompt_prefix_from_the_recorded_base(tiny_llama, llama_prompts, tmp_path):
    from edgepeft.exporters import add_adapter

    bundle = export_bundle(str(tiny_llama), tmp_path / "b", onnx_quant="fp32", quiet=True)
    add_adapter(bundle.root, "ptune", llama_prompts["ptune"])
    engine = Engine.open(bundle.root)
    ids = engine.tokenizer.encode(PROMPT)
    want = reference_logits(tiny_llama, llama_prompts["ptune"], ids)[-len(ids):]
    assert np.abs(engine.score(ids, adapter="ptune") - want).max() <= TOL
    assert engine.bundle.adapters["ptune"]["num_virtual_tokens"] == 4


# ---- context --------------------------------------------------------------------------------------
def test_context_length_counts_the_virtual_tokens(tiny_llama, llama_prompts, tmp_path):
    bundle = export_bundle(str(tiny_llama), tmp_path / "b", {"prompt": str(llama_prompts["prompt"])},
                           onnx_quant="fp32", context_length=12, quiet=True)
    engine = Engine.open(bundle.root)
    engine.score(list(range(10, 22)))  # 12 real tokens fit without the adapter ...
    with pytest.raises(EngineError, match="exceed"):
        engine.score(list(range(10, 22)), adapter="prompt")  # ... not after 5 virtual ones
    assert engine.score(list(range(10, 17)), adapter="prompt").shape[0] == 7
    # The last generated token needs no cache position: context - virtual - prompt + 1 tokens.
    assert len(engine.complete("abcd", max_new_tokens=50, ignore_eos=True).tokens) == 12 - 4 + 1
    out = engine.complete("abcd", adapter="prompt", max_new_tokens=50, ignore_eos=True)
    assert len(out.tokens) == 12 - 5 - 4 + 1 and out.stop_reason == "length"
    with pytest.raises(EngineError, match="5 virtual tokens"):
        engine.complete("abcdefg", adapter="prompt", max_new_tokens=5)
    with pytest.raises(UnsupportedAdapter, match="leave no room"):
        export_bundle(str(tiny_llama), tmp_path / "c", {"p": str(llama_prompts["prefixproj"])},
                      onnx_quant="fp32", context_length=6, quiet=True)


# ---- refusals -------------------------------------------------------------------------------------
def test_prefix_adapter_for_another_base_is_refused(tiny_llama, tmp_path):
    other = make_base(tmp_path / "other", "llama", seed=3, layers=3)
    ad = make_prompt_adapter(other, tmp_path / "ad", "PREFIX_TUNING", num_virtual_tokens=2)
    code, _, err = edgepeft("export", tiny_llama, "--out", tmp_path / "o", "--onnx-quant", "fp32", "--quiet",
                            "--adapter", f"p={ad}")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "prefix is for 3 layers" in err and "another base" in err and str(ad) in err
    assert not (tmp_path / "o").exists()


def test_runtime_refuses_a_bad_prefix_file(llama_bundle, tmp_path):
    import onnxruntime as ort

    from edgepeft.runtime_contract import fingerprint_version

    engine = Engine.open(llama_bundle.root, load_adapters=False)

    def write(params, version=fingerprint_version(llama_bundle.fingerprint)):
        fmt = ort.AdapterFormat()
        fmt.set_adapter_version(1)
        fmt.set_model_version(version)
        fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
        path = tmp_path / f"a{len(list(tmp_path.iterdir()))}.onnx_adapter"
        fmt.export_adapter(str(path))
        return path

    ok = {f"prefix.{i}.{p}": np.zeros((2, 3, 16), np.float32) for i in range(2) for p in ("key", "value")}
    engine.load_adapter("ok", write(ok))
    assert engine.score([5, 6, 7], adapter="ok").shape == (3, engine.bundle.base["dims"]["vocab_size"])
    cases = [
        ({**ok, "prefix.0.key": np.zeros((4, 3, 16), np.float32)}, "this base's KV cache is"),
        ({**ok, "prefix.1.value": np.zeros((2, 4, 16), np.float32)}, "lengths differ"),
        ({k: v for k, v in ok.items() if not k.startswith("prefix.1.")}, "missing layers"),
        ({**ok, "prefix.2.key": np.zeros((2, 3, 16), np.float32)}, "unexpected parameter 'prefix.2.key'"),
        ({k: v.astype(np.float16) for k, v in ok.items()}, "tensor(float16)"),
    ]
    for params, message in cases:
        with pytest.raises(AdapterMismatch, match=message.replace("(", r"\(").replace(")", r"\)")):
            engine.load_adapter("bad", write(params))
    with pytest.raises(AdapterMismatch, match="another base"):
        engine.load_adapter("bad", write(ok, version=1))


def test_gguf_and_merge_refusals_are_one_line(tiny_llama, llama_prompts, tmp_path):
    for name in ("prompt", "prefix"):
        code, _, err = edgepeft("export", tiny_llama, "--out", tmp_path / "o", "--format", "onnx,gguf", "--quiet",
                                "--adapter", f"{name}={llama_prompts[name]}")
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "cannot be hot-swapped on gguf" in err and "onnx backend" in err
        code, _, err = edgepeft("export", tiny_llama, "--out", tmp_path / "o", "--quiet", "--merge", name,
                                "--adapter", f"{name}={llama_prompts[name]}")
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"--merge {name}" in err and "cannot be merged" in err
    assert not (tmp_path / "o").exists()


def test_inspect_shows_virtual_tokens(llama_bundle):
    code, out, err = edgepeft("inspect", llama_bundle.root)
    assert code == 0, err
    assert "5 virtual tokens (PROMPT_TUNING)" in out and "4 virtual tokens (P_TUNING)" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.split("support", 1)[1].splitlines()[1:] if line.strip()}
    assert rows["prompt"] == rows["prefix"] == ["swap", "no"]


def test_prompt_learning_adapters_are_not_combined_with_others(llama_bundle):
    from edgepeft.errors import EngineError

    engine = Engine.open(llama_bundle.root)
    for combo in ("prefix+lora", "lora+prompt"):
        with pytest.raises(EngineError, match="virtual tokens"):
            engine.score([5, 6, 7], adapter=combo)
