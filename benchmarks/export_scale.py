#!/usr/bin/env python3
"""Export and decode at real sizes: a random bf16 base shaped like Llama-3.2-1B, Qwen3-4B, Qwen3.5-0.8B
or LFM2-350M (no download) with a random rank-16 LoRA on every linear layer of the text model, in
one sitting.

    python benchmarks/export_scale.py --shape {tiny,tiny-qwen3,llama-1b,qwen3-4b,qwen35-0.8b,lfm2-350m} [--rounds 5] [--skip-genai]
        [--work DIR] [--name NAME] [--threads N] [--genai-python PATH] [--dry-run]

1. writes the base (benchmarks/scale_models.py: one tensor group per shard, names and shapes
   checked against transformers' model on the meta device) and the LoRA; a base already in
   --work with the same config is reused;
2. times `python -m edgepeft export BASE --out BUNDLE --adapter a=LORA --format onnx,gguf` (ONNX
   int4, GGUF Q4_K_M) and onnxruntime-genai's builder (`-i BASE -p int4 -e cpu`) on the same
   checkpoint, each in its own process: wall time, peak RSS, and our export's time per step
   (from its log lines);
3. then --rounds rounds, each starting one fresh process per engine (order rotated by round):
   our ONNX and GGUF bases, each with and without the adapter, llama-cpp-python on our GGUF and
   genai's int4 build; 64 greedy tokens after the chat prompt (EOS ignored) after an 8-token
   warm-up: load time, TTFT, decode tok/s, the process's peak RSS. Medians over rounds; ratios
   are medians of per-round ratios. Weight bytes read per token (the manifest's decode_bytes;
   for genai's graph, counted the same way) give the bandwidth each speed implies.
Writes benchmarks/results/NAME.{md,json} (default export_scale-SHAPE). --dry-run writes only the
config and tensor list of the shape to --work and checks them against transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import scale_models  # noqa: E402
import scale_report  # noqa: E402
from compare_engines import PROMPT, RESULTS  # noqa: E402
from peak_rss import run_tree  # noqa: E402

WARMUP_TOKENS = 8
STEP_LINE = re.compile(r"^edgepeft: \[\d+/\d+\] (.+): ([0-9.]+) s \(elapsed [0-9:]+\)$")
BEGUN = time.perf_counter()


def say(msg: str) -> None:
    m, s = divmod(int(time.perf_counter() - BEGUN), 60)
    print(f"[{m:3d}:{s:02d}] {msg}", flush=True)


def export_ours(base: Path, lora: Path, bundle: Path) -> dict:
    shutil.rmtree(bundle, ignore_errors=True)
    cmd = [sys.executable, "-m", "edgepeft", "export", str(base), "--out", str(bundle), "--adapter", f"a={lora}",
           "--format", "onnx,gguf"]
    r = run_tree(cmd, echo=lambda line: line.startswith("edgepeft: "))  # its steps and heartbeats
    if r["rc"]:
        raise SystemExit("export_scale.py: our export failed:\n" + "\n".join(r["output"][-20:]))
    r["steps"] = {m.group(1): float(m.group(2)) for m in map(STEP_LINE.match, r.pop("output")) if m}
    return r


def build_genai(python: str, base: Path, out: Path, cache: Path, threads: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    r = run_tree([python, "-m", "onnxruntime_genai.models.builder", "-i", str(base), "-o", str(out),
                  "-p", "int4", "-e", "cpu", "-c", str(cache)])
    if r["rc"] or not (out / "genai_config.json").is_file():
        return {**r, "error": (r.pop("output")[-1:] or ["failed"])[0][:300]}
    r.pop("output")
    cfg = json.loads((out / "genai_config.json").read_text())  # the same thread count as the others
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    (out / "genai_config.json").write_text(json.dumps(cfg, indent=2))
    return r


# Child programs, one engine per process; each prints one JSON line. The first generation
# (WARMUP_TOKENS) warms caches; the second is measured.
OURS = """
import json, time
from edgepeft.runtime import Engine
msgs = [{{"role": "user", "content": {prompt!r}}}] if {chat} else {prompt!r}
t = time.perf_counter()
e = Engine.open({bundle!r}, backend={backend!r}, threads={threads}, load_adapters={adapter!r} is not None)
load = time.perf_counter() - t
e.complete(msgs, adapter={adapter!r}, max_new_tokens={warm}, ignore_eos=True, chat={chat})
c = e.complete(msgs, adapter={adapter!r}, max_new_tokens={n}, ignore_eos=True, chat={chat})
print(json.dumps({{"load_s": load, "ttft_ms": c.timings.prefill_s * 1e3, "tokens": len(c.tokens),
                  "decode_tokens_per_s": c.timings.decode_tokens_per_s}}))
