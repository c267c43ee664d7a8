"""The weight bytes one decode step reads, recorded per backend at export."""


def _params(base_dir) -> tuple[int, int]:
    """(weights outside the embedding, embedding weights) of a factory base, from its config."""
    import json

    c = json.loads((base_dir / "config.json").read_text())
    h, i, v, n = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    hd = c.get("head_dim") or h // c["num_attention_heads"]
    attn = h * hd * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"])
    layer = attn + 3 * h * i + 2 * h
    return n * layer + h + (0 if c.get("tie_word_embeddings") else v * h), v * h


def test_decode_bytes_count_every_weight_once_and_the_embedding_by_one_row(tiny_llama, tmp_path):
    """fp32 and F32: 4 bytes per weight outside the embedding plus one embedding row (and small
    tables read by row, such as the rotary cache); int4 and Q4_K_M read several times fewer."""
    from edgepeft.exporters import export_bundle

    body, _ = _params(tiny_llama)
    exact = export_bundle(str(tiny_llama), tmp_path / "f32", formats="onnx,gguf", onnx_quant="fp32",
                          gguf_quant="F32", quiet=True).backends
    for backend in ("onnx", "gguf"):
        got = exact[backend]["decode_bytes"]
        assert 4 * body <= got <= 4 * body * 1.01 + 4096, (backend, got, 4 * body)
    small = export_bundle(str(tiny_llama), tmp_path / "q", formats="onnx,gguf", onnx_quant="int4",
                          gguf_quant="Q4_K_M", quiet=True).backends
    for backend in ("onnx", "gguf"):
        assert small[backend]["decode_bytes"] < exact[backend]["decode_bytes"] / 2.5, backend
