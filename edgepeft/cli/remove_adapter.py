"""Remove an adapter (its manifest entry and files) from a bundle."""

from __future__ import annotations

import argparse

from ..bundle import remove_adapter


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("name", metavar="NAME")


def run(args) -> int:
    bundle = remove_adapter(args.bundle, args.name)
    print(f"removed adapter {args.name} from {bundle.root}")
    return 0
