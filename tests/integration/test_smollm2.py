"""End to end on the embedded default, builtin:smollm2-135m, with the shipped adapters."""

import subprocess
import sys

import pytest

from edgepeft.runtime import Engine
from edgepeft.demo.shipped import shipped_adapters, shipped_metrics
from edgepeft.demo.tasks import TASK_PROMPTS, TASKS, compare_to_reference

SYSTEM = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
          19712, 8182, 2, 198]
# Token ids the original SmolLM2-135M-Instruct tokenizer (tokenizer.json on the model hub) gives,
# as recorded in public test fixtures of projects that ship it.
ORIGINAL_IDS = [
    ("Hello world", [19556, 905]),
    ("What is the capital of France?", [1780, 314, 260, 3575, 282, 4649, 47]),
    ("The year 2024 had 365 days; 12 months.",
     [504, 713, 216, 34, 32, 34, 36, 761, 216, 35, 38, 37, 2009, 43, 216, 33, 34, 2704, 30]),
    ("  leading and   multiple   spaces  ", [216, 2899, 284, 256, 2701, 256, 5600, 256]),
    ("def f(n):\n    return n+1\n", [1604, 275, 24, 94, 727, 472, 1003, 304, 27, 33, 198]),
    ("Gr\u00fc\u00dfe, caf\u00e9!", [27302, 7170, 34878, 85, 28, 37366, 17]),
    ("'s 't 're 've 'm 'll 'd", [506, 637, 100, 637, 257, 637, 307, 637, 93, 637, 764, 637, 84]),
    ("Hello, \u4e16\u754c!", [19556, 28, 216, 7906, 240, 178, 239, 230, 17]),
]
ORIGINAL_CHAT = [
    ("Hi there", SYSTEM + [1, 4093, 198, 26843, 665, 2, 198, 1, 520, 9531, 198]),
    ("What is the capital of France?",
     SYSTEM + [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]),
]


def demo(*args):
    return subprocess.run([sys.executable, "-m", "edgepeft", "demo", *map(str, args)],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory):
    """The demo's own export (first run), then a second run that must reuse it."""
    out = tmp_path_factory.mktemp("smollm2") / "bundle"
    first = demo("--out", out, "--held-out", "2", "--quiet")
    assert first.returncode == 0, first.stderr
    return out, first.stdout


def test_builtin_tokenizer_matches_the_original(demo_bundle):
    engine = Engine.open(demo_bundle[0], load_adapters=False)
    for text, ids in ORIGINAL_IDS:
        assert engine.tokenizer.encode(text) == ids, text
    for text, ids in ORIGINAL_CHAT:
        assert engine.encode_prompt(text, chat=True) == ids, text


def test_builtin_checkpoint_tokenizer_matches_in_transformers_too(demo_bundle):
    from transformers import AutoTokenizer

    from edgepeft.exporters.builtin import materialize

    tok = AutoTokenizer.from_pretrained(materialize("builtin:smollm2-135m"))
    for text, ids in ORIGINAL_IDS:
        assert tok.encode(text) == ids, text
    for text, ids in ORIGINAL_CHAT:
        assert tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      return_dict=False) == ids


def test_demo_prints_outputs_switch_speed_memory_and_accuracy(demo_bundle):
    out, stdout = demo_bundle
    assert "exported in" in stdout
    for needle in ["[onnx int4", "[gguf Q4_K_M", "base loaded once", "switch ", "tok/s", "peak RSS",
                   "task accuracy", "PyTorch fp32"]:
        assert needle in stdout
    for backend_section in stdout.split("\n[")[1:]:
        for name in shipped_adapters():
            assert f"    {name:<10} |" in backend_section and f"{name} " in backend_section.split("switch", 1)[1]
        # decode speed for the base and every adapter, from fixed-length runs
        decode = next(line for line in backend_section.splitlines() if line.startswith("  decode  "))
        for name in ["base", *shipped_adapters()]:
            rate = decode.split(f" {name} ", 1)[1].split(" tok/s", 1)[0]
            assert float(rate) > 0, decode
        assert "runs of 32 tokens" in decode


def test_second_demo_run_reuses_the_bundle(demo_bundle):
    out, _ = demo_bundle
    manifest = (out / "edgepeft.json").stat().st_mtime_ns
    second = demo("--out", out, "--held-out", "1")
    assert second.returncode == 0, second.stderr
    assert "(reused)" in second.stdout
    assert (out / "edgepeft.json").stat().st_mtime_ns == manifest


@pytest.mark.parametrize("backend", ["onnx", "gguf"])  # int4 ONNX and Q4_K_M GGUF
def test_shipped_adapters_keep_their_accuracy_when_quantized(demo_bundle, backend):
    engine = Engine.open(demo_bundle[0], backend=backend)
    metrics = shipped_metrics()
    for name in shipped_adapters():
        n = metrics[name]["held_out"]
        assert n >= TASK_PROMPTS and len(metrics[name]["pytorch_correct"]) == n
        check = compare_to_reference(metrics[name]["pytorch_correct"], TASKS[name].outcomes(engine, name, n))
        assert check["ok"], (backend, name, check)
        base = TASKS[name].evaluate(engine, None, n)
        assert base <= 0.5 * check["accuracy"], (backend, name, base, check)


def test_int4_keeps_the_default_8_bit_groups_on_a_4_bit_source(demo_bundle):
    """The builtin GGUF holds every projection at 4 bits (Q4_1): int4 adds no 8-bit group for
    the source (builtin:gemma3-270m, with gate/up at 5 bits, does; tests/integration/test_gemma3.py)."""
    from edgepeft.bundle import Bundle
    from edgepeft.exporters.builtin import source_level_bits

    assert set(source_level_bits("builtin:smollm2-135m").values()) == {4}
    mix = Bundle.open(demo_bundle[0]).backends["onnx"]["int4_mix"]
    assert mix == {"by": "groups", "groups": ["qkv_proj", "down_proj"]}  # the tied head is exact at 4 bits


def test_shipped_adapters_are_small_real_peft_adapters():
    from edgepeft.kinds import read_peft_adapter

    specs = {n: read_peft_adapter(p) for n, p in shipped_adapters().items()}
    assert len(specs) >= 3
    assert len({tuple(s.ranks) for s in specs.values()}) >= 2
    assert len({tuple(s.targets) for s in specs.values()}) >= 2
    for name, path in shipped_adapters().items():
        assert (path / "adapter_model.safetensors").stat().st_size < 8e6, name
