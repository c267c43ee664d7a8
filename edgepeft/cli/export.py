"""Export a base model (a local Hugging Face directory or builtin:NAME) to a bundle, with any
number of PEFT adapters as separate hot-swappable files (or one merged in with --merge)."""

from __future__ import annotations

import argparse

from ..errors import BundleError


def parse_adapter_arg(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PEFT_DIR, got {value!r}")
    return name, path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", metavar="BASE", help="Hugging Face model directory (llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3) "
                   "or builtin:smollm2-135m / builtin:gemma3-270m")
    p.add_argument("--out", required=True, metavar="BUNDLE", help="bundle directory to write")
    p.add_argument("--adapter", action="append", default=[], type=parse_adapter_arg, metavar="NAME=PEFT_DIR",
                   help="a PEFT adapter directory to export under NAME (repeatable)")
    p.add_argument("--format", default="onnx", help="comma-separated backends to export: onnx, gguf (default onnx)")
    p.add_argument("--onnx-quant", default="int4", choices=["int4", "int4-pure", "int8", "fp16", "fp32"],
                   help="ONNX base precision (default int4: 4-bit MatMulNBits with zero points where they help, qkv, down_proj and lm_head at 8 bits (and any projection a builtin base holds at more than 4 bits), a head tied to the embedding at 4 bits with its top 64 logits recomputed from the fp16 table; int4-pure: every MatMul at 4 bits, symmetric, as onnxruntime-genai's int4; 4-bit blocks are weighted by activation statistics from a built-in calibration text)")
    p.add_argument("--int4-target-kl", type=float, default=None, metavar="KL",
                   help="int4: choose the 8-bit MatMuls by measured sensitivity instead, the most sensitive per "
                        "byte first, until the KL to the float model on the built-in calibration text is at most "
                        "KL (larger is faster and less faithful; every MatMul at 4 bits is about 0.33 on "
                        "SmolLM2-135M, the default groups 0.084; costs one forward pass per MatMul at export)")
    p.add_argument("--gguf-quant", default="Q4_K_M", metavar="TYPE",
                   help="GGUF base type: F32, F16 or any llama.cpp quant type (Q8_0, Q4_K_M, ...; default Q4_K_M)")
    p.add_argument("--block-size", type=int, default=32, help="int4/int8 quantization block size (default 32)")
    p.add_argument("--accuracy-level", type=int, default=4, choices=[0, 1, 2, 3, 4],
                   help="MatMulNBits compute type: 4 = int8 (fast on CPU), 1 = fp32 (default 4)")
    p.add_argument("--context-length", type=int, default=None,
                   help="longest sequence the bundle supports (default: the model's, at most 8192)")
    p.add_argument("--merge", metavar="NAME", help="bake adapter NAME into a dedicated base instead of a separate file")
    p.add_argument("--slots", choices=["lora", "full", "none"], default=None,
                   help="ONNX adapter slots: lora (LoRA only), full (also the scale and bias slots IA3, DoRA and "
                        "bias tuning need; ~20%% slower decode with an adapter) or none (no hot-swap). Calls "
                        "without an adapter skip the slots. Default: none with --merge, full when an --adapter "
                        "needs it, else lora")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from edgepeft.exporters import export_bundle

    names = [n for n, _ in args.adapter]
    if len(set(names)) != len(names):
        raise BundleError("each --adapter NAME must be unique")
    bundle = export_bundle(args.base, args.out, dict(args.adapter), formats=args.format,
                           onnx_quant=args.onnx_quant, gguf_quant=args.gguf_quant, block_size=args.block_size,
                           accuracy_level=args.accuracy_level, context_length=args.context_length,
                           merge=args.merge, quiet=args.quiet, slots=args.slots,
                           int4_target_kl=args.int4_target_kl)
    print(f"wrote {bundle.root} ({', '.join(bundle.backends)}; adapters: {', '.join(bundle.adapters) or 'none'})")
    return 0
