"""The GGUF base writer streams: it holds about one converted tensor, not a copy of the model; what
it writes reads back (gguf-py's GGUFReader) as the checkpoint's weights in llama.cpp's layout; and
a bf16 checkpoint is quantized from a BF16 file, giving the bytes an F32 file gives."""

import threading
import tracemalloc

import gguf
import numpy as np
import pytest

from edgepeft.exporters import bundle_export, gguf_job
from edgepeft.exporters.gguf_base import quantize_gguf, quantize_source_type, write_base_gguf
from edgepeft.exporters.hf_base import load_base
from factory import bf16_copy, load_reference, make_base


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory):
    """Six layers 256 wide, in bf16: the model's float32 bytes are many times its largest tensor's."""
    root = tmp_path_factory.mktemp("deep")
    return bf16_copy(make_base(root / "f32", "llama", seed=3, layers=6, hidden=256), root / "bf16")


@pytest.mark.parametrize("ftype", ["F32", "F16", "BF16"])
def test_writer_peak_memory_is_a_few_tensors_not_the_model(deep_llama, tmp_path, ftype):
    # tracemalloc sees numpy's allocations: the converted arrays, which gguf-py's add_tensor kept
    # for every tensor until the file was written (torch's read buffers are not traced).
    base = load_base(str(deep_llama))
    sizes = [4 * t.numel() for t in base.model.state_dict().values()]
    largest, total = max(sizes), sum(sizes)
    assert total > 20 * largest
    tracemalloc.start()
    try:
        write_base_gguf(base, tmp_path / "base.gguf", ftype)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * largest + 2**20, (peak, largest, total)


