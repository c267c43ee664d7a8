import pytest

from edgepeft.exporters import export_bundle


@pytest.fixture(scope="session")
def llama_bundle(tiny_llama, llama_adapters, tmp_path_factory):
    """fp32 ONNX + F32 GGUF bundle of the tiny Llama with the three test adapters."""
    return export_bundle(str(tiny_llama), tmp_path_factory.mktemp("rt") / "bundle",
                         {n: str(p) for n, p in llama_adapters.items()}, formats="onnx,gguf",
                         onnx_quant="fp32", gguf_quant="F32", quiet=True)
