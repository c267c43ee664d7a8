"""Compare every backend and adapter of a bundle with the PyTorch+PEFT reference: logit error on a
fixed prompt set, each prompt followed by the reference's greedy answer (max abs, KL, top-1
agreement over positions) and, for adapters with a task check, task accuracy on held-out prompts
paired with PyTorch's on the same prompts (edgepeft.demo.task_checks). Exits 1 when any
backend/adapter falls below the printed thresholds."""

from __future__ import annotations

import argparse
import json

from edgepeft.demo.tasks import TASK_ALPHA, TASK_MARGIN, TASK_PROMPTS

from .export import parse_adapter_arg


def prompt_count(value: str) -> int:
    """A number of held-out task prompts: 1 to TASK_PROMPTS (PyTorch's outcomes cover those)."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= TASK_PROMPTS:
        raise argparse.ArgumentTypeError(f"expected 1 to {TASK_PROMPTS} prompts (PyTorch's outcomes cover "
                                         f"{TASK_PROMPTS}), got {value!r}")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--reference", required=True, metavar="BASE",
                   help="the base the bundle was exported from: HF directory or builtin:NAME")
    p.add_argument("--adapter", action="append", default=[], type=parse_adapter_arg, metavar="NAME=PEFT_DIR",
                   help="PEFT directory of an adapter, where the one recorded at export has moved")
    p.add_argument("--backend", action="append", choices=["onnx", "gguf"], help="only these backends")
    p.add_argument("--task-prompts", type=prompt_count, default=TASK_PROMPTS, metavar="N",
                   help=f"held-out prompts per task check (default and most {TASK_PROMPTS}: PyTorch's outcomes are "
                        "stored for these)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--verify-hashes", action="store_true",
                   help="accepted for symmetry with run/chat/bench: verify always re-reads every file's sha256")


def run(args) -> int:
    from edgepeft.exporters.verify import verify_bundle

    from edgepeft.demo import task_checks

    r = verify_bundle(args.bundle, args.reference, dict(args.adapter), args.backend,
                      task_checks=lambda bundle: task_checks(bundle, args.task_prompts))
    if args.json:
        print(json.dumps(r, indent=2))
        return 0 if r["ok"] else 1
    print(f"verify {r['bundle']} against {r['reference']} (hashes checked)")
    print(f"{'backend':<7} {'quant':<7} {'adapter':<12} {'max abs':>9} {'KL':>10} {'top-1':>7} {'pos':>4}  {'task acc (PyTorch) lost/gained':<28} thresholds")
    for c in r["checks"]:
        t = c["thresholds"]
        k = c.get("task")
        task = f"{k['accuracy']:.1%} ({k['pytorch_accuracy']:.1%}) -{k['lost']}/+{k['gained']}" if k else ""
        limits = f"KL<={t['kl']:g} top1>={t['top1']:g}" + (f" abs<={t['max_abs']:g}" if "max_abs" in t else "") \
            + (f" task: sign p>={TASK_ALPHA:g}, net loss<={TASK_MARGIN:.0%}" if k else "")
        print(f"{c['backend']:<7} {c['quant']:<7} {c['adapter'] or 'base':<12} {c['max_abs']:>9.2e} {c['kl']:>10.2e} "
              f"{c['top1']:>6.1%} {c['positions']:>4}  {task:<28} {limits}  {'ok' if c['ok'] else 'FAIL'}")
    print("all checks passed" if r["ok"] else "some checks FAILED")
    return 0 if r["ok"] else 1
