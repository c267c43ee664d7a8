#!/usr/bin/env python3
"""Our runtime against the engines a user would otherwise pick, in one sitting, on the demo model.

    python benchmarks/compare_engines.py [--genai-python PATH] [--threads 2] [--new-tokens 128]

Each engine runs in its own process, one after the other, with the same prompt, the same number
of threads and exactly --new-tokens greedy tokens (EOS ignored):
  edgepeft onnx   int4 ONNX bundle (builtin:smollm2-135m + shipped adapters; qkv, down_proj
                  and lm_head at 8 bits), int4-pure (every MatMul at 4 bits, like genai's int4),
                  and int4-pure with --slots none (no adapter slots, as a --merge export has)
  edgepeft gguf   Q4_K_M GGUF from the same bundle
  llama-cpp-python  the same GGUF files through llama_cpp.Llama (adapter = reload with lora_path)
  onnxruntime-genai its own int4 build of the same base (python -m onnxruntime_genai.models.builder),
                  run with a Python that has onnxruntime-genai (--genai-python; its builder needs a
                  newer transformers than our exporter, so it lives in its own venv)
  pytorch+peft    fp32 eager transformers + PEFT (adapter switch = PeftModel.set_adapter)
After the speed runs, each quantized build's base model is scored against PyTorch fp32 on
`edgepeft verify`'s prompts (KL, top-1), so speed is read next to what the quantization costs.
Writes benchmarks/results/{README.md,results.json,speed.png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from edgepeft.byte_sizes import format_bytes

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PROMPT = "Write a short story about a robot who learns to paint, in three paragraphs."


def run_child(code: str, python: str = sys.executable) -> dict:
    out = subprocess.run([python, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def ours(bundle: Path, backend: str, threads: int, runs: int, n: int) -> dict:
    return run_child(f"""
        import json
        from edgepeft.runtime.bench import run_bench
        r = run_bench({str(bundle)!r}, backend={backend!r}, threads={threads}, runs={runs}, new_tokens={n})
        print(json.dumps(r))
    """)


def llama_cpp_direct(bundle: Path, threads: int, runs: int, n: int) -> dict:
    return run_child(f"""
        import json, statistics, time
        from llama_cpp import Llama
        from edgepeft.bundle import Bundle
        from edgepeft.runtime.tokenizer import Tokenizer
        b = Bundle.open({str(bundle)!r})
        model = str(b.file(b.backends["gguf"]["model"]))
        tok = Tokenizer(b.root, b.manifest["tokenizer"])
        ids = tok.apply_chat_template([{{"role": "user", "content": {PROMPT!r}}}])

        def decode(llm):
            rates, ttft = [], []
            for _ in range({runs} + 1):
                llm.reset()
                t0 = time.perf_counter(); count = 0
                for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
                    count += 1
                    if count == 1:
                        t1 = time.perf_counter()
                    if count == {n}:
                        break
                t2 = time.perf_counter()
                rates.append(({n} - 1) / (t2 - t1)); ttft.append(t1 - t0)
            return statistics.median(rates[1:]), statistics.median(ttft[1:]) * 1e3

        t = time.perf_counter()
        llm = Llama(model_path=model, n_ctx=4096, n_threads={threads}, n_threads_batch={threads}, verbose=False)
        load = time.perf_counter() - t
        base_rate, base_ttft = decode(llm)
        res = {{"load_s": load, "decode_tokens_per_s": base_rate, "ttft_ms": base_ttft, "adapters": {{}}}}
        for name in b.adapters:
            del llm
            t = time.perf_counter()
            llm = Llama(model_path=model, lora_path=str(b.adapter_path(name, "gguf")), n_ctx=4096,
                        n_threads={threads}, n_threads_batch={threads}, verbose=False)
            reload = time.perf_counter() - t
            rate, _ = decode(llm)
            res["adapters"][name] = {{"switch_ms": reload * 1e3, "decode_tokens_per_s": rate, "switch_is": "reload with lora_path"}}
        print(json.dumps(res))
    """)


def genai(python: str, model_dir: Path, threads: int, runs: int, n: int) -> dict:
    return run_child(f"""
        import json, statistics, time
        import onnxruntime_genai as og
        t = time.perf_counter()
        model = og.Model({str(model_dir)!r})
        load = time.perf_counter() - t
        tok = og.Tokenizer(model)
        ids = tok.encode(tok.apply_chat_template(json.dumps([{{"role": "user", "content": {PROMPT!r}}}]),
                                                 add_generation_prompt=True))
        # genai's sliding-window layers (Gemma) need a KV buffer of at least the window: a longer
        # max_length there, and the loop stops at exactly {n} tokens.
        cfg = json.load(open({str(model_dir / "genai_config.json")!r}))
        window = (cfg["model"]["decoder"].get("sliding_window") or {{}}).get("window_size", 0)
        rates, ttft = [], []
        for _ in range({runs} + 1):
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=max(len(ids) + {n}, window), min_length=len(ids) + {n},
                                      do_sample=False)
            gen = og.Generator(model, params)
            t0 = time.perf_counter()
            gen.append_tokens(ids)
            gen.generate_next_token()
            t1 = time.perf_counter(); count = 1
            while not gen.is_done() and count < {n}:
                gen.generate_next_token(); count += 1
            t2 = time.perf_counter()
            rates.append((count - 1) / (t2 - t1)); ttft.append(t1 - t0)
        print(json.dumps({{"load_s": load, "decode_tokens_per_s": statistics.median(rates[1:]),
                          "ttft_ms": statistics.median(ttft[1:]) * 1e3, "version": og.__version__}}))
    """, python)


def pytorch(base_dir: Path, adapters: dict, threads: int, runs: int, n: int) -> dict:
    return run_child(f"""
        import json, statistics, time, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from peft import PeftModel
        torch.set_num_threads({threads})
        tok = AutoTokenizer.from_pretrained({str(base_dir)!r})
        ids = torch.tensor([tok.apply_chat_template([{{"role": "user", "content": {PROMPT!r}}}], add_generation_prompt=True)])
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained({str(base_dir)!r}, dtype=torch.float32).eval()
        load = time.perf_counter() - t
        adapters = {json.dumps({k: str(v) for k, v in adapters.items()})}
        first = next(iter(adapters))
        model = PeftModel.from_pretrained(model, adapters[first], adapter_name=first)
        for name, path in adapters.items():
            if name != first:
                model.load_adapter(path, adapter_name=name)

        def rate():
            rs = []
            for _ in range({runs}):
                with torch.no_grad():
                    t0 = time.perf_counter()
                    model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
                    t1 = time.perf_counter()
                    model.generate(ids, max_new_tokens={n}, min_new_tokens={n}, do_sample=False)
                    t2 = time.perf_counter()
                rs.append(({n} - 1) / ((t2 - t1) - (t1 - t0)))
            return statistics.median(rs)

        with model.disable_adapter():
            base = rate()
        res = {{"load_s": load, "decode_tokens_per_s": base, "adapters": {{}}}}
        for name in adapters:
            sw = []
            for _ in range(50):
                model.set_adapter(first if name != first else list(adapters)[-1])
                t = time.perf_counter(); model.set_adapter(name); sw.append(time.perf_counter() - t)
            res["adapters"][name] = {{"switch_ms": statistics.median(sw) * 1e3, "decode_tokens_per_s": rate(),
                                     "switch_is": "PeftModel.set_adapter"}}
        import peft, transformers
        res["versions"] = {{"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}}
        print(json.dumps(res))
    """)


def r16_all_adapter(base_dir: Path, out: Path) -> Path:
    """A rank-16 LoRA on all seven projections with random non-zero B: for speed only (issue 5's
    'rank-16 adapter on all seven linear projections' case)."""
    if (out / "adapter_model.safetensors").is_file():
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


def bench_bundle(work: Path, base_dir: Path, adapters: dict[str, Path], onnx_quant: str, formats: str,
                 slots: str | None = None):
    """The demo bundle's content plus the rank-16 all-projection adapter, at `onnx_quant`; with
    slots="none", the base alone without adapter slots (what --merge exports). Reused when it
    exists with the same adapters, precision and graph layout."""
    from edgepeft.bundle import Bundle
    from edgepeft.cli.demo import BASE, QUANTS
    from edgepeft.errors import EdgepeftError
    from edgepeft.exporters import export_bundle
    from edgepeft.exporters.onnx_export import onnx_export_current

    adapters = {} if slots == "none" else {**adapters, "r16-all7": r16_all_adapter(base_dir, work / "r16-all7")}
    out = work / f"smollm2-135m-bench-{onnx_quant}{'-noslots' if slots == 'none' else ''}"
    try:
        b = Bundle.open(out)
        onnx = b.backends.get("onnx", {})
        if set(b.adapters) == set(adapters) and onnx.get("quant") == onnx_quant and onnx_export_current(onnx):
            return b
    except EdgepeftError:
        pass
    return export_bundle(BASE, out, {n: str(p) for n, p in adapters.items()}, formats=formats,
                         onnx_quant=onnx_quant, gguf_quant=QUANTS["gguf"], quiet=True, slots=slots)


def onnx_size(bundle) -> str:
    """The ONNX base's files (graph and external data) of `bundle`, in MiB."""
    total = sum(bundle.file(r).stat().st_size for r in bundle.manifest["files"] if r.startswith("onnx/"))
    return format_bytes(total, "MiB", 0)


def quality(base_dir: Path, bundles: dict, genai_dir: Path | None) -> dict:
    """Base-model logits against PyTorch fp32 as `edgepeft verify` scores them (its prompts, each
    followed by PyTorch's greedy answer; mean KL, top-1 agreement), so that each engine's speed
    is read next to what its quantization costs.
    onnxruntime-genai's model runs through plain onnxruntime here (its graph uses only
    onnxruntime operators), with an empty KV cache, as verify scores ours."""
    import numpy as np
    import onnxruntime as ort
    import torch
    import transformers

    from edgepeft.exporters.verify import PROMPTS, agreement, reference_sequences, shared_prefix
    from edgepeft.runtime import Engine

    engines = {name: Engine.open(root, backend=backend, threads=2) for name, (root, backend) in bundles.items()}
    tok = next(iter(engines.values())).tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    seqs, refs = reference_sequences(model, prompts, tok.stop_ids(chat=True))
    shared = shared_prefix(seqs)
    scorers = {name: engine.score for name, engine in engines.items()}
    if genai_dir is not None:
        session = ort.InferenceSession(str(genai_dir / "model.onnx"), providers=["CPUExecutionProvider"])
        past = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]
        decoder = json.loads((genai_dir / "genai_config.json").read_text())["model"]["decoder"]
        empty = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), np.float32)

        def genai_score(ids):
            feed = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
            feed.update({name: empty for name in past})
            return session.run(["logits"], feed)[0][0]

        scorers["onnxruntime-genai int4"] = genai_score
    out = {}
    for name, score in scorers.items():
        a = agreement(refs, [score(seq) for seq in seqs], shared)
        out[name] = {"kl": round(a["kl"], 3), "top1": round(a["top1"], 3)}
    return out


