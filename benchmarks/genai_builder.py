"""onnxruntime-genai's model builder, run as `python -m onnxruntime_genai.models.builder ARGS`,
with one fix for Gemma 3 under transformers 5: its config nests rope_parameters per layer type
({"full_attention": ..., "sliding_attention": ...}), and genai 0.18's base builder reads
rope_parameters["rope_type"] at the top (KeyError: 'rope_type'); its Gemma 3 builder reads the
local base from rope_local_base_freq. The config is given back in the flat form both expect.
Run it with the Python that has onnxruntime-genai: GENAI_PYTHON benchmarks/genai_builder.py ARGS."""
import runpy
import sys

import transformers

orig = transformers.AutoConfig.from_pretrained.__func__


def patched(cls, *a, **k):
    c = orig(cls, *a, **k)
    rp = getattr(c, "rope_parameters", None)
    if isinstance(rp, dict) and "full_attention" in rp and "rope_type" not in rp:
        c.rope_local_base_freq = rp["sliding_attention"]["rope_theta"]
        c.rope_theta = rp["full_attention"]["rope_theta"]
        c.rope_parameters = dict(rp["full_attention"])
    return c


transformers.AutoConfig.from_pretrained = classmethod(patched)
sys.argv = ["builder", *sys.argv[1:]]
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
