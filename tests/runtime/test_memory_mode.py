"""Small-memory settings: lazy adapters with an LRU bound, a bounded KV cache, device fallback."""

import threading

import numpy as np
import pytest

from edgepeft.errors import EngineError, InvalidArgument
from edgepeft.runtime import Engine

IDS = [5, 17, 99, 3, 42]


@pytest.mark.parametrize("backend", ["onnx", "gguf"])
def test_adapters_load_on_first_use_and_the_least_recently_used_is_unloaded(llama_bundle, backend):
    eager = Engine.open(llama_bundle.root, backend=backend)
    want = {n: eager.score(IDS, adapter=n) for n in (None, "qv", "all", "mixed")}
    engine = Engine.open(llama_bundle.root, backend=backend, max_resident_adapters=2)
    assert engine.resident_adapters == [] and engine.adapters == ["all", "mixed", "qv"]
    for name, resident in [("qv", ["qv"]), ("all", ["qv", "all"]), ("qv", ["all", "qv"]),
                           ("mixed", ["qv", "mixed"]), ("all", ["mixed", "all"]), (None, ["mixed", "all"])]:
        np.testing.assert_allclose(engine.score(IDS, adapter=name), want[name], atol=1e-5)
        assert engine.resident_adapters == resident, name
    engine.unload_adapter("qv")  # known but not resident: nothing to free, and gone from the list
    assert "qv" not in engine.adapters


def test_lru_engine_serves_threads_with_more_adapters_than_resident(llama_bundle):
    eager = Engine.open(llama_bundle.root)
    names = [None, "qv", "all", "mixed"]
    want = {n: eager.score(IDS, adapter=n) for n in names}
    engine = Engine.open(llama_bundle.root, max_resident_adapters=1)
    errors = []

    def worker(k):
        try:
            for i in range(12):
                name = names[(k + i) % len(names)]
                np.testing.assert_allclose(engine.score(IDS, adapter=name), want[name], atol=1e-5)
        except Exception as e:  # collected: an assertion in a thread would otherwise be lost
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(engine.resident_adapters) <= 1


@pytest.mark.parametrize("backend", ["onnx", "gguf"])
def test_max_context_bounds_every_call(llama_bundle, backend):
    engine = Engine.open(llama_bundle.root, backend=backend, max_context=16)
    assert engine.backend.context_length == 16
    assert len(engine.complete("ab", max_new_tokens=100, ignore_eos=True).tokens) <= 16
    with pytest.raises(EngineError, match="context"):
        engine.complete("x" * 40, max_new_tokens=4)
    with pytest.raises(InvalidArgument, match="max context 0"):
        Engine.open(llama_bundle.root, backend=backend, max_context=0)


def test_unavailable_device_falls_back_to_cpu_with_one_line(llama_bundle):
    import onnxruntime as ort

    from edgepeft.runtime.devices import ONNX_PROVIDERS

    # a device whose provider this onnxruntime lacks (no build has CoreML, DirectML and OpenVINO)
    device, (provider, *_) = next((d, p) for d, p in ONNX_PROVIDERS.items()
                                  if p and p[0] not in ort.get_available_providers())
    engine = Engine.open(llama_bundle.root, device=device)
    assert engine.backend.providers == ["CPUExecutionProvider"]
    assert provider in engine.device_note and "\n" not in engine.device_note
    np.testing.assert_allclose(engine.score(IDS), Engine.open(llama_bundle.root, device="cpu").score(IDS), atol=1e-6)
    assert Engine.open(llama_bundle.root).device_note is None  # auto never complains


def test_cli_flags_reach_the_engine_and_the_fallback_is_one_line(llama_bundle):
    import subprocess
    import sys

    import onnxruntime as ort

    from edgepeft.runtime.devices import ONNX_PROVIDERS

    device = next(d for d, p in ONNX_PROVIDERS.items() if p and p[0] not in ort.get_available_providers())
    out = subprocess.run([sys.executable, "-m", "edgepeft", "run", str(llama_bundle.root), "--device", device,
                          "--max-context", "24", "--max-resident-adapters", "1", "--adapter", "qv", "--json",
                          "--max-new-tokens", "100", "ab"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    notes = [line for line in out.stderr.splitlines() if line.startswith("edgepeft: device")]
    assert len(notes) == 1 and "running on the CPU" in notes[0]
    import json

    result = json.loads(out.stdout)
    assert result["prompt_tokens"] + len(result["tokens"]) <= 24  # the bounded context held