def versions(results: dict) -> str:
    e = results["engines"]
    m = e.get("edgepeft onnx int4", {}).get("machine", {})
    out = {"edgepeft": m.get("edgepeft"), "onnxruntime": m.get("onnxruntime"), "llama-cpp-python": m.get("llama_cpp"),
           "onnxruntime-genai": e.get("onnxruntime-genai int4", {}).get("version"),
           **e.get("pytorch+peft fp32", {}).get("versions", {})}
    return ", ".join(f"{k} {v}" for k, v in out.items() if v)


def table(results: dict) -> list[str]:
    rows = ["| engine | model file | decode tok/s, base | decode tok/s, with adapter (median over adapters) | adapter switch, median | TTFT, base | base vs PyTorch: KL / top-1 |",
            "|---|---|---|---|---|---|---|"]
    for name, r in results["engines"].items():
        if "error" in r:
            rows.append(f"| {name} | | failed: {r['error']} | | | | |")
            continue
        base = r.get("base", r)
        ads = r.get("adapters", {})
        ad_rates = sorted(a["decode_tokens_per_s"] for a in ads.values())
        ad_rate = f"{ad_rates[len(ad_rates) // 2]:.1f}" if ad_rates else r.get("no_adapters", "n/a (no adapter API)")
        sw = sorted(a.get("switch_ms_median", a.get("switch_ms")) for a in ads.values())
        switch = f"{sw[len(sw) // 2]:.4f} ms" if sw else "n/a"
        if ads and "switch_is" in next(iter(ads.values())):
            switch += f" ({next(iter(ads.values()))['switch_is']})"
        ttft = f"{base['ttft_ms']:.1f} ms" if base.get("ttft_ms") is not None else ""
        q = r.get("quality")
        fidelity = f"{q['kl']:.3f} / {q['top1']:.0%}" if q else ("reference" if name.startswith("pytorch") else "")
        rows.append(f"| {name} | {r.get('file', '')} | {base['decode_tokens_per_s']:.1f} | {ad_rate} | {switch} | {ttft} | {fidelity} |")
    return rows


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, base, adapted, switch = [], [], [], []
    for name, r in results["engines"].items():
        if "error" in r:
            continue
        names.append(name)
        base.append(r.get("base", r)["decode_tokens_per_s"])
        ads = r.get("adapters", {})
        rates = sorted(a["decode_tokens_per_s"] for a in ads.values())
        adapted.append(rates[len(rates) // 2] if rates else 0)
        sws = sorted(a.get("switch_ms_median", a.get("switch_ms")) for a in ads.values())
        switch.append(sws[len(sws) // 2] if sws else float("nan"))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(names))
    a1.bar([i - 0.2 for i in x], base, 0.4, label="base")
    a1.bar([i + 0.2 for i in x], adapted, 0.4, label="with adapter")
    a1.set_xticks(list(x), names, rotation=20, ha="right")
    a1.set_ylabel("decode tokens/s (higher is better)")
    a1.legend()
    a1.set_title(f"SmolLM2-135M, {results['new_tokens']} greedy tokens, {results['threads']} threads")
    a2.bar(list(x), switch)
    a2.set_yscale("log")
    a2.set_xticks(list(x), names, rotation=20, ha="right")
    a2.set_ylabel("adapter switch, ms (log; lower is better)")
    a2.set_title("switching task adapters")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--genai-python", default=os.environ.get("GENAI_PYTHON"),
                    help="python with onnxruntime-genai (and its builder) installed")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "edgepeft" / "bench"))
    args = ap.parse_args()

    from edgepeft.exporters.builtin import materialize
    from edgepeft.shipped import shipped_adapters

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    adapters = shipped_adapters()
    base_dir = materialize("builtin:smollm2-135m")
    bundle = bench_bundle(work, base_dir, adapters, "int4", "onnx,gguf")
    pure = bench_bundle(work, base_dir, adapters, "int4-pure", "onnx")
    noslots = bench_bundle(work, base_dir, adapters, "int4-pure", "onnx", slots="none")
    adapters = {n: Path(a["source"]) for n, a in bundle.adapters.items()}
    size = lambda rel: format_bytes(bundle.file(rel).stat().st_size, "MiB", 0)  # noqa: E731
    results = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "threads": args.threads,
               "new_tokens": args.new_tokens, "runs": args.runs, "prompt": PROMPT,
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
               "engines": {}}
    started = time.strftime("%Y-%m-%d %H:%M")
    e = results["engines"]
    e["edgepeft onnx int4"] = {**ours(bundle.root, "onnx", args.threads, args.runs, args.new_tokens),
                               "file": onnx_size(bundle)}
    e["edgepeft onnx int4-pure"] = {**ours(pure.root, "onnx", args.threads, args.runs, args.new_tokens),
                                    "file": onnx_size(pure)}
    e["edgepeft onnx int4-pure, --slots none"] = {
        **ours(noslots.root, "onnx", args.threads, args.runs, args.new_tokens),
        "file": onnx_size(noslots), "no_adapters": "n/a (no slots: merged-only base)"}
    e["edgepeft gguf Q4_K_M"] = {**ours(bundle.root, "gguf", args.threads, args.runs, args.new_tokens),
                                 "file": size(bundle.backends["gguf"]["model"])}
    e["llama-cpp-python Q4_K_M"] = {**llama_cpp_direct(bundle.root, args.threads, args.runs, args.new_tokens),
                                    "file": size(bundle.backends["gguf"]["model"])}
    if args.genai_python:
        model_dir = work / "genai-int4"
        if not (model_dir / "genai_config.json").is_file():
            subprocess.run([args.genai_python, "-m", "onnxruntime_genai.models.builder", "-m",
                            "HuggingFaceTB/SmolLM2-135M-Instruct", "-i", str(base_dir), "-o", str(model_dir),
                            "-p", "int4", "-e", "cpu", "-c", str(work / "genai-cache")],
                           check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        cfg = json.loads((model_dir / "genai_config.json").read_text())
        cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = args.threads
        (model_dir / "genai_config.json").write_text(json.dumps(cfg, indent=2))
        e["onnxruntime-genai int4"] = {**genai(args.genai_python, model_dir, args.threads, args.runs, args.new_tokens),
                                       "file": format_bytes((model_dir / "model.onnx.data").stat().st_size, "MiB", 0)}
    else:
        e["onnxruntime-genai int4"] = {"error": "not run: pass --genai-python"}
    e["pytorch+peft fp32"] = {**pytorch(base_dir, adapters, args.threads, args.runs, args.new_tokens), "file": ""}
    # After every speed run, so that it cannot disturb them.
    scored = quality(base_dir, {"edgepeft onnx int4": (bundle.root, "onnx"), "edgepeft onnx int4-pure": (pure.root, "onnx"),
                                "edgepeft onnx int4-pure, --slots none": (noslots.root, "onnx"),
                                "edgepeft gguf Q4_K_M": (bundle.root, "gguf")},
                     model_dir if args.genai_python else None)
    scored["llama-cpp-python Q4_K_M"] = scored["edgepeft gguf Q4_K_M"]  # the same file through the same llama.cpp
    for name, q in scored.items():
        if name in e and "error" not in e[name]:
            e[name]["quality"] = q

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# Engine comparison: SmolLM2-135M-Instruct with the demo adapters", "",
             "Adapters: the three shipped demo adapters, and `r16-all7`, a random rank-16 LoRA on all seven "
             "projections (for speed only).", "",
             f"- when: {started}; machine: {results['machine']['platform']}, {results['machine']['cpus']} CPUs",
             f"- command: `python benchmarks/compare_engines.py --threads {args.threads} --runs {args.runs} "
             f"--new-tokens {args.new_tokens}{' --genai-python GENAI_VENV/bin/python' if args.genai_python else ''}`",
             f"- versions: {versions(results)}",
             f"- each engine in its own process, one after the other; {args.new_tokens} greedy tokens (EOS ignored), "
             f"{args.threads} threads, median of {args.runs} runs after a warm-up", ""]
    lines += table(results)
    ours_onnx = e["edgepeft onnx int4"]
    if "error" not in ours_onnx:
        lines += ["", "edgepeft's own figures (from `edgepeft bench`) for each adapter:", ""]
        for eng in ("edgepeft onnx int4", "edgepeft onnx int4-pure", "edgepeft gguf Q4_K_M"):
            r = e[eng]
            if "error" in r:
                continue
            for name, a in r["adapters"].items():
                paired = f" ({a['decode_vs_base']}x the base, runs paired)" if "decode_vs_base" in a else ""
                lines.append(f"- {eng}, {name}: decode {a['decode_tokens_per_s']} tok/s{paired}, switch median "
                             f"{a['switch_ms_median']} ms / p95 {a['switch_ms_p95']} ms, {a['switch_vs_reload']}x "
                             f"faster than reloading the base ({r['base']['reload_s']} s)")
            m = r.get("memory")
            if m:
                lines.append(f"- {eng} peak RSS from the {m.get('peaks_from', 'process start')}: "
                             f"{format_bytes(m['peak_rss_0_adapters'], 'MiB', 0)} (0 adapters), "
                             f"{format_bytes(m['peak_rss_1_adapter'], 'MiB', 0)} (1), "
                             f"{format_bytes(m['peak_rss_all_adapters'], 'MiB', 0)} "
                             f"(all); adapters add {m['added_per_file_byte']}x their file size")
    (RESULTS / "README.md").write_text("\n".join(lines) + "\n")
    try:
        plot(results, RESULTS / "speed.png")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