"""

LLAMA = """
import json, time
import llama_cpp
from llama_cpp import Llama
from edgepeft.native_check import skip_amx_buffers
skip_amx_buffers(llama_cpp)  # as our GGUF backend does on a CPU whose AMX kernels crash
from edgepeft.bundle import Bundle
from edgepeft.runtime.tokenizer import Tokenizer
b = Bundle.open({bundle!r})
gguf = b.backends["gguf"]
tok = Tokenizer(b.root, b.manifest["tokenizer"])
ids = tok.apply_chat_template([{{"role": "user", "content": {prompt!r}}}]) if {chat} else tok.encode({prompt!r})
t = time.perf_counter()
llm = Llama(model_path=str(b.file(gguf["model"])), n_ctx=min(int(gguf["context_length"]), 4096),
            n_threads={threads}, n_threads_batch={threads}, verbose=False)
load = time.perf_counter() - t
def run(n):
    llm.reset()
    t0, count = time.perf_counter(), 0
    for _ in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        count += 1
        if count == 1:
            t1 = time.perf_counter()
        if count == n:
            break
    return (t1 - t0) * 1e3, (n - 1) / (time.perf_counter() - t1), count
run({warm})
ttft, rate, count = run({n})
print(json.dumps({{"load_s": load, "ttft_ms": ttft, "decode_tokens_per_s": rate, "tokens": count}}))
"""

GENAI = """
import json, time
import onnxruntime_genai as og
t = time.perf_counter()
model = og.Model({model!r})
load = time.perf_counter() - t
tok = og.Tokenizer(model)
ids = tok.encode(tok.apply_chat_template(json.dumps([{{"role": "user", "content": {prompt!r}}}]),
                                         add_generation_prompt=True) if {chat} else {prompt!r})
def run(n):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(ids)
    gen.generate_next_token()
    t1, count = time.perf_counter(), 1
    while not gen.is_done() and count < n:
        gen.generate_next_token()
        count += 1
    return (t1 - t0) * 1e3, (count - 1) / (time.perf_counter() - t1), count
run({warm})
ttft, rate, count = run({n})
print(json.dumps({{"load_s": load, "ttft_ms": ttft, "decode_tokens_per_s": rate, "tokens": count,
                  "version": og.__version__}}))
"""


def run_engine(python: str, code: str, n: int) -> dict:
    """One engine's child process: its JSON line and its peak RSS."""
    r = run_tree([python, "-c", textwrap.dedent(code)])
    try:
        got = {**json.loads(r["output"][-1]), "peak_rss": r["peak_rss"]}
    except (IndexError, ValueError):
        return {"error": (r["output"][-1:] or ["failed"])[0][:300]}
    return got if got["tokens"] == n else {"error": f"generated {got['tokens']} tokens, not {n}"}


def engines(bundle, genai_dir: Path | None, genai_python: str, threads: int, n: int) -> dict:
    """{label: (python, child code, n)} for every engine of the decode rounds."""
    common = {"prompt": PROMPT, "threads": threads, "warm": WARMUP_TOKENS, "n": n, "chat": True}
    onnx_q, gguf_q = bundle.backends["onnx"]["quant"], bundle.backends["gguf"]["quant"]
    out = {}
    for backend, quant in (("onnx", onnx_q), ("gguf", gguf_q)):
        for adapter in (None, "a"):
            label = f"edgepeft {backend} {quant}" + (" + adapter" if adapter else "")
            out[label] = (sys.executable, OURS.format(bundle=str(bundle.root), backend=backend, adapter=adapter,
                                                      **common), n)
    out[f"llama-cpp-python {gguf_q} (our GGUF)"] = (sys.executable, LLAMA.format(bundle=str(bundle.root), **common), n)
    if genai_dir is not None:
        out["onnxruntime-genai int4"] = (genai_python, GENAI.format(model=str(genai_dir), **common), n)
    return out


