"""An export's peak memory grows with the size of a layer, not with the number of layers: ten more
layers add less than a tenth of their float32 weights (a whole float32 model would add all of them,
and its float graph as much again). Their quantized weights go to the ONNX data file as they are
made (onnx_external), and the float32 buffers of the layers read before are given back to the
kernel when freed (heap.map_large_buffers), not kept as holes in malloc's heap."""

import json
import subprocess
import sys

import pytest

from factory import make_base

HIDDEN = 1024

CHILD = """
import resource, sys
from edgepeft.exporters import export_bundle
export_bundle(sys.argv[1], sys.argv[2], formats=sys.argv[3], onnx_quant="int4", gguf_quant="Q4_K_M", quiet=True)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def _peak(base, out, formats) -> int:
    p = subprocess.run([sys.executable, "-c", CHILD, str(base), str(out), formats], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    return int(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("formats", ["onnx", "gguf"])
def test_ten_more_layers_add_less_than_a_tenth_of_their_float32_weights(tmp_path, formats):
    bases = {n: make_base(tmp_path / f"l{n}", "llama", seed=0, layers=n, hidden=HIDDEN) for n in (2, 12)}
    config = json.loads((bases[12] / "config.json").read_text())
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = h * config["num_key_value_heads"] // config["num_attention_heads"]
    layer_bytes = 4 * (2 * h * h + 2 * h * kv + 3 * h * i)
    peaks = {n: _peak(base, tmp_path / f"b{n}-{formats}", formats) for n, base in bases.items()}
    added = peaks[12] - peaks[2]
    assert added < 0.1 * 10 * layer_bytes, (peaks, 10 * layer_bytes)
