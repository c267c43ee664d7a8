"""Continuous batching on the ONNX backend: rows of different lengths and adapters in one forward
pass give each row what it gets alone (fp32, 1e-4), through the batcher and through concurrent
Engine calls; rows join and leave between steps; what cannot batch still runs."""

import threading
import time

import numpy as np
import pytest

from edgepeft.errors import EngineError
from edgepeft.exporters import export_bundle
from edgepeft.runtime import scheduler as scheduler_module
from edgepeft.runtime.engine import Engine
from factory import make_lora, make_prompt_adapter

PROMPTS = [[1, 5, 9, 13, 2, 7], [3, 4], [8] * 11, [5, 6, 7], [9, 10, 11, 12], [2] * 17]
ADAPTERS = [None, "qv", "all", "mixed", "qv", "qv+mixed"]


@pytest.fixture(scope="module")
def engine(llama_bundle):
    return Engine.open(llama_bundle.root, threads=1)


def alone(engine, handle, prompt, tokens):
    """Logits of `prompt` then greedy `tokens`, as one unbatched call computes them."""
    with engine.backend.open_sequence(handle, len(prompt) + len(tokens) + 1) as seq:
        out = [seq.forward(prompt, all_logits=False)[-1].copy()]
        for t in tokens:
            out.append(seq.forward([t])[-1].copy())
    return out


def run_batch(batcher, handles, prompts, steps):
    """Prefill each row, then `steps` greedy steps of all rows together; per row its logits."""
    rows = [batcher.open_row(h, len(p) + steps + 1) for h, p in zip(handles, prompts)]
    logits = [[r.forward(p)[-1].copy()] for r, p in zip(rows, prompts)]
    for _ in range(steps):
        tokens = [int(np.argmax(ls[-1])) for ls in logits]
        out = batcher.step(rows, tokens)
        for ls, row_logits in zip(logits, out):
            ls.append(row_logits.copy())
    return rows, logits


def test_rows_of_different_lengths_and_adapters_match_each_row_alone(engine):
    batcher = engine.backend.batcher()
    handles = [engine.adapter_handle(a) for a in ADAPTERS]
    _, batched = run_batch(batcher, handles, PROMPTS, steps=8)
    for h, prompt, got in zip(handles, PROMPTS, batched):
        tokens = [int(np.argmax(x)) for x in got[:-1]]
        want = alone(engine, h, prompt, tokens)
        assert max(float(np.abs(a - b).max()) for a, b in zip(got, want)) < 1e-4
    batcher.close()


@pytest.mark.parametrize("adapters", [[None] * 3, ["all"] * 3, ["qv", None, None]])
def test_batches_on_one_adapter_or_the_base_match_too(engine, adapters):
    """All rows on the base (the slot-free path), all on one adapter (bound as one call binds
    it), or one adapter beside base rows (masks)."""
    batcher = engine.backend.batcher()
    handles = [engine.adapter_handle(a) for a in adapters]
    _, batched = run_batch(batcher, handles, PROMPTS[:3], steps=5)
    for h, prompt, got in zip(handles, PROMPTS, batched):
        want = alone(engine, h, prompt, [int(np.argmax(x)) for x in got[:-1]])
        assert max(float(np.abs(a - b).max()) for a, b in zip(got, want)) < 1e-4


def test_a_row_that_leaves_frees_its_place_and_a_newcomer_takes_it(engine):
    batcher = engine.backend.batcher()
    h = {a: engine.adapter_handle(a) for a in ("qv", "all", "mixed")}
    rows = [batcher.open_row(h[a], 40) for a in ("qv", "all", "mixed")]
    last = [int(np.argmax(r.forward(p)[-1])) for r, p in zip(rows, PROMPTS)]
    history = [[t] for t in last]
    for _ in range(3):
        out = batcher.step(rows, last)
        last = [int(np.argmax(x)) for x in out]
        for hist, t in zip(history, last):
            hist.append(t)
    rows[0].close()  # the last row moves into its place, cache and all
    assert rows[2].index == 0 and len(batcher.rows) == 2
    new = batcher.open_row(None, 40)
    new_first = new.forward(PROMPTS[3])[-1]
    keep = [rows[1], rows[2], new]
    tokens = [history[1][-1], history[2][-1], int(np.argmax(new_first))]
    out = batcher.step(keep, tokens)
    # Each survivor's next logits equal the unbatched call's after the same tokens.
    for row_logits, name, prompt, hist in ((out[0], "all", PROMPTS[1], history[1]),
                                           (out[1], "mixed", PROMPTS[2], history[2])):
        want = alone(engine, h[name], prompt, hist)[-1]
        assert float(np.abs(row_logits - want).max()) < 1e-4
    want = alone(engine, None, PROMPTS[3], [tokens[2]])[-1]
    assert float(np.abs(out[2] - want).max()) < 1e-4
    batcher.close()


