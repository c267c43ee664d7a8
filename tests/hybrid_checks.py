"""Checks the hybrid families' tests share (LFM2, Qwen3.5; Gemma 4's KV sharing too): PeftModel's greedy tokens and
logits against stock llama-cpp-python and against the runtime."""

from __future__ import annotations

import threading

import numpy as np

from edgepeft.runtime_contract import ADAPTERS_ACTIVE, kv_names, kv_shape, state_names
from factory import load_reference, reference_logits

TOL = 1e-3  # ONNX fp32: max abs logit error, as for the other families
GGUF_REL = 1e-3  # max abs error over the logit range: the bound tests/exporters/test_families.py uses


def stock_llama(model, lora, **kwargs):
    """Stock llama-cpp-python on the F32 file with an F32 KV cache, flash attention off (as the
    runtime runs F32 bases: docs/design.md)."""
    from llama_cpp import GGML_TYPE_F32, Llama

    return Llama(model_path=str(model), lora_path=str(lora) if lora else None, n_ctx=256, verbose=False, seed=0,
                 type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False, **kwargs)


def peft_greedy(base, adapter, prompt: list[int], new: int) -> list[int]:
    """PeftModel.generate's `new` greedy tokens after `prompt` (adapter None: the base), never
    stopping early."""
    import torch
    from peft import PeftModel

    model = load_reference(base)
    if adapter:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def stock_greedy(model, lora, prompt: list[int], new: int, f32: bool = True) -> list[int]:
    """Stock llama-cpp-python's `new` greedy tokens: on an F32 file as stock_llama runs it, or
    (f32=False) with llama-cpp-python's defaults but flash attention on: our GGUF backend keeps
    llama.cpp's automatic choice, which turns it on for the CPU, and greedy tokens of a random
    model follow the attention kernel's rounding."""
    if f32:
        llm = stock_llama(model, lora)
    else:
        from llama_cpp import Llama

        llm = Llama(model_path=str(model), lora_path=str(lora) if lora else None, n_ctx=256, verbose=False, seed=0,
                    flash_attn=True)
    got = []
    for tok in llm.generate(prompt, top_k=1, temp=0.0):
        got.append(tok)
        if len(got) == new:
            break
    llm.close()
    return got


def assert_stock_logits_are_peft(base, adapters: dict, model, files: dict, names, prompt: list[int]) -> None:
    """Stock llama-cpp-python's logits over `prompt` on the F32 file with each adapter file
    (files[None]: none) within GGUF_REL of PeftModel's."""
    for name in names:
        llm = stock_llama(model, files[name], logits_all=True)
        llm.eval(prompt)
        got = np.array(llm.scores[:len(prompt)])
        llm.close()
        ref = reference_logits(base, adapters.get(name), prompt)
        rel = np.abs(got - ref).max() / (ref.max() - ref.min())
        assert rel <= GGUF_REL, f"adapter={name}: {rel}"


