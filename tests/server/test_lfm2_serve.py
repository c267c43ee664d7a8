"""`edgepeft serve` on an LFM2 bundle (short-convolution layers between attention layers), both
backends: greedy completions on each adapter, sent at once, give what Engine.complete gives."""

import threading

import pytest

from edgepeft.exporters import export_bundle
from edgepeft.runtime import Engine
from conftest import Server
from factory import all_linear, make_base, make_lora

PROMPT = "the weather today"
N = 24


@pytest.fixture(scope="module")
def lfm2_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("lfm2serve")
    base = make_base(root / "base", "lfm2", seed=7, tie=True)
    adapters = {"all": make_lora(base, root / "all", seed=2, r=8, lora_alpha=16, target_modules=all_linear("lfm2")),
                "conv": make_lora(base, root / "conv", seed=3, r=4, lora_alpha=8, target_modules=["in_proj"])}
    return export_bundle(str(base), root / "bundle", {n: str(p) for n, p in adapters.items()}, formats="onnx,gguf",
                         onnx_quant="fp32", gguf_quant="F32", quiet=True)


@pytest.mark.parametrize("backend", ["onnx", "gguf"])
def test_concurrent_completions_on_each_adapter_equal_engine_complete(lfm2_bundle, backend):
    engine = Engine.open(lfm2_bundle.root, backend=backend)
    server = Server(lfm2_bundle.root, backend)
    try:
        client = server.client()
        base = client.models.list().data[0].id
        models = [base, "all", "conv", "all", base, "conv"]
        want = {m: engine.complete(PROMPT, adapter=None if m == base else m, max_new_tokens=N) for m in set(models)}
        assert len({w.text for w in want.values()}) == 3
        got = [None] * len(models)

        def ask(i):
            got[i] = client.completions.create(model=models[i], prompt=PROMPT, max_tokens=N, temperature=0)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(models))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for m, r in zip(models, got):
            assert r.choices[0].text == want[m].text, m
            assert r.usage.completion_tokens == len(want[m].tokens)
    finally:
        server.close()
