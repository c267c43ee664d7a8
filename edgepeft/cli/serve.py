"""Serve a bundle over an OpenAI-compatible HTTP API (vLLM's multi-LoRA conventions): the base
loads once, and each request's `model` names its adapter (the base's name for none, `a+b` for plain
LoRAs together). GET /v1/models lists them. Binds 127.0.0.1 unless --host says otherwise; with
--api-key (or EDGEPEFT_API_KEY) every endpoint but /health needs `Authorization: Bearer KEY`.
Needs `pip install 'edgepeft[serve]'`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .run import add_device_arguments, add_verify_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--backend", default="onnx", choices=["onnx", "gguf"], help="engine to run on (default onnx)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (default: $EDGEPEFT_API_KEY, else no key)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the base's name in the API (default: the base's name in the bundle)")
    p.add_argument("--allow-adapter-loading", default=None, metavar="DIR",
                   help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter for adapter files inside DIR")
    p.add_argument("--parallel", type=int, default=None, metavar="N",
                   help="at most N requests decode together in one batch, each with its own adapter (default 4); "
                        "more wait their turn")
    add_device_arguments(p)
    add_verify_argument(p)


def base_name(bundle) -> str:
    """The base's public name: the builtin's name, or the last part of its source path."""
    source = str(bundle.base.get("source") or bundle.root.name)
    return source.split(":", 1)[1] if source.startswith("builtin:") else Path(source).name or source


def run(args) -> int:
    from edgepeft.bundle import Bundle
    from edgepeft.errors import InvalidArgument, require
    from edgepeft.runtime import Engine
    from edgepeft.server import create_app, listen, serve

    require("uvicorn", "serve")
    require("starlette", "serve")
    api_key = args.api_key if args.api_key is not None else os.environ.get("EDGEPEFT_API_KEY") or None
    if api_key is not None and not api_key.strip():
        raise InvalidArgument("--api-key is empty")
    adapter_dir = args.allow_adapter_loading
    if adapter_dir is not None and not Path(adapter_dir).is_dir():
        raise InvalidArgument(f"--allow-adapter-loading {adapter_dir}: not a directory")
    sock = listen(args.host, args.port)  # a port in use fails now, before the model loads
    try:
        bundle = Bundle.open(args.bundle, verify_hashes=args.verify_hashes)
        engine = Engine.open(bundle, backend=args.backend, device=args.device, threads=args.threads,
                             max_context=args.max_context, max_resident_adapters=args.max_resident_adapters,
                             gpu_layers=args.gpu_layers, parallel=args.parallel)
        if engine.device_note:
            print(f"edgepeft: {engine.device_note}", file=sys.stderr)
        name = args.served_model_name or base_name(bundle)
        app = create_app(engine, name, api_key=api_key, adapter_dir=adapter_dir)
        print(f"edgepeft serve: {bundle.root} on {args.backend} as {name!r}; adapters: "
              f"{', '.join(engine.adapters) or 'none'}", file=sys.stderr, flush=True)
        serve(app, sock)
    finally:
        sock.close()
    return 0
