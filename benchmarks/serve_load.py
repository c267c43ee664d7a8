#!/usr/bin/env python3
"""A bounded load run against `edgepeft serve`, on both backends, with the official openai client.

    python benchmarks/serve_load.py [--bundle DIR] [--clients 8] [--requests 200] [--threads 2]

The bundle is the demo's (builtin:smollm2-135m, int4 ONNX + Q4_K_M GGUF, the shipped json, upper
and sentiment adapters; exported if missing). For each backend a server is started on a free
port, and:
  1. every distinct request (model x prompt) is run alone, one after the other: the reference
     output of each, and the warm-up;
  2. --warmup requests of the same mix from the same --clients finish the warm-up (GGUF makes its
     contexts, onnxruntime's arena grows to its steady size), then the server's RSS is read;
  3. --clients threads send --requests requests over the base, the three adapters and one
     combination (json+upper), chat and completions, streaming and not; about one in ten streams is
     closed after its third chunk (a client gone);
  4. the RSS is read again.
Checked: no error but the cancelled ones, every completed greedy output equal to its reference,
RSS after the run within 5% of RSS after warm-up. Reported: requests/s, aggregate tok/s, p50/p95
time to first token (streams). Writes benchmarks/results/serve_load.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODELS = ["base", "json", "upper", "sentiment", "json+upper"]


def start_server(bundle: Path, backend: str, threads: int, parallel: int, max_context: int):
    cmd = [sys.executable, "-m", "edgepeft", "serve", str(bundle), "--backend", backend, "--port", "0",
           "--threads", str(threads), "--parallel", str(parallel), "--max-context", str(max_context)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    log = []
    for line in proc.stderr:
        log.append(line)
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            threading.Thread(target=lambda: [log.append(x) for x in proc.stderr], daemon=True).start()
            return proc, m.group(1), log
    raise SystemExit("server did not start:\n" + "".join(log))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))] if v else float("nan")


def one(client, base_name: str, spec: dict, cancel_after: int | None = None) -> dict:
    """Run one request; returns text, tokens, ttft (streams), status."""
    model = base_name if spec["model"] == "base" else spec["model"]
    kw = dict(model=model, max_tokens=spec["max_tokens"], temperature=0)
    t0 = time.perf_counter()
    chat = spec["api"] == "chat"
    make = client.chat.completions.create if chat else client.completions.create
    args = {"messages": [{"role": "user", "content": spec["prompt"]}]} if chat else {"prompt": spec["prompt"]}
    if not spec["stream"]:
        r = make(**args, **kw)
        text = r.choices[0].message.content if chat else r.choices[0].text
        return {"status": "ok", "text": text, "tokens": r.usage.completion_tokens, "ttft": None,
                "latency": time.perf_counter() - t0}
    stream = make(**args, **kw, stream=True, stream_options={"include_usage": True})
    text, ttft, tokens, n = "", None, 0, 0
    for chunk in stream:
        n += 1
        if chunk.choices:
            piece = (chunk.choices[0].delta.content if chat else chunk.choices[0].text) or ""
            if piece and ttft is None:
                ttft = time.perf_counter() - t0
            text += piece
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if cancel_after is not None and n >= cancel_after:
            stream.close()
            return {"status": "cancelled", "ttft": ttft, "latency": time.perf_counter() - t0}
    return {"status": "ok", "text": text, "tokens": tokens, "ttft": ttft, "latency": time.perf_counter() - t0}


def drive(url: str, base_name: str, specs: list[dict], clients: int) -> tuple[dict[int, dict], float]:
    """Send `specs` from `clients` threads, each with its own openai client; (results, seconds)."""
    import openai

    jobs: queue.Queue = queue.Queue()
    for i, s in enumerate(specs):
        jobs.put((i, s))
    results: dict[int, dict] = {}

    def client_thread():
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        while True:
            try:
                i, s = jobs.get_nowait()
            except queue.Empty:
                return
            try:
                results[i] = one(c, base_name, s, 3 if s["cancel"] else None)
            except Exception as e:  # counted as an error below
                results[i] = {"status": "error", "error": f"{type(e).__name__}: {e}"[:300]}

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_thread) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def run_backend(bundle: Path, backend: str, args, specs: list[dict]) -> dict:
    import openai

    proc, url, log = start_server(bundle, backend, args.threads, args.clients, args.max_context)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        base_name = client.models.list().data[0].id
        distinct = {(s["model"], s["prompt"], s["api"]): s for s in specs}
        t0 = time.perf_counter()
        reference = {k: one(client, base_name, {**s, "stream": False})["text"] for k, s in distinct.items()}
        alone_s = time.perf_counter() - t0
        # Warm-up at the run's concurrency and mix, so that what a steady state holds (GGUF
        # contexts, onnxruntime's arena, the stream threads) exists before the first RSS reading.
        drive(url, base_name, specs[: args.warmup], args.clients)
        rss_warm = rss_mib(proc.pid)
        results, wall = drive(url, base_name, specs, args.clients)
        time.sleep(1.0)  # cancelled requests settle
        rss_after = rss_mib(proc.pid)
        done = [(specs[i], r) for i, r in results.items() if r["status"] == "ok"]
        mismatches = [{"model": s["model"], "api": s["api"], "stream": s["stream"], "prompt": s["prompt"][:60]}
                      for s, r in done if r["text"] != reference[(s["model"], s["prompt"], s["api"])]]
        errors = [r["error"] for r in results.values() if r["status"] == "error"]
        ttfts = [r["ttft"] for s, r in done if r["ttft"] is not None]
        tokens = sum(r["tokens"] for _, r in done)
        return {
            "backend": backend, "requests": len(specs), "completed": len(done),
            "cancelled": sum(r["status"] == "cancelled" for r in results.values()),
            "errors": errors, "mismatches": mismatches, "distinct_requests": len(distinct),
            "alone_seconds": round(alone_s, 1), "wall_seconds": round(wall, 1),
            "requests_per_s": round(len(done) / wall, 2), "aggregate_tokens_per_s": round(tokens / wall, 1),
            "completion_tokens": tokens,
            "ttft_p50_ms": round(1000 * percentile(ttfts, 0.5), 1), "ttft_p95_ms": round(1000 * percentile(ttfts, 0.95), 1),
            "rss_warm_mib": round(rss_warm, 1), "rss_after_mib": round(rss_after, 1),
            "rss_growth": round(rss_after / rss_warm - 1, 4),
        }
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=None, help="a bundle with the demo's adapters (default: the demo's)")
    ap.add_argument("--backend", default="onnx,gguf")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--prompts", type=int, default=20, help="distinct prompts per task")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-context", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=50, help="requests of the same mix sent before the RSS reading")
    args = ap.parse_args()

    from edgepeft.demo.tasks import TASKS

    if args.bundle:
        bundle = Path(args.bundle)
    else:
        from edgepeft.cache import cache_dir
        from edgepeft.demo import demo_bundle

        bundle = demo_bundle(cache_dir() / "demo" / "smollm2-135m")[0].root
    prompts = {name: [e.prompt for e in task.examples(args.prompts, held_out=True)] for name, task in TASKS.items()}
    prompts["base"], prompts["json+upper"] = prompts["upper"], prompts["json"]
    specs = []
    for i in range(args.requests):
        model = MODELS[i % len(MODELS)]
        stream = (i // len(MODELS)) % 2 == 0
        specs.append({"model": model, "prompt": prompts[model][(i // len(MODELS)) % args.prompts],
                      "api": "completions" if i % 7 == 3 else "chat", "stream": stream,
                      "cancel": stream and i % 10 == 2, "max_tokens": args.max_tokens})
    started = time.strftime("%Y-%m-%d %H:%M")
    runs = [run_backend(bundle, b, args, specs) for b in args.backend.split(",")]
    result = {"when": started, "bundle": str(bundle), "clients": args.clients, "threads": args.threads,
              "max_tokens": args.max_tokens, "runs": runs,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_load.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# `edgepeft serve` under load", "",
             f"- when: {started}; machine: {result['machine']['platform']}, {result['machine']['cpus']} CPUs",
             f"- command: `python benchmarks/serve_load.py --clients {args.clients} --requests {args.requests} "
             f"--threads {args.threads} --max-tokens {args.max_tokens} --warmup {args.warmup}`",
             f"- demo bundle (SmolLM2-135M int4 / Q4_K_M, adapters json, upper, sentiment); {args.requests} requests "
             f"from {args.clients} concurrent openai clients over base, json, upper, sentiment, json+upper; chat and "
             f"completions, streaming and not, greedy, max_tokens {args.max_tokens}; one stream in ten closed after "
             "three chunks", "",
             "| backend | completed | cancelled | errors | outputs != alone | requests/s | aggregate tok/s | "
             "TTFT p50 | TTFT p95 | RSS warm -> after |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['backend']} | {r['completed']} | {r['cancelled']} | {len(r['errors'])} | "
                     f"{len(r['mismatches'])} | {r['requests_per_s']} | {r['aggregate_tokens_per_s']} | "
                     f"{r['ttft_p50_ms']} ms | {r['ttft_p95_ms']} ms | {r['rss_warm_mib']} -> {r['rss_after_mib']} MiB "
                     f"({100 * r['rss_growth']:+.1f}%) |")
    (RESULTS / "serve_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    bad = [r for r in runs if r["errors"] or r["mismatches"] or r["rss_growth"] > 0.05]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