def test_a_newcomer_prefilling_beside_decoding_rows_leaves_them_unchanged(engine):
    """A row whose prompt is not done rides along in others' steps with a placeholder token;
    its next prompt chunk overwrites that position."""
    batcher = engine.backend.batcher()
    qv, allh = engine.adapter_handle("qv"), engine.adapter_handle("all")
    a = batcher.open_row(qv, 40)
    b = batcher.open_row(allh, 40)
    la = a.forward(PROMPTS[0])[-1]
    b.forward(PROMPTS[2][:5])  # b's prompt is half done
    other = batcher.open_row(None, 40)
    other.forward(PROMPTS[1])  # index 2: b (index 1) rides along below it
    ta = int(np.argmax(la))
    out = batcher.step([a, other], [ta, 7])
    assert b.length == 5
    lb = b.forward(PROMPTS[2][5:])[-1]
    assert float(np.abs(out[0] - alone(engine, qv, PROMPTS[0], [ta])[-1]).max()) < 1e-4
    assert float(np.abs(lb - alone(engine, allh, PROMPTS[2], [])[0]).max()) < 1e-4
    batcher.close()


def test_the_buffer_follows_the_rows_budgets_and_is_freed_when_empty(engine):
    batcher = engine.backend.batcher()
    row = batcher.open_row(None, 20)
    assert batcher.positions == 64 and batcher.capacity == 1  # rounded up, not the context length
    big = batcher.open_row(None, 130)
    assert batcher.positions == 192 and batcher.capacity == 2
    row.forward([1, 2, 3])
    big.close()
    row.close()
    assert batcher.kv == [] and batcher.positions == 0
    with pytest.raises(EngineError, match="context length"):
        batcher.open_row(None, engine.context_length + 1)


