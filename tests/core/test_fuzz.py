"""Fuzzing the readers of untrusted files (manifest, safetensors, PEFT adapter directories) with
random and mutated inputs: each either reads the file or raises one of our errors (one line,
EdgepeftError); never another exception, a crash or a hang.

Bounded for CI (2 cores): a few hundred examples per reader, no deadline (file system speed)."""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgepeft.bundle import Bundle, new_manifest
from edgepeft.cli.inspect import describe
from edgepeft.errors import EdgepeftError
from edgepeft.kinds import read_peft_adapter
from edgepeft.kinds import read_checked_adapter
from edgepeft.tensors import read_safetensors

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

DIMS = {"hidden_size": 8, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "vocab_size": 16}

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                      st.text(max_size=12), st.sampled_from(["../x", "/etc/passwd", "adapters/a.gguf", "", "."]))
json_value = st.recursive(json_leaf, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                          max_leaves=12)


def assert_one_line(e: Exception) -> None:
    assert isinstance(e, EdgepeftError), f"{type(e).__name__}: {e}"
    assert "\n" not in str(e) and len(str(e)) < 600


def mutate_bytes(data: bytes, draw) -> bytes:
    """Flip, insert, delete or truncate at random offsets."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "set"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[i : i + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[i:]
        elif op == "set" and data:
            data[i] = draw(st.sampled_from([0, 0xFF, ord("["), ord("{"), ord('"'), ord("9")]))
    return bytes(data)


# ---- the manifest -------------------------------------------------------------------------------
def valid_bundle(root: Path) -> dict:
    root.mkdir(parents=True)
    (root / "adapters").mkdir()
    (root / "tokenizer.json").write_text("{}")
    (root / "adapters" / "a.gguf").write_bytes(b"GGUF" + bytes(60))
    b = Bundle(root, new_manifest(base={"fingerprint": "sha256:00", "dims": DIMS, "source": "x"},
                                  tokenizer={"files": ["tokenizer.json"], "eos_token_ids": [0]}))
    for rel in ("tokenizer.json", "adapters/a.gguf"):
        b.record_file(rel)
    b.manifest["adapters"]["a"] = {"kind": "lora", "rank": 4, "targets": ["q_proj"], "files": {"gguf": "adapters/a.gguf"}}
    b.save()
    return json.loads((root / "edgepeft.json").read_text())  # a copy: the test mutates it


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@contextmanager
def fuzzed_bundle():
    """A fresh valid bundle (root, manifest) for one example to damage; when the example is done
    with it, it must open and describe, or be refused in one line."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "b"
        yield root, valid_bundle(root)
        try:
            describe(Bundle.open(root))
        except Exception as e:
            assert_one_line(e)


@FUZZ
@given(data=st.data())
def test_manifest_with_random_values_at_random_places_is_refused_or_read(data):
    with fuzzed_bundle() as (root, manifest):
        for _ in range(data.draw(st.integers(1, 3))):
            path = data.draw(st.sampled_from(list(_paths(manifest))[1:]))
            parent = manifest
            for k in path[:-1]:
                parent = parent[k]
            if data.draw(st.booleans()):
                parent[path[-1]] = data.draw(json_value)
            elif isinstance(parent, dict):
                del parent[path[-1]]
        (root / "edgepeft.json").write_text(json.dumps(manifest))


@FUZZ
@given(data=st.data())
def test_manifest_with_mutated_bytes_is_refused_or_read(data):
    with fuzzed_bundle() as (root, _):
        raw = (root / "edgepeft.json").read_bytes()
        (root / "edgepeft.json").write_bytes(mutate_bytes(raw, data.draw))


def test_deeply_nested_and_oversized_manifests_are_refused_in_one_line(tmp_path):
    root = tmp_path / "b"
    valid_bundle(root)
    for content in ["[" * 100_000, '{"format": ' + "9" * 10_000 + "}", " " * (17 << 20)]:
        (root / "edgepeft.json").write_text(content)
        try:
            Bundle.open(root)
        except Exception as e:
            assert_one_line(e)
            assert "corrupt manifest" in str(e)
        else:
            raise AssertionError("accepted")


