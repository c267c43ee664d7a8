"""The GGUF batcher (continuous batching): rows sharing an adapter set decode in one llama_decode
(one sequence id per row), different sets are interleaved; every row's logits equal the same row
run alone through the unbatched sequence path."""

import numpy as np
import pytest

from edgepeft.errors import EngineError
from edgepeft.runtime import gguf_backend
from edgepeft.runtime.gguf_context import GgufContext
from edgepeft.runtime.engine import Engine

TOL = 1e-4  # max abs logit difference against the unbatched path (F32 GGUF base)
PROMPTS = [[5, 17, 99, 3, 42], [7, 61, 250, 9, 11, 13, 2, 88, 40], [21, 33, 4], [100, 8, 71, 5, 19, 64, 3]]
MAX_DIFF = [0.0]  # largest difference seen, printed at the end of the module


@pytest.fixture(scope="module")
def engine(llama_bundle):
    eng = Engine.open(llama_bundle, backend="gguf", threads=1)
    yield eng
    print(f"\nmax abs logit difference batched vs unbatched: {MAX_DIFF[0]:.3g}")
    eng.backend.close()


def reference(backend, handle, prompt, steps, budget):
    """The row run alone (unbatched): the logits after the prompt and after each greedy token."""
    out, toks = [], []
    with backend.open_sequence(handle, budget) as s:
        logits = s.forward(prompt)[-1]
        out.append(logits)
        for _ in range(steps):
            toks.append(int(np.argmax(logits)))
            logits = s.forward([toks[-1]])[-1]
            out.append(logits)
    return out, toks


def close_enough(got, want, what=""):
    diff = float(np.abs(np.asarray(got, np.float32) - want).max())
    MAX_DIFF[0] = max(MAX_DIFF[0], diff)
    assert diff <= TOL, f"{what}: max abs difference {diff}"
    assert int(np.argmax(got)) == int(np.argmax(want)), what


def count_decodes(batcher, monkeypatch):
    calls = []
    real = GgufContext.decode

    def counting(c, entries):
        if any(bc.c is c for bc in batcher._contexts):  # the batcher's decodes only
            calls.append((c, len(entries)))
        return real(c, entries)

    monkeypatch.setattr(GgufContext, "decode", counting)
    return calls


def test_mixed_adapters_batch_and_match_unbatched(engine, monkeypatch):
    be = engine.backend
    names = [None, "qv", "all", "all"]  # two rows share "all": one decode for both
    handles = [engine.adapter_handle(n) for n in names]
    steps, budget = 10, 32
    refs = [reference(be, h, p, steps, budget) for h, p in zip(handles, PROMPTS)]
    # the adapters really change the logits (otherwise the comparison below proves little)
    assert np.abs(refs[2][0][0] - reference(be, None, PROMPTS[2], 0, budget)[0][0]).max() > 1e-2

    b = be.batcher()
    try:
        assert all(be.can_batch(h) for h in handles + [engine.adapter_handle("qv+mixed")])
        rows = [b.open_row(h, budget) for h in handles]
        assert [r.length for r in rows] == [0, 0, 0, 0]
        assert rows[2].bc is rows[3].bc and len({id(r.bc) for r in rows}) == 3
        assert rows[2].seq != rows[3].seq
        firsts = []
        for i, (row, p) in enumerate(zip(rows, PROMPTS)):
            first = row.forward(p)[-1]
            assert first.shape == (be.n_vocab,) and first.dtype == np.float32
            assert row.length == len(p)
            close_enough(first, refs[i][0][0], f"row {i} prefill")
            firsts.append(first)
        logits = np.vstack(firsts)
        calls = count_decodes(b, monkeypatch)
        toks = [[] for _ in rows]
        for t in range(steps):
            nxt = [int(np.argmax(logits[i])) for i in range(len(rows))]
            for i in range(len(rows)):
                toks[i].append(nxt[i])
            logits = b.step(rows, nxt)
            assert logits.shape == (4, be.n_vocab) and logits.dtype == np.float32
            for i in range(len(rows)):
                close_enough(logits[i], refs[i][0][t + 1], f"row {i} ({names[i]}) step {t}")
        assert toks == [r[1] for r in refs]  # greedy tokens equal
        assert [r.length for r in rows] == [len(p) + steps for p in PROMPTS]
        # one llama_decode per adapter set per step; the two "all" rows went in one, 2 tokens
        assert len(calls) == 3 * steps
        assert sorted(n for _, n in calls[:3]) == [1, 1, 2]
        # rows passed in another order still get their own logits in their own slot
        order = [3, 0, 2, 1]
        nxt = [int(np.argmax(logits[i])) for i in order]
        swapped = b.step([rows[i] for i in order], nxt)
        for j, i in enumerate(order):
            want = reference(be, handles[i], PROMPTS[i] + toks[i] + [nxt[j]], 0, budget)[0][0]
            close_enough(swapped[j], want, f"row {i} reordered")
        for r in rows:
            r.close()
    finally:
        b.close()


