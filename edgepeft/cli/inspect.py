"""Show a bundle: base, tokenizer, backends with their files, adapters, and which adapter kind
runs on which backend."""

from __future__ import annotations

import argparse
import json

from ..bundle import Bundle
from ..byte_sizes import format_bytes
from ..kinds import support_table
from .run import add_verify_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_verify_argument(p)


def describe(bundle: Bundle) -> dict:
    files = bundle.manifest["files"]
    backends = {}
    for name, info in bundle.backends.items():
        entry = {k: v for k, v in info.items() if k != "slots"}
        if "slots" in info:
            entry["slots"] = len(info["slots"])
        entry["bytes"] = sum(f["size"] for rel, f in files.items() if rel.startswith(f"{name}/"))
        backends[name] = entry
    adapters = {}
    for name, a in bundle.adapters.items():
        adapters[name] = {**{k: v for k, v in a.items() if k != "files"},
                          "files": {b: {"path": rel, "bytes": files[rel]["size"]} for b, rel in a["files"].items()}}
    return {"path": str(bundle.root), "format_version": bundle.manifest["format_version"],
            "created_by": bundle.manifest.get("created_by"), "base": bundle.base,
            "tokenizer": bundle.manifest["tokenizer"], "backends": backends, "adapters": adapters,
            "support": support_table()}


def run(args) -> int:
    info = describe(Bundle.open(args.bundle, verify_hashes=args.verify_hashes))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    b, d = info["base"], info["base"]["dims"]
    print(f"bundle   {info['path']}  ({info['created_by']}, format {info['format_version']})")
    print(f"base     {b['source']}  {b['architecture']}  {d['num_layers']} layers, hidden {d['hidden_size']}, "
          f"heads {d['num_heads']}/{d['num_kv_heads']} kv, vocab {d['vocab_size']}")
    print(f"         fingerprint {b['fingerprint'][:23]}...")
    if b.get("merged_adapter"):
        print(f"         merged adapter: {b['merged_adapter']['name']}")
    for name, be in info["backends"].items():
        extra = f", block {be['block_size']}" if "block_size" in be else ""
        slots = f"  {be['slots']} adapter slots ({be.get('slot_set', 'lora')})" if "slots" in be else ""
        reads = f", reads {format_bytes(be['decode_bytes'])} per token" if isinstance(be.get("decode_bytes"), int) else ""
        print(f"{name:<8} {be['model']}  {be['quant']}{extra}  {format_bytes(be['bytes'])}{reads}  "
              f"context {be['context_length']}{slots}")
    print(f"adapters {len(info['adapters'])}")
    for name, a in info["adapters"].items():
        files = ", ".join(f"{bk} {format_bytes(f['bytes'])}" for bk, f in a["files"].items())
        what = (f"{a['num_virtual_tokens']} virtual tokens ({a.get('peft_type')})" if "num_virtual_tokens" in a
                else f"rank {a['rank']}  {','.join(a['targets'])}")
        print(f"  {name:<16} {a['kind']:<6} {what}  [{files}]")
    print("support  kind            " + "  ".join(f"{k:<8}" for k in info["support"][0] if k != "kind"))
    for row in info["support"]:
        print("         " + f"{row['kind']:<15} " + "  ".join(f"{v:<8}" for k, v in row.items() if k != "kind"))
    return 0
