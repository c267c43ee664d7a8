"""Measure a bundle on this machine: for the base and each adapter, load time, time to first
token, prefill and decode tokens/s (median of several runs), adapter load and switch time
(median, p95), peak RSS with 0, 1 and all adapters, and the cost of reloading the base per task
(what hot-swapping replaces). With --concurrency 1,2,4,8: streams that run at once instead,
all on the base and each on a different adapter (continuous batching): aggregate and per-stream
decode tokens/s, time to first token, peak RSS."""

from __future__ import annotations

import argparse
import json

from .run import add_verify_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    from edgepeft.runtime.devices import DEVICES

    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--backend", default="onnx", choices=["onnx", "gguf"])
    p.add_argument("--device", default="auto", choices=DEVICES, help="where to run (default auto)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the engine's choice)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per configuration (median; default 3)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per run (default 128)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS child processes")
    p.add_argument("--concurrency", default=None, metavar="N,N,...",
                   help="measure streams that run at once instead (e.g. 1,2,4,8): aggregate and per-stream "
                        "decode tokens/s and time to first token, all on the base and each on a different adapter")
    p.add_argument("--no-batching", action="store_true",
                   help="with --concurrency: run the same requests one after another (no continuous batching)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_verify_argument(p)


def run(args) -> int:
    from edgepeft.bundle import Bundle
    from edgepeft.byte_sizes import format_bytes
    from edgepeft.runtime.bench import run_bench

    levels = _levels(args.concurrency) if args.concurrency is not None else None
    if args.no_batching and levels is None:
        from edgepeft.errors import InvalidArgument

        raise InvalidArgument("--no-batching needs --concurrency")
    Bundle.open(args.bundle, verify_hashes=args.verify_hashes)  # bad input fails here, before timing
    if levels is not None:
        return _concurrency(args, levels)
    r = run_bench(args.bundle, backend=args.backend, threads=args.threads, runs=args.runs,
                  new_tokens=args.new_tokens, memory=not args.no_memory, device=args.device)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    b = r["base"]
    print(f"edgepeft bench: {r['bundle']} ({r['backend']} {r['quant']}, {r['provider']}, threads {r['threads'] or 'default'}), "
          f"{r['new_tokens']} new tokens, median of {r['runs']} runs")
    print(f"{'':<12}{'file':>10}{'load':>10}{'switch med':>12}{'p95':>9}{'vs reload':>11}"
          f"{'TTFT':>9}{'prefill':>10}{'decode':>10}{'vs base':>9}")
    print(f"{'base':<12}{'':>10}{b['load_s'] * 1e3:>8.0f}ms{'':>12}{'':>9}{'':>11}"
          f"{b['ttft_ms']:>7.1f}ms{b['prefill_tokens_per_s']:>10.0f}{b['decode_tokens_per_s']:>10.1f}{'':>9}")
    for name, a in r["adapters"].items():
        print(f"{name:<12}{format_bytes(a['file_bytes']):>10}{a['load_ms']:>8.1f}ms{a['switch_ms_median']:>10.4f}ms"
              f"{a['switch_ms_p95']:>7.4f}ms{a['switch_vs_reload']:>10}x{a['ttft_ms']:>7.1f}ms"
              f"{a['prefill_tokens_per_s']:>10.0f}{a['decode_tokens_per_s']:>10.1f}"
              f"{a['decode_vs_base']:>8.2f}x")
    print(f"reload base per task instead: {b['reload_s'] * 1e3:.0f} ms each")
    if b.get("decode_bytes"):
        print(f"weights read per decoded token: {format_bytes(b['decode_bytes'])} "
              f"({b['decode_gb_per_s']:.1f} GB/s at the base's decode speed)")
    m = r.get("memory")
    if m:
        ratio = f", {m['added_per_file_byte']:.2f}x their file size" if m["added_per_file_byte"] is not None else ""
        print(f"peak RSS from the {m['peaks_from']}: 0 adapters {format_bytes(m['peak_rss_0_adapters'])}, "
              f"1 adapter {format_bytes(m['peak_rss_1_adapter'])}, all {format_bytes(m['peak_rss_all_adapters'])} "
              f"(+{format_bytes(m['added_by_all_adapters'])} for {format_bytes(m['adapter_files_bytes'])} "
              f"of adapter files{ratio}); "
              f"process peak {format_bytes(m['process_peak_rss'])}")
    return 0


def _levels(text: str) -> list[int]:
    from edgepeft.errors import InvalidArgument

    try:
        levels = [int(x) for x in text.split(",")]
    except ValueError:
        raise InvalidArgument(f"--concurrency {text!r} must be a comma-separated list of stream counts") from None
    if not levels or min(levels) < 1 or max(levels) > 64:
        raise InvalidArgument(f"--concurrency {text!r}: each stream count must be in 1..64")
    return sorted(set(levels))


def _concurrency(args, levels: list[int]) -> int:
    from edgepeft.byte_sizes import format_bytes
    from edgepeft.runtime.bench import run_concurrency

    r = run_concurrency(args.bundle, levels, backend=args.backend, threads=args.threads, runs=args.runs,
                        new_tokens=args.new_tokens, memory=not args.no_memory, device=args.device,
                        batching=not args.no_batching)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    how = "one after another" if args.no_batching else "together (continuous batching)"
    print(f"edgepeft bench: {r['bundle']} ({r['backend']} {r['quant']}, threads {r['threads'] or 'default'}), "
          f"streams run {how}, {r['new_tokens']} new tokens each, median of {r['runs']} rounds")
    print(f"{'streams':<20}{'aggregate tok/s':>16}{'vs 1':>7}{'per stream':>12}{'TTFT med':>10}{'TTFT max':>10}"
          f"{'peak RSS':>10}")
    for mode, rows in r["levels"].items():
        for c, row in rows.items():
            rss = format_bytes(row["peak_rss"]) if "peak_rss" in row else ""
            print(f"{c + ' on ' + mode:<20}{row['aggregate_tokens_per_s']:>16.1f}{row['vs_one']:>6.2f}x"
                  f"{row['per_stream_decode_tokens_per_s']:>12.1f}{row['ttft_ms_median']:>8.0f}ms"
                  f"{row['ttft_ms_max']:>8.0f}ms{rss:>10}")
    return 0