def test_rows_closed_midway_and_replaced(engine):
    be = engine.backend
    budget, first_steps, later_steps = 40, 4, 6
    names = ["mixed", "qv", "mixed", None]
    handles = [engine.adapter_handle(n) for n in names]
    total = first_steps + later_steps
    refs = [reference(be, h, p, total, budget) for h, p in zip(handles, PROMPTS)]
    new_names = ["qv+mixed", "mixed"]  # replace row 1 (its context goes idle, then switches set)
    new_prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8]]  # and row 3 (joins the "mixed" context)
    new_handles = [engine.adapter_handle(n) for n in new_names]
    new_refs = [reference(be, h, p, later_steps, budget) for h, p in zip(new_handles, new_prompts)]

    b = be.batcher()
    try:
        rows = [b.open_row(h, budget) for h in handles]
        logits = np.vstack([r.forward(p)[-1] for r, p in zip(rows, PROMPTS)])
        for t in range(first_steps):
            logits = b.step(rows, [int(np.argmax(x)) for x in logits])
            for i in range(4):
                close_enough(logits[i], refs[i][0][t + 1], f"row {i} step {t}")
        old_ctx, old_seqs = rows[1].bc, (rows[1].seq, rows[3].seq)
        rows[1].close()
        rows[3].close()
        assert rows[1].bc is None and not old_ctx.rows  # idle, kept for reuse
        rows[1].close()  # closing twice is harmless
        with pytest.raises(EngineError):
            b.step([rows[1]], [1])
        n_contexts = len(b._contexts)
        new = [b.open_row(h, budget) for h in new_handles]
        assert len(b._contexts) == n_contexts  # no new context: the idle one was reused
        assert new[0].bc is old_ctx and new[0].seq == old_seqs[0]  # seq id and KV cells reused
        assert new[1].bc is rows[0].bc  # same set as rows 0 and 2: batched with them
        new_logits = [r.forward(p)[-1] for r, p in zip(new, new_prompts)]
        for j in range(2):
            close_enough(new_logits[j], new_refs[j][0][0], f"new row {j} prefill")
        live = [rows[0], new[0], rows[2], new[1]]
        logits = np.vstack([logits[0], new_logits[0], logits[2], new_logits[1]])
        want = [refs[0][0], new_refs[0][0], refs[2][0], new_refs[1][0]]
        offset = [first_steps, 0, first_steps, 0]
        for t in range(later_steps):
            logits = b.step(live, [int(np.argmax(x)) for x in logits])
            for i in range(4):
                close_enough(logits[i], want[i][offset[i] + t + 1], f"live row {i} step {t}")
    finally:
        b.close()


def test_chunked_prefill_equals_one_shot(engine, monkeypatch):
    be = engine.backend
    ids = [(7 * i + 3) % 200 + 1 for i in range(21)]
    handle = engine.adapter_handle("all")
    want = reference(be, handle, ids, 3, 32)[0]
    monkeypatch.setattr(gguf_backend, "BATCH", 8)  # the batcher's contexts decode 8 tokens at most
    b = be.batcher()
    try:
        one, two = b.open_row(handle, 32), b.open_row(handle, 32)
        assert one.bc.c.n_batch == 8
        calls = count_decodes(b, monkeypatch)
        whole = one.forward(ids)[-1]  # 21 tokens: chunked internally (8 + 8 + 5)
        assert len(calls) == 3 and one.length == 21
        part = two.forward(ids[:6])[-1]
        close_enough(part, reference(be, handle, ids[:6], 0, 32)[0][0], "first part")
        part = two.forward(ids[6:])[-1]  # the rest after the cached part
        assert two.length == 21
        close_enough(whole, want[0], "one shot")
        close_enough(part, want[0], "two parts")
        np.testing.assert_allclose(whole, part, atol=TOL)
        logits = np.vstack([whole, part])
        for t in range(3):
            logits = b.step([one, two], [int(np.argmax(x)) for x in logits])
            close_enough(logits[0], want[t + 1], f"one-shot row step {t}")
            close_enough(logits[1], want[t + 1], f"chunked row step {t}")
        with pytest.raises(EngineError):
            one.forward([])
    finally:
        b.close()


