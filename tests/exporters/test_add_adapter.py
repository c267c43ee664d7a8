"""add-adapter / remove-adapter: base files untouched, new adapters usable without reopening."""

import hashlib

import numpy as np
import pytest

from edgepeft.bundle import Bundle, remove_adapter
from edgepeft.errors import AdapterMismatch, BundleError, EdgepeftError
from edgepeft.exporters import add_adapter, export_bundle
from edgepeft.runtime import Engine
from factory import make_base, make_lora, reference_logits


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def bundle(tiny_llama, llama_adapters, tmp_path):
    return export_bundle(str(tiny_llama), tmp_path / "b", {"qv": str(llama_adapters["qv"])},
                         onnx_quant="fp32", quiet=True)


def test_add_adapter_leaves_base_files_byte_identical(bundle, llama_adapters):
    base_files = [bundle.file("onnx/model.onnx"), bundle.file("onnx/model.onnx.data")]
    before = [(digest(p), p.stat().st_mtime_ns) for p in base_files]
    add_adapter(bundle.root, "mixed", llama_adapters["mixed"])
    assert [(digest(p), p.stat().st_mtime_ns) for p in base_files] == before
    assert "mixed" in Bundle.open(bundle.root).adapters


def test_new_adapter_loads_into_an_open_engine(bundle, tiny_llama, llama_adapters):
    engine = Engine.open(bundle.root)
    session = engine.backend.session
    add_adapter(bundle.root, "all", llama_adapters["all"])
    engine.load_adapter("all", Bundle.open(bundle.root).adapter_path("all", "onnx"))
    assert engine.backend.session is session
    ids = engine.tokenizer.encode("hello there")
    ref = reference_logits(tiny_llama, llama_adapters["all"], ids)
    assert np.abs(engine.score(ids, adapter="all") - ref).max() <= 1e-3
    engine.unload_adapter("all")
    with pytest.raises(BundleError, match="no adapter named 'all'"):
        engine.score(ids, adapter="all")


def test_adapter_for_another_base_shape_is_refused(bundle, tmp_path):
    other = make_base(tmp_path / "wide", "llama", hidden=96)
    ad = make_lora(other, tmp_path / "wide_ad", target_modules=["q_proj"])
    with pytest.raises(AdapterMismatch, match="another base"):
        add_adapter(bundle.root, "wide", ad)
    assert "wide" not in Bundle.open(bundle.root).adapters
    assert not (bundle.root / "adapters" / "wide.onnx_adapter").exists()


def test_adapter_file_from_another_bundle_is_refused_at_load(bundle, tmp_path, llama_adapters):
    other_base = make_base(tmp_path / "other", "llama", seed=42)  # same shapes, other weights
    other = export_bundle(str(other_base), tmp_path / "ob", {"qv": str(llama_adapters["qv"])},
                          onnx_quant="fp32", quiet=True)
    engine = Engine.open(bundle.root)
    with pytest.raises(AdapterMismatch, match="another base"):
        engine.load_adapter("foreign", other.adapter_path("qv", "onnx"))


def test_duplicate_names_are_refused_and_remove_deletes_files(bundle, llama_adapters):
    with pytest.raises(BundleError, match="already has an adapter named 'qv'"):
        add_adapter(bundle.root, "qv", llama_adapters["all"])
    path = bundle.adapter_path("qv", "onnx")
    remove_adapter(bundle.root, "qv")
    assert not path.exists() and "qv" not in Bundle.open(bundle.root).adapters
    with pytest.raises(BundleError, match="no adapter named 'qv'"):
        remove_adapter(bundle.root, "qv")


def test_failed_export_leaves_an_existing_bundle_untouched(bundle, tmp_path):
    before = digest(bundle.root / "edgepeft.json")
    with pytest.raises(EdgepeftError, match="no-such-model"):
        export_bundle(str(tmp_path / "no-such-model"), bundle.root, quiet=True)
    assert digest(bundle.root / "edgepeft.json") == before
    assert [p.name for p in bundle.root.parent.iterdir() if p.name.startswith(".edgepeft-tmp")] == []
