"""builtin:gemma3-270m with the reverse-word LoRA of tests/integration/test_gemma3.py: export int4
ONNX with a given set of 8-bit projection groups and print `edgepeft verify`'s figures for the
base and the adapter. Measures whether a different default 8-bit choice brings the trained LoRA
within verify's int4 bounds (issue 35, item 6). The groups given are the whole 8-bit set: the
exporter's own addition for this base (gate_up_proj, held at 5 bits in its GGUF) is turned off.

    python benchmarks/gemma3_eight_bit.py qkv_proj,down_proj,lm_head /tmp/g3/main
    python benchmarks/gemma3_eight_bit.py qkv_proj,gate_up_proj,down_proj,lm_head /tmp/g3/gu

Needs the gemma3 extra; the LoRA is trained once into /tmp/g3/reverse (about a minute)."""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

import test_gemma3  # noqa: E402  (the test's LoRA recipe, reused as is)

from edgepeft.exporters import export_bundle, onnx_export  # noqa: E402
from edgepeft.exporters.archs.base import SPLIT_GROUPS  # noqa: E402
from edgepeft.exporters.builtin import materialize  # noqa: E402

GROUPS = {g.name for g in SPLIT_GROUPS} | {"lm_head"}


def main(groups: str, out: str, lora: str = "/tmp/g3/reverse") -> None:
    lora_dir = Path(lora)
    if not lora_dir.exists():
        test_gemma3._train_lora(materialize(test_gemma3.BASE), lora_dir)
    onnx_export.EIGHT_BIT_GROUPS = tuple(groups.split(","))  # what _eight_bit_groups reads
    onnx_export.source_level_bits = lambda source: {}  # exactly these groups: none added for the source
    t = time.perf_counter()
    export_bundle(test_gemma3.BASE, Path(out), {"reverse": str(lora_dir)}, formats="onnx", quiet=True)
    print(f"export {time.perf_counter() - t:.0f} s; onnx/ {sum(f.stat().st_size for f in (Path(out) / 'onnx').iterdir()) >> 20} MiB")
    p = subprocess.run([sys.executable, "-m", "edgepeft", "verify", out, "--reference", test_gemma3.BASE, "--json"],
                       capture_output=True, text=True)
    for c in json.loads(p.stdout)["checks"]:
        print(f"{c['adapter'] or 'base'}: kl {c['kl']:.4f} top1 {c['top1']:.4f} max_abs {c['max_abs']:.1f} "
              f"ok {c['ok']} (bounds {c['thresholds']})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("groups", help=f"comma-separated 8-bit groups, of: {', '.join(sorted(GROUPS))}")
    ap.add_argument("out", help="the bundle directory to write")
    ap.add_argument("--lora", default="/tmp/g3/reverse", help="where the trained LoRA is (trained there if absent)")
    a = ap.parse_args()
    unknown = set(a.groups.split(",")) - GROUPS
    if unknown:
        ap.error(f"unknown group(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(GROUPS))}")
    main(a.groups, a.out, a.lora)
