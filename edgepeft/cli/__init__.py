"""`edgepeft VERB ...`: each verb is a module in this package with `add_arguments` and `run`.

Errors that are the user's (EdgepeftError) are printed as one line and exit non-zero
(2 for bad input, 1 for a runtime failure); nothing else is caught."""

from __future__ import annotations

import argparse
import importlib
import sys

from .. import __version__
from ..errors import EdgepeftError

# verb -> (module, one-line help). The module list is what the tool does.
VERBS = {
    "export": ("export", "export a base (and adapters) to a bundle"),
    "add-adapter": ("add_adapter", "export one more PEFT adapter into a bundle"),
    "remove-adapter": ("remove_adapter", "remove an adapter from a bundle"),
    "inspect": ("inspect", "show a bundle's base, backends, adapters and the support table"),
    "run": ("run", "generate text from a prompt"),
    "chat": ("chat", "interactive chat; /adapter NAME switches adapters"),
    "serve": ("serve", "serve a bundle over an OpenAI-compatible HTTP API; each request picks its adapter"),
    "verify": ("verify", "compare a bundle's backends and adapters with the PyTorch+PEFT reference"),
    "bench": ("bench", "measure load, speed, adapter switch time and memory of a bundle"),
    "demo": ("demo", "export the builtin model with the shipped adapters and show them working"),
    "doctor": ("doctor", "show engines, execution providers, GPU, memory and CPU features of this machine"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: one line, exit 2 (argparse's default code)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edgepeft", description="Ship PEFT adapters to devices.")
    parser.add_argument("--version", action="version", version=f"edgepeft {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    for verb, (module, help_) in VERBS.items():
        mod = importlib.import_module(f"edgepeft.cli.{module}")
        p = sub.add_parser(verb, help=help_, description=(mod.__doc__ or help_).strip())
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        _recover(args)
        return int(args._run(args) or 0)
    except EdgepeftError as e:
        message = " ".join(str(e).split("\n"))  # one line, whatever a file name holds
        print(f"edgepeft {args.verb}: error: {message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


def _recover(args) -> None:
    """Before any command on a bundle: clean up after an interrupted write and say so (one line)."""
    from ..recovery import recover_unlocked

    path = getattr(args, "bundle", None) or getattr(args, "out", None)
    if path:
        message = recover_unlocked(path)
        if message:
            print(f"edgepeft {args.verb}: recovered {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
