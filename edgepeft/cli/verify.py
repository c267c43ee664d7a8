"""Compare every backend and adapter of a bundle with the PyTorch+PEFT reference: logit error on a
fixed prompt set, each prompt followed by the reference's greedy answer (max abs, KL, top-1
agreement over positions) and, for adapters with a task check, task accuracy. Exits 1 when any
backend/adapter falls below the printed thresholds."""

from __future__ import annotations

import argparse
import json

from .export import parse_adapter_arg


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--reference", required=True, metavar="BASE",
                   help="the base the bundle was exported from: HF directory or builtin:NAME")
    p.add_argument("--adapter", action="append", default=[], type=parse_adapter_arg, metavar="NAME=PEFT_DIR",
                   help="PEFT directory of an adapter, where the one recorded at export has moved")
    p.add_argument("--backend", action="append", choices=["onnx", "gguf"], help="only these backends")
    p.add_argument("--task-prompts", type=int, default=40, help="held-out prompts per task check (default 40)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--verify-hashes", action="store_true",
                   help="accepted for symmetry with run/chat/bench: verify always re-reads every file's sha256")


def run(args) -> int:
    from edgepeft.exporters.verify import verify_bundle

    r = verify_bundle(args.bundle, args.reference, dict(args.adapter), args.backend, args.task_prompts)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0 if r["ok"] else 1
    print(f"verify {r['bundle']} against {r['reference']} (hashes checked)")
    print(f"{'backend':<7} {'quant':<7} {'adapter':<12} {'max abs':>9} {'KL':>10} {'top-1':>7} {'pos':>4}  {'task acc (PyTorch)':<20} thresholds")
    for c in r["checks"]:
        t = c["thresholds"]
        task = f"{c['task_accuracy']:.0%} ({c['pytorch_task_accuracy']:.0%})" if "task_accuracy" in c else ""
        limits = f"KL<={t['kl']:g} top1>={t['top1']:g}" + (f" abs<={t['max_abs']:g}" if "max_abs" in t else "") \
            + (" task>=95% of PyTorch" if task else "")
        print(f"{c['backend']:<7} {c['quant']:<7} {c['adapter'] or 'base':<12} {c['max_abs']:>9.2e} {c['kl']:>10.2e} "
              f"{c['top1']:>6.1%} {c['positions']:>4}  {task:<20} {limits}  {'ok' if c['ok'] else 'FAIL'}")
    print("all checks passed" if r["ok"] else "some checks FAILED")
    return 0 if r["ok"] else 1