def _llama_cpp_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order llama.cpp's llama architecture expects for q/k: per head, the rotary halves'
    rows interleaved (0, d/2, 1, d/2 + 1, ...)."""
    head_dim = n_rows // n_head
    per_head = np.stack([np.arange(head_dim // 2), np.arange(head_dim // 2) + head_dim // 2], 1).ravel()
    return np.concatenate([h * head_dim + per_head for h in range(n_head)])


def _expected(model_dir, arch_name: str, gemma: bool) -> dict:
    """The GGUF tensors the writer should produce, by GGUF name, from the float32 reference model."""
    model = load_reference(model_dir)
    cfg = model.config
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch_name), cfg.num_hidden_layers)
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        stem, _, suffix = name.rpartition(".")
        w = t.float().numpy()
        if gemma and name.endswith("norm.weight"):
            w = w + np.float32(1.0)
        if not gemma and stem.endswith("q_proj"):
            w = w[_llama_cpp_rows(w.shape[0], cfg.num_attention_heads)]
        if not gemma and stem.endswith("k_proj"):
            w = w[_llama_cpp_rows(w.shape[0], cfg.num_key_value_heads)]
        out[f"{names.get_name(stem)}.{suffix}"] = w
    return out


def _read_back(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}


@pytest.mark.parametrize("family,arch_name,opts", [
    ("llama", "LLAMA", {}),
    ("gemma3_text", "GEMMA3", {"tie": True}),
], ids=["llama-permuted", "gemma3-norm-offset"])
@pytest.mark.parametrize("ftype", ["F32", "BF16"])
def test_written_tensors_read_back_as_the_converted_weights(tmp_path, family, arch_name, opts, ftype):
    model_dir = bf16_copy(make_base(tmp_path / "f32", family, seed=5, **opts), tmp_path / "bf16")
    write_base_gguf(load_base(str(model_dir)), tmp_path / "base.gguf", ftype)
    got, want = _read_back(tmp_path / "base.gguf"), _expected(model_dir, arch_name, family.startswith("gemma"))
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        kind, value = got[name]
        assert kind == ("F32" if w.ndim == 1 else ftype), name
        assert value.shape == w.shape and np.array_equal(value, w), name


def test_a_bf16_checkpoint_is_quantized_from_bf16_with_the_bytes_f32_gives(tmp_path, monkeypatch):
    # hidden 256: llama.cpp's K-quants (256-wide blocks) apply, not their fallbacks.
    f32_dir = make_base(tmp_path / "f32", "qwen2", seed=7, hidden=256)
    bf16_dir = bf16_copy(f32_dir, tmp_path / "bf16")
    assert quantize_source_type(load_base(str(f32_dir))) == "F32"
    assert quantize_source_type(load_base(str(bf16_dir), lazy=False)) == "F32"  # whole: float32 in memory
    base = load_base(str(bf16_dir))
    assert quantize_source_type(base) == "BF16"

    sources = []

    def spy(src, dest, quant, threads=0):
        sources.append({t.tensor_type.name for t in gguf.GGUFReader(str(src)).tensors})
        quantize_gguf(src, dest, quant, threads)

    monkeypatch.setattr(gguf_job, "quantize_gguf", spy)
    out = tmp_path / "bundle"
    bundle_export.export_bundle(str(bf16_dir), out, formats="gguf", gguf_quant="Q4_K_M", quiet=True)
    assert sources == [{"BF16", "F32"}]  # matrices BF16, norms and biases F32
    write_base_gguf(base, tmp_path / "base-F32.gguf", "F32")
    quantize_gguf(tmp_path / "base-F32.gguf", tmp_path / "from-f32.gguf", "Q4_K_M")
    from_f32 = (tmp_path / "from-f32.gguf").read_bytes()
    assert (out / "gguf" / "base-Q4_K_M.gguf").read_bytes() == from_f32
    assert {t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "from-f32.gguf")).tensors} >= {"Q4_K", "F32"}


def test_the_gguf_quantizer_runs_beside_the_onnx_export_and_ends_before_its_head(tiny_llama, tmp_path, monkeypatch):
    """The quantizer starts once the GGUF source is written, while the ONNX graph is built, and
    the graph reads its head only after the quantizer has finished (gguf_job.py); the files are
    those of a GGUF-only export."""
    from edgepeft.exporters import onnx_quant

    events, graph_begun = [], threading.Event()

    def slow_quantize(src, dest, quant, threads=0):
        events.append("quantize start")
        # ends only once the ONNX graph has begun (or after 60 s, which the order below then catches)
        graph_begun.wait(60)
        quantize_gguf(src, dest, quant, threads)
        events.append("quantize end")

    reading = onnx_quant.WeightQuantizer.reading

    def spy_reading(self, group):
        graph_begun.set()
        reading(self, group)  # the head's waits for the quantizer here, before the weight is read
        events.append(f"read {group}")

    monkeypatch.setattr(gguf_job, "quantize_gguf", slow_quantize)
    monkeypatch.setattr(onnx_quant.WeightQuantizer, "reading", spy_reading)
    both = bundle_export.export_bundle(str(tiny_llama), tmp_path / "both", formats="onnx,gguf", quiet=True)
    first_read = next(i for i, e in enumerate(events) if e.startswith("read "))
    # the quantizer was still running when the graph began (it waits for that: a sequential
    # export would deadlock here until the 60 s timeout, and then fail this order)
    assert first_read < events.index("quantize end")
    head = events.index("read lm_head")
    assert events.index("quantize end") < head
    alone = bundle_export.export_bundle(str(tiny_llama), tmp_path / "alone", formats="gguf", quiet=True)
    rel = both.backends["gguf"]["model"]
    assert both.file(rel).read_bytes() == alone.file(rel).read_bytes()
    assert not list((tmp_path / "both" / "gguf").glob(".*"))  # the float source is gone


def test_a_quantizer_failure_in_the_background_fails_the_export_in_one_line(tiny_llama, tmp_path, monkeypatch):
    from edgepeft.errors import UnsupportedModel

    def broken(src, dest, quant, threads=0):
        raise UnsupportedModel(f"{src}: llama.cpp could not quantize it to {quant} (code 1)")

    monkeypatch.setattr(gguf_job, "quantize_gguf", broken)
    with pytest.raises(UnsupportedModel, match="could not quantize it to Q4_K_M"):
        bundle_export.export_bundle(str(tiny_llama), tmp_path / "b", formats="onnx,gguf", quiet=True)
    assert not (tmp_path / "b").exists()
