"""The whole job on the embedded default model: export builtin:smollm2-135m (int4) with the
shipped task adapters into a bundle (reused when present), open it once, run the same prompts
with no adapter and with each adapter, and report switch time, speed, memory and task accuracy
on the exported model next to PyTorch's."""

from __future__ import annotations

import argparse
import statistics
import textwrap
import time
from pathlib import Path

BASE = "builtin:smollm2-135m"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, metavar="DIR",
                   help="bundle directory (default: $EDGEPEFT_CACHE/demo/smollm2-135m-int4)")
    p.add_argument("--backend", default="onnx", choices=["onnx"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--held-out", type=int, default=40, metavar="N",
                   help="held-out prompts per task for the accuracy table (default 40, as in training)")
    p.add_argument("--quiet", action="store_true", help="no progress bar while exporting")


def _bundle(out: Path, adapters: dict[str, Path], quiet: bool):
    """Reuse `out` if it holds the builtin base with exactly the shipped adapters, else export."""
    from edgepeft.bundle import Bundle
    from edgepeft.errors import EdgepeftError
    from edgepeft.files import sha256_file

    want = {n: sha256_file(p / "adapter_model.safetensors") for n, p in adapters.items()}
    try:
        b = Bundle.open(out)
        if b.base["source"] == BASE and {n: a["source_hash"] for n, a in b.adapters.items()} == want \
                and b.backends.get("onnx", {}).get("quant") == "int4":
            return b, None
    except EdgepeftError:
        pass
    from edgepeft.exporters import export_bundle

    t0 = time.perf_counter()
    b = export_bundle(BASE, out, {n: str(p) for n, p in adapters.items()}, onnx_quant="int4", quiet=quiet)
    return b, time.perf_counter() - t0


def _cell(text: str, width: int) -> list[str]:
    return textwrap.wrap(" ".join(text.split()), width) or [""]


def _mb(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def run(args) -> int:
    from edgepeft.cache import cache_dir
    from edgepeft.runtime import Engine
    from edgepeft.runtime.memory import peak_rss_bytes, rss_bytes
    from edgepeft.shipped import shipped_adapters, shipped_metrics
    from edgepeft.tasks import TASKS

    adapters = shipped_adapters()
    out = Path(args.out) if args.out else cache_dir() / "demo" / "smollm2-135m-int4"
    bundle, export_s = _bundle(out, adapters, args.quiet)
    print(f"edgepeft demo: {BASE} as int4 ONNX with {len(adapters)} shipped adapters ({', '.join(adapters)})")
    print(f"bundle  {bundle.root}  ({'exported in %.1f s' % export_s if export_s else 'reused'})")

    rss0 = rss_bytes()
    t0 = time.perf_counter()
    engine = Engine.open(bundle, backend=args.backend, threads=args.threads, load_adapters=False)
    base_s, rss_base = time.perf_counter() - t0, rss_bytes()
    load_ms = {}
    for name in adapters:
        t = time.perf_counter()
        engine.load_adapter(name)
        load_ms[name] = (time.perf_counter() - t) * 1e3
    rss_adapters = rss_bytes()
    print(f"base    loaded once in {base_s:.2f} s (+{_mb(rss_base - rss0)} RSS); adapters loaded in "
          + ", ".join(f"{n} {ms:.1f} ms" for n, ms in load_ms.items()) + f" (+{_mb(rss_adapters - rss_base)} RSS)")

    # The same prompts, one per task, with no adapter and with each adapter.
    columns = [None, *adapters]
    speeds: dict[str | None, list[float]] = {c: [] for c in columns}
    print()
    for task_name, task in TASKS.items():
        example = task.examples(1, held_out=True, seed=1)[0]
        print(f"prompt ({task_name} task): {example.prompt}")
        for col in columns:
            result = engine.complete(example.prompt, adapter=col, max_new_tokens=task.max_new_tokens, chat=True)
            if result.timings["decode_tokens_per_s"]:
                speeds[col].append(result.timings["decode_tokens_per_s"])
            lines = _cell(result.text, 88)
            print(f"  {col or 'base':<10} | {lines[0]}" + "".join(f"\n  {'':<10} | {l}" for l in lines[1:3]))
        print()

    # Switching = binding an adapter's tensors for the next call; the base session is untouched.
    import onnxruntime  # noqa: F401  (the ONNX backend is loaded; its IO binding is what we time)

    switch = {}
    for name in adapters:
        handle = engine._adapter(name)
        times = []
        for _ in range(200):
            io = engine.backend.session.io_binding()
            t = time.perf_counter()
            engine.backend.bind_adapter(io, handle)
            times.append(time.perf_counter() - t)
        switch[name] = statistics.median(times) * 1e3
    print("switch  " + ", ".join(f"{n} {ms:.3f} ms" for n, ms in switch.items())
          + "  (median of 200; binds the adapter's tensors, no base weights move)")
    print("speed   decode " + ", ".join(
        f"{c or 'base'} {statistics.median(v):.0f} tok/s" for c, v in speeds.items() if v)
        + f"  ({args.backend}, {engine.backend.providers[0]})")

    # Task accuracy on the exported model, on the same held-out prompts as the PyTorch figures.
    metrics = shipped_metrics()
    print(f"\ntask accuracy on {args.held_out} held-out prompts      PyTorch fp32   {args.backend} int4")
    for task_name in adapters:
        task = TASKS[task_name]
        held = task.examples(args.held_out, held_out=True, seed=0)
        acc = {}
        for col in (task_name, None):
            answers = [engine.generate(e.prompt, adapter=col, max_new_tokens=task.max_new_tokens, chat=True)
                       for e in held]
            acc[col] = task.accuracy(held, answers)
        m = metrics.get(task_name, {})
        ref = lambda k: f"{m[k]:.0%}" if k in m else "n/a"  # noqa: E731
        print(f"  {task_name:<10} with adapter {'':<18} {ref('pytorch_accuracy'):>6}   {acc[task_name]:>10.0%}")
        print(f"  {'':<10} base          {'':<18} {ref('base_accuracy'):>6}   {acc[None]:>10.0%}")
    print(f"\npeak RSS {_mb(peak_rss_bytes())}")
    return 0
