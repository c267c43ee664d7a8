"""The export recipe version: how the demo and the benchmarks tell a bundle from the current
exporter from an older one (which still runs, but measures an older export)."""

from edgepeft.bundle import Bundle
from edgepeft.exporters import add_adapter, export_bundle
from edgepeft.exporters.onnx_export import ONNX_RECIPE, onnx_export_current


def test_an_export_records_the_current_recipe_and_add_adapter_keeps_it(tiny_llama, llama_adapters, tmp_path):
    bundle = export_bundle(str(tiny_llama), tmp_path / "b", {"qv": str(llama_adapters["qv"])},
                           onnx_quant="fp32", quiet=True)
    assert bundle.backends["onnx"]["recipe"] == ONNX_RECIPE
    assert onnx_export_current(bundle.backends["onnx"])
    add_adapter(bundle.root, "mixed", llama_adapters["mixed"])
    assert onnx_export_current(Bundle.open(bundle.root).backends["onnx"])


def test_a_bundle_from_before_the_recipe_field_is_not_current():
    # What an int4 export wrote before the field existed: every feature, no recipe.
    before = {"model": "onnx/model.onnx", "quant": "int4", "eight_bit": ["qkv_proj/MatMul"],
              "int4_rounding": "importance-weighted", "slot_set": "lora", "slots": [],
              "base_path": True, "logits_to_keep": True}
    assert not onnx_export_current(before)


def test_another_recipe_version_is_not_current():
    assert not onnx_export_current({"recipe": ONNX_RECIPE - 1})
    assert not onnx_export_current({"recipe": ONNX_RECIPE + 1})
    assert not onnx_export_current({"recipe": str(ONNX_RECIPE)})
    assert not onnx_export_current({"recipe": True})  # JSON true is not the integer 1