def concurrent_completions(engine, prompt: list[int], names: list, new: int) -> list[list[int]]:
    """engine.complete on each adapter of `names` at once, from one thread each: the tokens."""
    out = [None] * len(names)

    def call(i):
        out[i] = engine.complete(prompt, adapter=names[i], max_new_tokens=new).tokens

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def ort_session(proto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # slot inputs with defaults are meant to be overridable: no warnings
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def empty_cache(info) -> dict:
    """Each attention layer's empty KV cache and each convolution layer's zero state."""
    kv, cache = info["kv"], {}
    for i in kv["layers"]:
        nkv, hd = kv_shape(kv, i)
        for name in kv_names(i)[:2]:
            cache[name] = np.zeros((1, nkv, 0, hd), np.float32)
    for st in kv["states"]:
        cache[state_names(st["layer"], st["name"])[0]] = np.zeros((1, *st["shape"]), np.float32)
    return cache


def run(session, info, ids, past_len, cache, adapter_feeds=None):
    """One call over `ids` after `past_len` tokens: (logits [len(ids), vocab], the next cache)."""
    feeds = {"input_ids": np.array([ids], np.int64),
             "attention_mask": np.ones((1, past_len + len(ids)), np.int64), **cache}
    if adapter_feeds:
        feeds.update(adapter_feeds)
        feeds[ADAPTERS_ACTIVE] = np.ones(1, np.float32)
    pasts = list(cache)
    presents = [n.replace("past_key_values.", "present.") if n.startswith("past_key_values.")
                else n.replace("past_", "present_", 1) for n in pasts]
    out = session.run(["logits", *presents], feeds)
    return out[0][0], dict(zip(pasts, out[1:]))


def assert_onnx_scores_are_peft(base, adapters, session, info, feeds, prompt, order) -> None:
    """The fp32 graph scores `prompt` as PeftModel does with each adapter of `order` in turn (None:
    the base); every adapter changes the model."""
    refs = {name: reference_logits(base, path, prompt) for name, path in [(None, None), *adapters.items()]}
    for name in order:
        got, _ = run(session, info, prompt, 0, empty_cache(info), feeds.get(name))
        err = np.abs(got - refs[name]).max()
        assert err <= TOL, f"adapter={name}: max abs {err}"
    for name in adapters:  # the adapters really change the model
        assert np.abs(refs[name] - refs[None]).max() > 0.05, name


def assert_decode_steps_are_peft(base, adapters, session, info, feeds, adapter, prompt, prefill: int) -> dict:
    """A prefill of `prefill` tokens, then one token per step to the end of `prompt`, each step
    reading the states and KV cache the previous one wrote, scores as PeftModel scores the whole
    text; returns the last cache."""
    ref = reference_logits(base, adapters.get(adapter), prompt)
    logits, cache = run(session, info, prompt[:prefill], 0, empty_cache(info), feeds.get(adapter))
    steps = [logits]
    for t in range(prefill, len(prompt)):
        logits, cache = run(session, info, prompt[t:t + 1], t, cache, feeds.get(adapter))
        steps.append(logits)
    err = np.abs(np.concatenate(steps) - ref).max()
    assert err <= TOL, f"adapter={adapter}: max abs {err}"
    return cache


def fp32_graph(base, adapters: dict):
    """The fp32 graph of `base` in an onnxruntime session, its info, and each adapter's slot feeds."""
    from edgepeft.exporters.hf_base import load_base
    from edgepeft.exporters.onnx_adapter import adapter_tensors
    from edgepeft.exporters.onnx_graph import add_base_path, build_decoder
    from edgepeft.kinds import read_peft_adapter

    loaded = load_base(str(base))
    proto, info = build_decoder(loaded, "fp32")
    session = ort_session(add_base_path(proto, info))
    feeds = {name: adapter_tensors(read_peft_adapter(path), info, loaded) for name, path in adapters.items()}
    return session, info, feeds


def f32_gguf_files(base, adapters: dict, root, names=("all", "pattern")):
    """The F32 GGUF base at root/base.gguf and GGUF LoRA files of `names`: (base path, {name: file},
    None: no file)."""
    from edgepeft.exporters.gguf_adapter import export_adapter_gguf
    from edgepeft.exporters.gguf_base import write_base_gguf
    from edgepeft.exporters.hf_base import load_base
    from edgepeft.kinds import read_peft_adapter

    loaded = load_base(str(base))
    write_base_gguf(loaded, root / "base.gguf", "F32")
    manifest_base = {"linear_shapes": loaded.linear_shapes(), "model_type": loaded.config.model_type,
                     "dims": loaded.dims, "fingerprint": loaded.fingerprint}
    files = {None: None}
    for name in names:
        files[name] = root / f"{name}.gguf"
        export_adapter_gguf(read_peft_adapter(adapters[name]), manifest_base, files[name])
    return root / "base.gguf", files


def greedy_engine(bundle, backend: str, **kwargs):
    """Engine.open on `bundle` that never stops early, as generate(eos_token_id=None)."""
    from edgepeft.runtime import Engine

    e = Engine.open(bundle.root, backend=backend, **kwargs)
    e.tokenizer.eos_ids = set()
    return e


def peft_tokens_by_adapter(base, adapters: dict, prompt: list[int], new: int) -> dict:
    """PeftModel.generate's greedy tokens after `prompt`, by adapter (None: the base); the
    adapters change the answer."""
    want = {name: peft_greedy(base, adapters.get(name), prompt, new) for name in (None, *adapters)}
    assert len({tuple(t) for t in want.values()}) == len(want)
    return want