def decode_rounds(runners: dict, rounds: int) -> list[dict]:
    names, out = list(runners), []
    for r in range(rounds):
        row = {}
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
            row[name] = run_engine(*runners[name])
            got = row[name]
            say(f"round {r + 1}/{rounds}: {name}: " + (f"{got['decode_tokens_per_s']:.1f} tok/s, load "
                f"{got['load_s']:.2f} s, peak RSS {got['peak_rss'] / 2**30:.2f} GiB" if "error" not in got
                else f"failed: {got['error']}"))
        out.append(row)
    return out


def _ratio(rounds: list[dict], a: str, b: str) -> float | None:
    pairs = [(r[a]["decode_tokens_per_s"], r[b]["decode_tokens_per_s"]) for r in rounds
             if "error" not in r.get(a, {"error": 1}) and "error" not in r.get(b, {"error": 1})]
    return round(statistics.median(x / y for x, y in pairs), 3) if pairs else None


def summarize(rounds: list[dict], sizes: dict) -> dict:
    """Per engine: medians over rounds, the bandwidth its median speed implies, and its ratios."""
    names = list(rounds[0])
    refs = [n for n in names if n.startswith(("llama-cpp-python", "onnxruntime-genai"))]
    out = {}
    for name in names:
        ok = [r[name] for r in rounds if "error" not in r[name]]
        if not ok:
            out[name] = {"error": next(r[name]["error"] for r in rounds)}
            continue
        med = {k: round(statistics.median(x[k] for x in ok), 3) for k in ("decode_tokens_per_s", "ttft_ms", "load_s")}
        row = {**med, "peak_rss_median": statistics.median(x["peak_rss"] for x in ok),
               "peak_rss_max": max(x["peak_rss"] for x in ok), "rounds_ok": len(ok), **sizes.get(name, {})}
        if row.get("decode_bytes"):
            row["implied_gb_per_s"] = round(row["decode_bytes"] * med["decode_tokens_per_s"] / 1e9, 2)
        row["vs"] = {ref: _ratio(rounds, name, ref) for ref in refs if ref != name}
        if name.endswith(" + adapter"):
            row["vs"]["its base"] = _ratio(rounds, name, name[: -len(" + adapter")])
        out[name] = row
    return out


def file_sizes(bundle, genai_dir: Path | None) -> dict:
    """Per engine: the model files' bytes and the weight bytes one decoded token reads."""
    files = bundle.manifest["files"]
    onnx = sum(e["size"] for rel, e in files.items() if rel.startswith("onnx/"))
    gguf_rel = bundle.backends["gguf"]["model"]
    out = {}
    for label in ("onnx", "gguf"):
        base = {"file_bytes": onnx if label == "onnx" else files[gguf_rel]["size"],
                "decode_bytes": bundle.backends[label].get("decode_bytes")}
        adapter = files[bundle.adapters["a"]["files"][label]]["size"]
        quant = bundle.backends[label]["quant"]
        out[f"edgepeft {label} {quant}"] = base
        out[f"edgepeft {label} {quant} + adapter"] = {**base, "adapter_bytes": adapter}
    gguf_q = bundle.backends["gguf"]["quant"]
    out[f"llama-cpp-python {gguf_q} (our GGUF)"] = out[f"edgepeft gguf {gguf_q}"]
    if genai_dir is not None:
        import onnx

        from edgepeft.exporters.decode_bytes import onnx_decode_bytes

        proto = onnx.load(str(genai_dir / "model.onnx"), load_external_data=False)  # dims only
        out["onnxruntime-genai int4"] = {"file_bytes": sum(f.stat().st_size for f in genai_dir.glob("model.onnx*")),
                                         "decode_bytes": onnx_decode_bytes(proto)}
    return out


def prepare_base(shape: str, base: Path, lora: Path) -> dict:
    """Write the base (or reuse one with the same config and all its shards) and the LoRA."""
    cfg = scale_models.config(shape)
    index = base / "model.safetensors.index.json"
    reuse = (index.is_file() and (base / "config.json").is_file() and (base / "tokenizer.json").is_file()
             and json.loads((base / "config.json").read_text()) == cfg
             and all((base / f).is_file() for f in set(json.loads(index.read_text())["weight_map"].values())))
    t = time.perf_counter()
    if not reuse:
        shutil.rmtree(base, ignore_errors=True)
        say(f"writing a random bf16 {shape} base to {base}")
        scale_models.write_base(shape, base)
    problems = scale_models.check_base(base)
    if problems:
        raise SystemExit(f"export_scale.py: {base}: tensors differ from transformers' model: {problems[:5]}")
    shutil.rmtree(lora, ignore_errors=True)
    adapter_bytes = scale_models.write_lora(base, lora)
    weights = json.loads(index.read_text())["metadata"]["total_size"]
    targets = json.loads((lora / "adapter_config.json").read_text())["target_modules"]
    say(f"base {'reused' if reuse else 'written'} ({weights / 2**30:.2f} GiB bf16, names and shapes match "
        f"transformers) and rank-16 LoRA written ({adapter_bytes / 2**20:.1f} MiB): {time.perf_counter() - t:.1f} s")
    return {"reused": reuse, "weight_bytes": weights, "adapter_bytes": adapter_bytes, "targets": sorted(targets)}