def concurrent(engine, calls):
    """Each call in its own thread, all started together; their token ids."""
    out, start = [None] * len(calls), threading.Barrier(len(calls))

    def go(i, kwargs):
        start.wait()
        out[i] = engine.complete(**kwargs).tokens

    threads = [threading.Thread(target=go, args=(i, kw)) for i, kw in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_concurrent_calls_decode_together_and_equal_their_unbatched_outputs(llama_bundle, monkeypatch):
    """Greedy and seeded sampling, each row with its own settings; more calls than rows (some
    wait); prompts longer than a prefill chunk."""
    monkeypatch.setattr(scheduler_module, "CHUNK", 4)
    texts = ["abc", "hello world, hello again", "zz", "the quick brown fox jumps", "x", "yy yy"]
    calls = [dict(prompt=t, adapter=a, max_new_tokens=30 + i, ignore_eos=True,
                  **({"temperature": 0.8, "top_k": 20, "seed": i} if i % 2 else {}))
             for i, (t, a) in enumerate(zip(texts, ADAPTERS))]
    reference = Engine.open(llama_bundle.root, threads=1, batching=False)
    want = [reference.complete(**c).tokens for c in calls]
    engine = Engine.open(llama_bundle.root, threads=1, parallel=3)
    seen = []
    real_step = None

    def spy(self, rows, tokens):
        seen.append(len(rows))
        return real_step(self, rows, tokens)

    from edgepeft.runtime.onnx_batch import OnnxBatcher

    real_step = OnnxBatcher.step
    monkeypatch.setattr(OnnxBatcher, "step", spy)
    assert concurrent(engine, calls) == want
    assert max(seen) == 3  # rows really shared steps, never more than parallel


def test_a_closed_stream_leaves_the_batch_before_the_next_step(llama_bundle):
    engine = Engine.open(llama_bundle.root, threads=1)
    stream = engine.stream_pieces("the weather", adapter="qv", max_new_tokens=200, ignore_eos=True)
    next(stream)
    deadline = time.time() + 5
    while engine._scheduler.batcher is None or not engine._scheduler.batcher.rows:
        assert time.time() < deadline
        time.sleep(0.01)
    stream.close()
    while engine._scheduler.batcher is not None and engine._scheduler.batcher.rows:
        assert time.time() < deadline, "the closed stream's row is still in the batch"
        time.sleep(0.01)
    assert engine.generate("other", max_new_tokens=4) == Engine.open(
        llama_bundle.root, threads=1, batching=False).generate("other", max_new_tokens=4)


def test_the_scheduler_thread_ends_when_idle(llama_bundle, monkeypatch):
    monkeypatch.setattr(scheduler_module, "IDLE_SECONDS", 0.05)
    engine = Engine.open(llama_bundle.root, threads=1)
    engine.generate("abc", max_new_tokens=3)
    deadline = time.time() + 5
    while engine._scheduler.thread is not None:
        assert time.time() < deadline
        time.sleep(0.02)
    assert engine.generate("abc", max_new_tokens=3)  # a new thread serves the next call


def test_a_call_the_batch_cannot_take_fails_alone_with_its_own_error(engine):
    with pytest.raises(EngineError, match="leaves no room"):
        engine.generate(list(range(1, 40)) * 100, max_new_tokens=2)
    assert engine.generate("abc", max_new_tokens=2)


@pytest.fixture(scope="module")
def kinds_bundle(tiny_llama, tmp_path_factory):
    from peft import IA3Config, get_peft_model  # noqa: F401 - the IA3 adapter below

    root = tmp_path_factory.mktemp("batch_kinds")
    ads = {
        "emb": make_lora(tiny_llama, root / "emb", seed=13, r=4, lora_alpha=8,
                         target_modules=["embed_tokens", "lm_head", "q_proj"]),
        "dora": make_lora(tiny_llama, root / "dora", seed=11, r=4, lora_alpha=8, use_dora=True,
                          target_modules=["q_proj", "v_proj"]),
        "prompt": make_prompt_adapter(tiny_llama, root / "prompt", "PROMPT_TUNING", seed=17, num_virtual_tokens=4),
        "lora": make_lora(tiny_llama, root / "lora", seed=15, r=8, lora_alpha=16, target_modules=["o_proj"]),
    }
    return export_bundle(str(tiny_llama), root / "b", {n: str(p) for n, p in ads.items()}, formats="onnx",
                         onnx_quant="fp32", quiet=True)


def test_embedding_and_head_slots_batch_and_scale_kinds_run_alone(kinds_bundle):
    engine = Engine.open(kinds_bundle.root, threads=1)
    backend, batcher = engine.backend, engine.backend.batcher()
    assert backend.can_batch(engine.adapter_handle("emb")) and backend.can_batch(engine.adapter_handle("lora"))
    assert not backend.can_batch(engine.adapter_handle("dora")) and not backend.can_batch(engine.adapter_handle("prompt"))
    handles = [engine.adapter_handle(a) for a in ("emb", "lora", None)]
    _, batched = run_batch(batcher, handles, PROMPTS[:3], steps=4)
    for h, prompt, got in zip(handles, PROMPTS, batched):
        want = alone(engine, h, prompt, [int(np.argmax(x)) for x in got[:-1]])
        assert max(float(np.abs(a - b).max()) for a, b in zip(got, want)) < 1e-4
    # Concurrent calls on kinds that cannot batch still give their own outputs.
    reference = Engine.open(kinds_bundle.root, threads=1, batching=False)
    calls = [dict(prompt="abc", adapter=a, max_new_tokens=8, ignore_eos=True) for a in ("dora", "prompt", "emb", "lora")]
    assert concurrent(engine, calls) == [reference.complete(**c).tokens for c in calls]


def test_bases_exported_before_row_masks_run_unbatched(llama_bundle, tmp_path):
    import shutil

    from edgepeft.bundle import Bundle

    copy = tmp_path / "old"
    shutil.copytree(llama_bundle.root, copy)
    b = Bundle.open(copy)
    b.backends["onnx"].pop("row_masks")
    b.save()
    engine = Engine.open(copy, threads=1)
    assert not engine.backend.can_batch(None)
    assert engine.generate("abc", "qv", max_new_tokens=4) == Engine.open(llama_bundle.root, threads=1).generate(
        "abc", "qv", max_new_tokens=4)