# ---- safetensors ----------------------------------------------------------------------------------
def safetensors_bytes(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


dtypes = st.sampled_from(["F32", "F16", "BF16", "I64", "I8", "U8", "BOOL", "F64", "I32", "Q4", "", "f32"])
dims = st.integers(-3, 2**40) | st.integers(0, 6)
entry = st.fixed_dictionaries({"dtype": dtypes, "shape": st.lists(dims, max_size=10),
                               "data_offsets": st.tuples(st.integers(-4, 300), st.integers(-4, 300))})
entry_or_junk = entry | json_value


@FUZZ
@given(header=st.dictionaries(st.text(max_size=20), entry_or_junk, max_size=6), body=st.binary(max_size=300))
def test_safetensors_with_random_headers_is_refused_or_read(header, body):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.safetensors"
        path.write_bytes(safetensors_bytes(header, body))
        try:
            out = read_safetensors(path)
        except Exception as e:
            assert_one_line(e)
        else:
            assert all(isinstance(v, np.ndarray) for v in out.values())


def _valid_safetensors() -> bytes:
    a, b = np.arange(8, dtype=np.float32).reshape(2, 4), np.ones((4, 2), np.float16)
    return safetensors_bytes({"__metadata__": {"format": "pt"},
                              "a": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
                              "b": {"dtype": "F16", "shape": [4, 2], "data_offsets": [32, 48]}},
                             a.tobytes() + b.tobytes())


@FUZZ
@given(data=st.data())
def test_safetensors_with_mutated_bytes_is_refused_or_read(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.safetensors"
        path.write_bytes(mutate_bytes(_valid_safetensors(), data.draw))
        try:
            read_safetensors(path)
        except Exception as e:
            assert_one_line(e)


def test_safetensors_header_lengths_past_the_limit_or_the_file_are_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    for n in (2**63, 2**64 - 1, 101 << 20, 10):
        path.write_bytes(struct.pack("<Q", n) + b"{}")
        try:
            read_safetensors(path)
        except Exception as e:
            assert_one_line(e)
            assert "bad header length" in str(e)
        else:
            raise AssertionError(n)


# ---- PEFT adapter directories ---------------------------------------------------------------------
config_values = st.one_of(json_value, st.integers(-2, 70), st.sampled_from(["LORA", "IA3", "PROMPT_TUNING",
                                                                            "PREFIX_TUNING", "P_TUNING", "lora"]))
config_keys = st.sampled_from(["peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora",
                               "use_dora", "target_modules", "modules_to_save", "init_lora_weights",
                               "num_virtual_tokens", "token_dim", "num_layers", "fan_in_fan_out",
                               "feedforward_modules", "lora_bias", "bias", "task_type"])


@FUZZ
@given(data=st.data())
def test_peft_directories_with_mutated_config_or_weights_are_refused_or_read(data, tiny_lora_dir):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "ad"
        shutil.copytree(tiny_lora_dir, path)
        config = json.loads((path / "adapter_config.json").read_text())
        if data.draw(st.booleans()):
            for _ in range(data.draw(st.integers(1, 3))):
                config[data.draw(config_keys)] = data.draw(config_values)
            (path / "adapter_config.json").write_text(json.dumps(config))
        else:
            weights = path / "adapter_model.safetensors"
            weights.write_bytes(mutate_bytes(weights.read_bytes(), data.draw))
        try:
            read_checked_adapter(path)  # what export and add-adapter call
        except Exception as e:
            assert_one_line(e)


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def tiny_lora_dir(tmp_path_factory) -> Path:
    """A small valid LoRA directory written by hand (no torch), as PEFT writes it."""
    path = tmp_path_factory.mktemp("lora") / "ad"
    path.mkdir()
    rng = np.random.default_rng(0)
    tensors, offset, header, body = {}, 0, {}, b""
    for layer in range(2):
        for part, shape in (("A", (4, 16)), ("B", (16, 4))):
            tensors[f"base_model.model.model.layers.{layer}.self_attn.q_proj.lora_{part}.weight"] = \
                rng.standard_normal(shape).astype(np.float32)
    for name, arr in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        body += arr.tobytes()
    (path / "adapter_model.safetensors").write_bytes(safetensors_bytes(header, body))
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}))
    read_peft_adapter(path)  # the unmutated directory reads
    return path