def dry_run(shape: str, work: Path) -> int:
    out = work / f"{shape}-dry-run"
    shutil.rmtree(out, ignore_errors=True)
    size = scale_models.write_base(shape, out, dry_run=True)
    problems = scale_models.check_base(out)
    n = len(scale_models.written_shapes(out))
    say(f"{shape}: config.json and tensors.json in {out}: {n} tensors, {size / 2**30:.2f} GiB bf16; against "
        f"transformers' model from that config: " + ("identical names and shapes" if not problems else
                                                      "; ".join(problems[:10])))
    return 1 if problems else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=scale_models.SHAPES, required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip-genai", action="store_true", help="no onnxruntime-genai build or decode")
    ap.add_argument("--genai-python", default=os.environ.get("GENAI_PYTHON", sys.executable),
                    help="a Python with onnxruntime-genai installed (default: this one, or $GENAI_PYTHON)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/export_scale"))
    ap.add_argument("--name", help="results file name in benchmarks/results (default export_scale-SHAPE)")
    ap.add_argument("--dry-run", action="store_true", help="write only config.json and the tensor list, and check them")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.new_tokens < 2 or args.threads < 1:
        ap.error("--rounds and --threads must be at least 1, --new-tokens at least 2")
    if args.dry_run:
        return dry_run(args.shape, args.work)
    from edgepeft.bundle import Bundle

    work = args.work / args.shape
    base, lora, bundle_dir, genai_dir = work / "base", work / "lora", work / "bundle", work / "genai-int4"
    started = time.strftime("%Y-%m-%d %H:%M")
    load_start = [round(x, 2) for x in os.getloadavg()]
    made = prepare_base(args.shape, base, lora)
    say("our export: ONNX int4 + GGUF Q4_K_M + the adapter")
    exports = {"edgepeft": export_ours(base, lora, bundle_dir)}
    ours = exports["edgepeft"]
    say(f"our export: {ours['wall_s']:.1f} s, peak RSS {ours['peak_rss'] / 2**30:.2f} GiB")
    if not args.skip_genai:
        say("onnxruntime-genai's builder: int4, CPU")
        exports["onnxruntime-genai"] = g = build_genai(args.genai_python, base, genai_dir, work / "genai-cache",
                                                       args.threads)
        say(f"genai builder: {g['wall_s']:.1f} s, peak RSS {g['peak_rss'] / 2**30:.2f} GiB"
            + (f"; failed: {g['error']}" if "error" in g else ""))
    genai = genai_dir if not args.skip_genai and "error" not in exports["onnxruntime-genai"] else None
    bundle = Bundle.open(bundle_dir)
    exports["edgepeft"]["output_bytes"] = sum(e["size"] for e in bundle.manifest["files"].values())
    if genai is not None:
        exports["onnxruntime-genai"]["output_bytes"] = sum(f.stat().st_size for f in genai.rglob("*") if f.is_file())
    rounds = decode_rounds(engines(bundle, genai, args.genai_python, args.threads, args.new_tokens), args.rounds)
    summary = summarize(rounds, file_sizes(bundle, genai))
    genai_version = next((r[k]["version"] for r in rounds for k in r if "version" in r[k]), None)
    results = {"shape": args.shape, "config": scale_models.config(args.shape), "when": started, "base": made,
               "argv": sys.argv[1:], "threads": args.threads, "new_tokens": args.new_tokens, "rounds": rounds,
               "exports": exports, "summary": summary,
               "machine": {**scale_report.machine(), "load_average": load_start},
               "versions": scale_report.versions(genai_version),
               "load_average_end": [round(x, 2) for x in os.getloadavg()]}
    name = args.name or f"export_scale-{args.shape}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    text = scale_report.markdown(results, args)
    (RESULTS / f"{name}.md").write_text(text)
    print(text)
    say(f"wrote {RESULTS / name}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
