#!/usr/bin/env python3
"""Peak memory of the runtime with and without the small-device settings, per backend.

    python benchmarks/memory_profile.py BUNDLE [BUNDLE...] [--max-context 512] [--max-resident-adapters 1]

For each bundle and backend, two fresh processes open the bundle and run every adapter once
(64 generated tokens each, EOS ignored) then the base; each reports its peak RSS:
  default   all adapters loaded at start, the bundle's default context
  bounded   --max-context N and --max-resident-adapters K (adapters loaded on first use, LRU)
Writes benchmarks/results/memory.md (and memory.json) with the machine and command at the top.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from edgepeft.byte_sizes import format_bytes

RESULTS = Path(__file__).resolve().parent / "results"


def probe(bundle: str, backend: str, max_context: int | None, resident: int | None, threads: int) -> dict:
    code = textwrap.dedent(f"""
        import json, time
        from edgepeft.runtime import Engine
        from edgepeft.runtime.memory import peak_rss_bytes, rss_bytes
        t = time.perf_counter()
        e = Engine.open({bundle!r}, backend={backend!r}, threads={threads}, max_context={max_context!r},
                        max_resident_adapters={resident!r})
        load = time.perf_counter() - t
        after_open = rss_bytes()
        for name in e.adapters + [None]:
            e.complete("Tell me about the sea.", adapter=name, max_new_tokens=64, ignore_eos=True)
        print(json.dumps({{"peak": peak_rss_bytes(), "after_open": after_open, "load_s": load,
                          "context": e.backend.context_length, "resident": e.resident_adapters,
                          "adapters": len(e.adapters)}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--max-context", type=int, default=512)
    ap.add_argument("--max-resident-adapters", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from edgepeft.bundle import Bundle

    rows, raw = [], {}
    for path in args.bundles:
        b = Bundle.open(path)
        params = b.base["dims"]
        for backend in [x for x in ("onnx", "gguf") if x in b.backends]:
            files = sum(v["size"] for k, v in b.manifest["files"].items() if k.startswith(f"{backend}/"))
            default = probe(path, backend, None, None, args.threads)
            bounded = probe(path, backend, args.max_context, args.max_resident_adapters, args.threads)
            raw[f"{path}:{backend}"] = {"default": default, "bounded": bounded, "base_file_bytes": files}
            mib = lambda r: format_bytes(r["peak"], "MiB", 0) if "peak" in r else f"failed: {r['error']}"  # noqa: E731
            rows.append(f"| {Path(path).name} ({params['num_layers']} layers, hidden {params['hidden_size']}) | "
                        f"{backend} {b.backends[backend]['quant']} | {format_bytes(files, 'MiB', 0)} | {len(b.adapters)} | "
                        f"{mib(default)} (context {default.get('context')}) | {mib(bounded)} (context "
                        f"{bounded.get('context')}, ≤{args.max_resident_adapters} resident) |")
    lines = ["# Runtime memory: default vs small-device settings", "",
             f"- when: {time.strftime('%Y-%m-%d %H:%M')}; machine: {platform.platform()}, {os.cpu_count()} CPUs",
             f"- command: `python benchmarks/memory_profile.py {' '.join(Path(p).name for p in args.bundles)} "
             f"--max-context {args.max_context} --max-resident-adapters {args.max_resident_adapters}`",
             "- each cell: peak RSS of a fresh process that opens the bundle and generates 64 tokens with "
             "every adapter, then the base", "",
             "| model | backend | base file | adapters | peak RSS, default | peak RSS, bounded |", "|---|---|---|---|---|---|",
             *rows]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "memory.json").write_text(json.dumps(raw, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