def test_budgets_and_bounds(engine):
    be = engine.backend
    b = be.batcher()
    try:
        with pytest.raises(EngineError, match="context length"):
            b.open_row(None, be.context_length + 1)
        full = b.open_row(None, be.context_length)  # a full-length row always fits
        assert full.length == 0
        short = b.open_row(engine.adapter_handle("qv"), 4)
        short.forward([1, 2, 3])
        b.step([short], [4])
        with pytest.raises(EngineError, match="budget"):
            b.step([short], [5])  # a fifth position is past its budget
        assert short.length == 4
        with pytest.raises(EngineError):
            b.step([full, full], [1, 2])  # a row twice in one step
        with pytest.raises(EngineError):
            b.step([full], [1, 2])
        # at most `parallel` contexts: a fifth adapter set while four are in use is refused
        b.open_row(engine.adapter_handle("all"), 8)
        b.open_row(engine.adapter_handle("mixed"), 8)
        assert be.parallel == 4 and len(b._contexts) == 4
        with pytest.raises(EngineError, match="full"):
            b.open_row(engine.adapter_handle("qv+mixed"), 8)
        short.close()
        row = b.open_row(engine.adapter_handle("qv+mixed"), 8)  # the idle context takes the new set
        assert row.bc.c.active == engine.adapter_handle("qv+mixed").parts
    finally:
        b.close()


def test_close_frees_everything(engine):
    be = engine.backend
    b = be.batcher()
    row = b.open_row(engine.adapter_handle("qv"), 16)
    row.forward(PROMPTS[0])
    contexts = list(b._contexts)
    assert contexts and all(bc.c in be.loras.contexts for bc in contexts)
    b.close()
    assert b._contexts == [] and not any(bc.c in be.loras.contexts for bc in contexts)
    assert all(bc.c.ctx is None and bc.c.active == () for bc in contexts)
    assert row.bc is None
    with pytest.raises(EngineError):
        b.step([row], [1])
    with pytest.raises(EngineError):
        b.open_row(None, 8)
    b.close()  # twice is harmless
    row.close()
    # the backend still runs unbatched calls, and new batchers
    want = reference(be, None, PROMPTS[0], 0, 16)[0][0]
    b2 = be.batcher()
    try:
        close_enough(b2.open_row(None, 16).forward(PROMPTS[0])[-1], want, "after close")
    finally:
        b2.close()


def test_adapter_freed_while_a_row_uses_it(engine, llama_bundle):
    be = engine.backend
    engine.load_adapter("tmp", llama_bundle.adapter_path("qv", "gguf"))
    handle = engine.adapter_handle("tmp")
    refs = reference(be, handle, PROMPTS[1], 4, 32)[0]
    b, b2 = be.batcher(), be.batcher()
    try:
        row = b.open_row(handle, 32)
        logits = row.forward(PROMPTS[1])[-1]
        idle = b2.open_row(handle, 8)  # another batcher's context, idle but applying it
        idle.close()
        idle_ctx = b2._contexts[0]
        assert idle_ctx.c.active == (handle,) and not idle_ctx.rows
        engine.unload_adapter("tmp")  # -> free_adapter, while `row` still applies it
        assert handle.freed and handle.handle is not None  # freed by llama.cpp only once no row applies it
        assert idle_ctx.c.active == ()  # the idle context dropped it at once
        assert row.bc.c.active == (handle,)  # the live one keeps it
        with pytest.raises(EngineError, match="unloaded"):
            b.open_row(handle, 8)
        for t in range(4):  # the live row keeps its adapter until it ends
            logits = b.step([row], [int(np.argmax(logits))])[0]
            close_enough(logits, refs[t + 1], f"step {t} after unload")
        ctx = row.bc
        row.close()  # its context goes idle: the adapter is dropped, then freed
        assert ctx.c.active == () and handle.handle is None
    finally:
        b.close()
        b2.close()
