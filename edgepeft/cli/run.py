"""Generate a completion of PROMPT with the bundle's base, or with one of its adapters."""

from __future__ import annotations

import argparse
import json
import sys


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--backend", default="onnx", choices=["onnx", "gguf"], help="engine to run on (default onnx)")
    add_device_arguments(p)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end the text at TEXT (not printed); repeat for several")
    add_verify_argument(p)


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    from edgepeft.runtime.devices import DEVICES

    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="where to run (default auto: CUDA or llama.cpp GPU offload when available, else CPU; "
                        "see `edgepeft doctor` and docs/devices.md)")
    p.add_argument("--gpu-layers", type=int, default=None, metavar="N",
                   help="GGUF: offload only N layers to the GPU (default: all when a GPU is used)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the engine's choice)")
    p.add_argument("--max-context", type=int, default=None, metavar="N",
                   help="bound the KV cache to N tokens (prompt + generated) to save memory")
    p.add_argument("--max-resident-adapters", type=int, default=None, metavar="K",
                   help="load adapters on first use and keep at most K in memory (least recently used "
                        "is unloaded; default: all loaded at start)")


def add_verify_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verify-hashes", action="store_true",
                   help="re-read every bundle file and check its sha256 (default: only files changed "
                        "since they were last checked)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    p.add_argument("--adapter", default=None, metavar="NAME", help="adapter to apply (default: the plain base)")
    p.add_argument("--chat", action="store_true", help="wrap PROMPT in the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object: text, tokens, adapter, backend, timings")
    p.add_argument("--quiet", action="store_true", help="no timings on stderr")
    p.add_argument("prompt", metavar="PROMPT")


def open_engine(args):
    """The engine for run and chat. The generation arguments are checked first: a bad value is one
    line and exit 2 before the bundle is opened (chat: before it reads stdin)."""
    from edgepeft.bundle import Bundle
    from edgepeft.runtime import Engine
    from edgepeft.runtime.devices import check_gpu_layers
    from edgepeft.runtime.generate import check_stop
    from edgepeft.runtime.sampling import generation_params

    generation_params(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    check_stop(args.stop)
    check_gpu_layers(args.gpu_layers)
    bundle = Bundle.open(args.bundle, verify_hashes=args.verify_hashes)
    engine = Engine.open(bundle, backend=args.backend, device=args.device, threads=args.threads,
                         max_context=args.max_context, max_resident_adapters=args.max_resident_adapters,
                         gpu_layers=args.gpu_layers)
    if engine.device_note:
        print(f"edgepeft: {engine.device_note}", file=sys.stderr)
    return engine


def run(args) -> int:
    engine = open_engine(args)
    result = engine.complete(args.prompt, adapter=args.adapter, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                             chat=args.chat, stop=args.stop)
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    print(result.text)
    if not args.quiet:
        t = result.timings.to_json()
        print(f"[{result.backend}, adapter {result.adapter or 'none'}] load {t['load_s']:.2f} s, "
              f"prefill {result.prompt_tokens} tok at {t['prefill_tokens_per_s']} tok/s, "
              f"decode {t['decode_tokens']} tok at {t['decode_tokens_per_s']} tok/s", file=sys.stderr)
    return 0
