"""The demo: the builtin SmolLM2-135M with the adapters shipped in the package, their tasks
(tasks.py) and PyTorch's outcomes on them (shipped.py). `edgepeft demo`, `edgepeft verify`, the
benchmarks and the training script share it."""

from __future__ import annotations

from pathlib import Path

BASE = "builtin:smollm2-135m"
QUANTS = {"onnx": "int4", "gguf": "Q4_K_M"}


def demo_bundle(out: Path, backends: list[str] | None = None, quiet: bool = True):
    """The demo bundle at `out`: reused when it holds what an export would write now, else
    exported; returns (Bundle, export seconds or None)."""
    from edgepeft.exporters.reuse import export_or_reuse

    from .shipped import shipped_adapters

    backends = backends or list(QUANTS)
    return export_or_reuse(BASE, out, shipped_adapters(), ",".join(backends), QUANTS["onnx"], QUANTS["gguf"], quiet)


def task_checks(bundle, prompts: int) -> dict:
    """{adapter name: check(engine) -> comparison with PyTorch} for the adapters of `bundle` that
    are shipped ones (recognised by their weights' hash) with a task and PyTorch's outcomes;
    `prompts` held-out prompts each (at most what PyTorch's outcomes cover)."""
    from edgepeft.errors import BundleError
    from edgepeft.files import sha256_file

    from .shipped import shipped_adapters, shipped_metrics
    from .tasks import TASKS, compare_to_reference

    metrics = shipped_metrics()
    for name, m in metrics.items():
        if prompts > len(m.get("pytorch_correct", "")):
            raise BundleError(f"--task-prompts {prompts}: PyTorch's outcomes for the shipped {name!r} adapter "
                              f"cover {len(m.get('pytorch_correct', ''))} held-out prompts")
    shipped = {n: sha256_file(p / "adapter_model.safetensors") for n, p in shipped_adapters().items()}

    def check(name):
        return lambda engine: compare_to_reference(metrics[name]["pytorch_correct"],
                                                   TASKS[name].outcomes(engine, name, prompts))

    return {name: check(name) for name, entry in bundle.adapters.items()
            if shipped.get(name) == entry.get("source_hash") and name in TASKS and name in metrics}
