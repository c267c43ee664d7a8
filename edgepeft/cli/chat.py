"""Interactive chat with a bundle. Commands: /adapter NAME (or /adapter none, or /adapter a+b for
plain LoRAs together) switches the adapter without reloading the base, /adapters lists them, /reset clears the history, /exit quits."""

from __future__ import annotations

import argparse
import sys

from .run import add_engine_arguments, open_engine


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    p.add_argument("--adapter", default=None, metavar="NAME", help="adapter to start with")


def run(args) -> int:
    from edgepeft.errors import EdgepeftError

    engine = open_engine(args)
    adapter, history = args.adapter, []
    engine.check_adapter(adapter)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"edgepeft chat: {engine.bundle.root} on {args.backend}; adapters: "
              f"{', '.join(engine.adapters) or 'none'}; /adapter NAME, /adapters, /reset, /exit")
    while True:
        if interactive:
            print(f"[{adapter or 'base'}] > ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/adapters":
            print("adapters: " + (", ".join(engine.adapters) or "none") + f" (active: {adapter or 'none'})")
            continue
        if line == "/reset":
            history = []
            print("history cleared")
            continue
        if line.startswith("/adapter"):
            name = line[len("/adapter"):].strip()
            if name in ("", "none", "base"):
                adapter = None
            else:
                try:
                    engine.check_adapter(name)
                except EdgepeftError as e:
                    print(e)
                    continue
                adapter = name
            print(f"adapter: {adapter or 'none'}")
            continue
        history.append({"role": "user", "content": line})
        pieces = []
        try:
            for piece in engine.stream(history, adapter=adapter, max_new_tokens=args.max_new_tokens,
                                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                       seed=args.seed, chat=True, stop=args.stop):
                pieces.append(piece)
                print(piece, end="", flush=True)
        except EdgepeftError as e:
            history.pop()
            print(f"error: {e}")
            continue
        print()
        history.append({"role": "assistant", "content": "".join(pieces)})
