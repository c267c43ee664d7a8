"""Every command that reads a bundle refuses a damaged or hostile one with exit code 2 and one
line, on both backends, before onnxruntime or llama.cpp parse the bad file: truncated, bit-flipped,
wrong-shape, wrong-base, oversized-rank, path-traversal and symlinked inputs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys

import pytest

from edgepeft.cli import main
from edgepeft.exporters import export_bundle
from factory import make_base, make_lora


@pytest.fixture(scope="module")
def bundles(tiny_llama, llama_adapters, tmp_path_factory):
    """The bundle under test, plus bundles of a wider base and of a same-shape other base whose
    adapter files are planted into it."""
    root = tmp_path_factory.mktemp("bad")
    kw = dict(formats="onnx,gguf", onnx_quant="fp32", gguf_quant="F32", quiet=True)
    good = export_bundle(str(tiny_llama), root / "good", {"qv": str(llama_adapters["qv"])}, **kw)
    wide = make_base(root / "wide_base", "llama", hidden=128)  # head_dim 32: GroupQueryAttention takes multiples of 16
    wide_b = export_bundle(str(wide), root / "wide", {"qv": str(make_lora(wide, root / "wide_qv"))}, **kw)
    other = make_base(root / "other_base", "llama", seed=42)  # same shapes, other weights
    other_b = export_bundle(str(other), root / "other", {"qv": str(llama_adapters["qv"])}, **kw)
    return {"good": good.root, "wide": wide_b.root, "other": other_b.root}


def rewrite_manifest(bundle, edit):
    path = bundle / "edgepeft.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


def rehash(bundle, rel):
    """What a hostile bundle does: a manifest that agrees with the planted file."""
    data = (bundle / rel).read_bytes()
    rewrite_manifest(bundle, lambda m: m["files"].__setitem__(
        rel, {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}))


def truncated(b, backend, _):
    f = b / f"adapters/qv.{'onnx_adapter' if backend == 'onnx' else 'gguf'}"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def bit_flipped(b, backend, _):
    f = b / f"adapters/qv.{'onnx_adapter' if backend == 'onnx' else 'gguf'}"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))


def planted(source):
    def plant(b, backend, bundles):
        rel = f"adapters/qv.{'onnx_adapter' if backend == 'onnx' else 'gguf'}"
        shutil.copyfile(bundles[source] / rel, b / rel)
        rehash(b, rel)
    return plant


def oversized_rank(b, backend, _):
    rewrite_manifest(b, lambda m: m["adapters"]["qv"].__setitem__("rank", 1 << 20))


def path_traversal(b, backend, _):
    def edit(m):
        m["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "size": 0}
    rewrite_manifest(b, edit)


def symlinked(b, backend, _):
    rel = f"adapters/qv.{'onnx_adapter' if backend == 'onnx' else 'gguf'}"
    outside = b.parent / "outside.bin"
    shutil.copyfile(b / rel, outside)
    (b / rel).unlink()
    os.symlink(outside, b / rel)


CASES = {
    "truncated": (truncated, "size differs"),
    "bit-flipped": (bit_flipped, "sha256 differs"),
    "wrong-shape": (planted("wide"), "another base"),
    "wrong-base": (planted("other"), "another base"),
    "oversized-rank": (oversized_rank, "rank 1048576 is outside"),
    "path-traversal": (path_traversal, "escapes the bundle"),
    "symlinked": (symlinked, "symlink that leads outside"),
}
# Commands that read a bundle; {b} is the bundle, {ref} the reference base.
COMMANDS = {
    "run": ["run", "{b}", "--backend", "{backend}", "--adapter", "qv", "--max-new-tokens", "2", "hi"],
    "chat": ["chat", "{b}", "--backend", "{backend}", "--max-new-tokens", "2"],
    "bench": ["bench", "{b}", "--backend", "{backend}", "--runs", "1", "--new-tokens", "2", "--no-memory"],
    "inspect": ["inspect", "{b}"],
    "verify": ["verify", "{b}", "--reference", "{ref}", "--backend", "{backend}"],
    "add-adapter": ["add-adapter", "{b}", "new={adapter}"],
    "remove-adapter": ["remove-adapter", "{b}", "qv"],
}
# inspect, add-adapter and remove-adapter open no engine: hostile-but-consistent adapter files
# (wrong shape or base, hashes matching) are only a problem for what loads them.
LOADS_ADAPTERS = {"run", "chat", "bench", "verify"}


@pytest.mark.parametrize("backend", ["onnx", "gguf"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_bundle_exits_2_with_one_line_for_every_command(case, backend, bundles, tiny_llama, llama_adapters,
                                                            tmp_path, capsys, monkeypatch):
    damage, message = CASES[case]
    monkeypatch.setattr(sys, "stdin", io.StringIO("/exit\n"))
    for verb, template in COMMANDS.items():
        if case in ("wrong-shape", "wrong-base") and verb not in LOADS_ADAPTERS:
            continue
        b = tmp_path / verb / "bundle"
        shutil.copytree(bundles["good"], b, symlinks=True)
        damage(b, backend, bundles)
        args = [a.format(b=b, backend=backend, ref=tiny_llama, adapter=llama_adapters["mixed"]) for a in template]
        code = main(args)
        err = capsys.readouterr().err
        assert code == 2, (verb, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, (verb, err)


def _peft_dir(path, rank, truncate=False):
    import numpy as np

    path.mkdir()
    header, body = {}, b""
    for part, shape in (("A", (rank, 64)), ("B", (64, rank))):
        arr = np.zeros(shape, np.float32)
        header[f"base_model.model.model.layers.0.self_attn.q_proj.lora_{part}.weight"] = {
            "dtype": "F32", "shape": list(shape), "data_offsets": [len(body), len(body) + arr.nbytes]}
        body += arr.tobytes()
    h = json.dumps(header).encode()
    data = len(h).to_bytes(8, "little") + h + body
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2] if truncate else data)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 8,
                                                          "target_modules": ["q_proj"]}))
    return path


@pytest.mark.parametrize("peft, message", [
    (lambda p: _peft_dir(p, 4097), "1..4096, not '4097'"),
    (lambda p: _peft_dir(p, 4, truncate=True), "outside the file (truncated?)"),
])
def test_bad_peft_directories_exit_2_for_export_and_add_adapter(peft, message, bundles, tiny_llama, tmp_path, capsys):
    ad = peft(tmp_path / "ad")
    b = tmp_path / "bundle"
    shutil.copytree(bundles["good"], b)
    for args in (["add-adapter", str(b), f"x={ad}"], ["export", str(tiny_llama), "--out", str(tmp_path / "o"),
                                                      "--quiet", f"--adapter=x={ad}"]):
        code = main(args)
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (args[0], err)
    assert not (tmp_path / "o").exists() and not list((b / "adapters").glob("x.*"))


def test_a_base_with_only_pickled_weights_is_refused_not_unpickled(tiny_llama, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    base = tmp_path / "pickled"
    shutil.copytree(tiny_llama, base)
    AutoModelForCausalLM.from_pretrained(base).save_pretrained(base, safe_serialization=False)
    (base / "model.safetensors").unlink()
    capsys.readouterr()  # transformers' own load bars above (5.x draws them) are the test's, not export's
    code = main(["export", str(base), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "safetensors only" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
