"""The engines the benchmarks compare, each run in its own process: our runtime (through
`edgepeft bench`'s run_bench), llama-cpp-python on the same GGUF, onnxruntime-genai on its own
int4 build (with a Python that has it), and PyTorch+PEFT. Each returns a dict of figures, or
{"error": last line of the child's stderr}."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

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


def genai_build(python: str, base_dir: Path, model_dir: Path, cache: Path, threads: int,
                model_id: str | None = None, builder: list[str] | None = None) -> Path:
    """onnxruntime-genai's own int4 CPU build of `base_dir` in `model_dir` (made once), set to
    `threads` intra-op threads. `builder`: the builder command (default its module)."""
    if not (model_dir / "genai_config.json").is_file():
        cmd = builder or ["-m", "onnxruntime_genai.models.builder"]
        subprocess.run([python, *cmd, *(["-m", model_id] if model_id else []), "-i", str(base_dir), "-o",
                        str(model_dir), "-p", "int4", "-e", "cpu", "-c", str(cache)],
                       check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    cfg = json.loads((model_dir / "genai_config.json").read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    (model_dir / "genai_config.json").write_text(json.dumps(cfg, indent=2))
    return model_dir
