"""Export one PEFT adapter into an existing bundle. The base files are never rewritten."""

from __future__ import annotations

import argparse

from .export import parse_adapter_arg


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("adapter", metavar="NAME=PEFT_DIR", type=parse_adapter_arg)
    p.add_argument("--format", default=None, help="backends to export for (default: every backend in the bundle)")


def run(args) -> int:
    from edgepeft.exporters import add_adapter

    name, path = args.adapter
    bundle = add_adapter(args.bundle, name, path, args.format)
    files = ", ".join(bundle.adapters[name]["files"].values())
    print(f"added adapter {name} to {bundle.root} ({files})")
    return 0
