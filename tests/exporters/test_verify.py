"""`edgepeft verify`: passes an honest export, fails one whose adapter is not what it claims."""

import json

from edgepeft.cli import main
from edgepeft.exporters import export_bundle


def test_verify_passes_an_exact_export_and_reports_every_backend_and_adapter(tiny_llama, llama_adapters, tmp_path, capsys):
    bundle = export_bundle(str(tiny_llama), tmp_path / "b", {n: str(llama_adapters[n]) for n in ("qv", "all")},
                           formats="onnx,gguf", onnx_quant="fp32", gguf_quant="F32", quiet=True)
    assert main(["verify", str(bundle.root), "--reference", str(tiny_llama), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["ok"] and {(c["backend"], c["adapter"]) for c in r["checks"]} == {
        (b, a) for b in ("onnx", "gguf") for a in (None, "qv", "all")}
    assert all(c["top1"] == 1.0 and c["kl"] < 1e-8 for c in r["checks"])


def test_verify_fails_when_the_adapter_differs_from_the_reference(tiny_llama, llama_adapters, tmp_path, capsys):
    bundle = export_bundle(str(tiny_llama), tmp_path / "b", {"qv": str(llama_adapters["qv"])},
                           onnx_quant="fp32", quiet=True)
    code = main(["verify", str(bundle.root), "--reference", str(tiny_llama),
                 "--adapter", f"qv={llama_adapters['all']}"])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL" in out and "some checks FAILED" in out
    assert "base" in out.splitlines()[2] and out.splitlines()[2].endswith("ok")
