"""`edgepeft verify`: each backend and adapter of a bundle against the PyTorch+PEFT reference.

For a fixed set of chat prompts, each followed by the reference's own greedy answer (up to
ANSWER_TOKENS, so that the positions a model generates are scored, not only prompt text),
teacher-forced logits of the exported model are compared with the reference's: max abs
difference, mean KL(reference || exported) and top-1 agreement over positions. The chat
template's system prompt, which every prompt starts with, is counted once: identical inputs give
identical logits, and counted per prompt it would outweigh the positions that differ. Adapters
with a task check (the caller passes them: the CLI, the shipped demo adapters') are also scored on
their held-out prompts.
Thresholds depend on the backend's precision and are printed with the results.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgepeft.bundle import Bundle
from edgepeft.errors import BundleError, require

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in two sentences why the sky is blue.",
    "List three prime numbers greater than 10.",
    "Translate 'good morning' into Spanish.",
    "Profile: Basil is a 41-year-old pilot who lives in Bergen.",
    "Classify the sentiment of this review as positive or negative. Review: The tent was superb.",
]

# (max KL, min top-1 agreement) by precision; max abs is reported, and bounded for full precision.
THRESHOLDS = {
    "fp32": {"kl": 1e-5, "top1": 0.999, "max_abs": 1e-3},
    "F32": {"kl": 1e-5, "top1": 0.999, "max_abs": 1e-2},
    "fp16": {"kl": 1e-3, "top1": 0.98}, "F16": {"kl": 1e-3, "top1": 0.98},
    "int8": {"kl": 0.02, "top1": 0.93}, "Q8_0": {"kl": 0.02, "top1": 0.93},
}
QUANTIZED_4BIT = {"kl": 0.15, "top1": 0.8}
ANSWER_TOKENS = 32  # greedy answer tokens of the reference scored after each prompt


def thresholds(quant: str) -> dict:
    return THRESHOLDS.get(quant, QUANTIZED_4BIT)


def _kl_rows(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """KL(ref || got) per position (row), in float64."""
    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lr, lg = log_softmax(ref), log_softmax(got)
    return (np.exp(lr) * (lr - lg)).sum(-1)


def shared_prefix(seqs: list[list[int]]) -> int:
    """Length of the token prefix every sequence starts with (the chat template's system prompt)."""
    n = 0
    while all(len(s) > n and s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


def agreement(refs: list[np.ndarray], got: list[np.ndarray], shared: int = 0) -> dict:
    """Logits `got` against `refs` ([positions, vocab] per sequence): the largest absolute
    difference, the mean KL(reference || ours) and the top-1 agreement over positions. The first
    `shared` positions (a prefix all sequences share) count once, from the first sequence."""
    pairs = [(r[i and shared:], g[i and shared:]) for i, (r, g) in enumerate(zip(refs, got))]
    kl = np.concatenate([_kl_rows(r, g) for r, g in pairs])
    return {"max_abs": max(float(np.abs(g - r).max()) for r, g in pairs if len(r)),
            "kl": float(kl.mean()),
            "top1": float(np.mean(np.concatenate([g.argmax(-1) == r.argmax(-1) for r, g in pairs]))),
            "positions": int(len(kl))}


def reference_sequences(model, prompts: list[list[int]], stop_ids: set[int],
                        answer_tokens: int | None = None) -> tuple[list[list[int]], list[np.ndarray]]:
    """Each prompt followed by `model`'s greedy answer (up to answer_tokens, ending at a stop
    token), and the model's logits [len(sequence), vocab] for it. Decoded without a KV cache, one
    full forward per token, so that every PEFT kind (virtual tokens included) runs as it trains."""
    torch = require("torch", "export")
    from .checkpoint import float32_layers

    answer_tokens = ANSWER_TOKENS if answer_tokens is None else answer_tokens
    seqs, refs = [], []
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # under PEFT's wrapper
    with torch.no_grad(), float32_layers(inner):
        for ids in prompts:
            seq = list(ids)
            # prompt tuning's PeftModel also returns its virtual tokens' rows: keep the real ones
            logits = model(torch.tensor([seq])).logits[0, -len(seq):]
            for _ in range(answer_tokens):
                nxt = int(logits[-1].argmax())
                seq.append(nxt)
                logits = model(torch.tensor([seq])).logits[0, -len(seq):]
                if nxt in stop_ids:
                    break
            seqs.append(seq)
            refs.append(logits.numpy())
    return seqs, refs


def reference_model(reference: str, adapter: str | Path | None = None):
    """The reference: transformers' model of base `reference` (a directory or builtin:NAME), with
    PEFT adapter directory `adapter` loaded on it. Its base weights stay in the checkpoint's dtype
    (bf16 for a bf16 checkpoint) and reference_sequences computes in float32 one decoder layer at
    a time (checkpoint.float32_layers): the float32 model's logits, at the stored model's memory."""
    peft = require("peft", "export")
    from .checkpoint import stored_model
    from .hf_base import read_config, reference_kwargs, resolve_base_dir

    base_dir = resolve_base_dir(reference)
    config = read_config(base_dir)
    model = stored_model(base_dir, config, **reference_kwargs(config)).eval()
    return model if adapter is None else peft.PeftModel.from_pretrained(model, str(adapter)).eval()


def _reference_models(reference: str, bundle: Bundle, adapter_dirs: dict[str, str]):
    """{adapter or None: torch model} built with transformers + PEFT (reference_model)."""
    merged = bundle.base.get("merged_adapter")
    if merged:
        yield None, reference_model(reference, adapter_dirs.get(merged["name"], merged.get("source")))
        return
    yield None, reference_model(reference)
    for name, entry in bundle.adapters.items():
        src = adapter_dirs.get(name, entry.get("source"))
        if not src or not (Path(src) / "adapter_config.json").is_file():
            raise BundleError(f"adapter {name!r}: its PEFT directory {src} is not here; pass --adapter {name}=DIR")
        yield name, reference_model(reference, src)


def verify_bundle(bundle_dir: str | Path, reference: str, adapter_dirs: dict[str, str] | None = None,
                  backends: list[str] | None = None, task_checks=None) -> dict:
    """Score every backend and adapter of a bundle against the PyTorch+PEFT reference. task_checks:
    a function of the opened Bundle returning {adapter name: check(engine) -> dict with ok,
    accuracy and pytorch_accuracy} for the adapters that also have a task to pass."""
    require("torch", "export")  # before any engine opens: the reference needs the export extra
    from edgepeft.runtime import Engine

    bundle = Bundle.open(bundle_dir, verify_hashes=True)  # every file re-read, no hash cache
    fp = bundle.fingerprint
    backends = backends or list(bundle.backends)
    engines = {b: Engine.open(bundle, backend=b) for b in backends}
    tok = next(iter(engines.values())).tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    results: dict = {"bundle": str(bundle.root), "reference": reference, "fingerprint": fp, "checks": []}

    tasks = task_checks(bundle) if task_checks is not None else {}
    stop = tok.stop_ids(chat=True)
    # a bundle exported with a short --context-length gets shorter answers, not an error
    context = min(bundle.backends[b].get("context_length") or 1 << 30 for b in backends)
    answer_tokens = max(0, min(ANSWER_TOKENS, context - max(map(len, prompts))))
    for name, model in _reference_models(reference, bundle, dict(adapter_dirs or {})):
        seqs, refs = reference_sequences(model, prompts, stop, answer_tokens)
        del model
        shared = shared_prefix(seqs)
        for backend, engine in engines.items():
            if name is not None and backend not in (bundle.adapters[name].get("files") or {}):
                continue  # this kind does not run on this backend (see the support table)
            got = [engine.score(seq, adapter=name) for seq in seqs]
            quant = bundle.backends[backend]["quant"]
            limit = thresholds(quant)
            check = {"backend": backend, "quant": quant, "adapter": name, **agreement(refs, got, shared), "thresholds": limit}
            ok = (check["kl"] <= limit["kl"] and check["top1"] >= limit["top1"]
                  and check["max_abs"] <= limit.get("max_abs", float("inf")))
            if name in tasks:
                task = tasks[name](engine)
                check["task"] = task
                check["task_accuracy"], check["pytorch_task_accuracy"] = task["accuracy"], task["pytorch_accuracy"]
                ok = ok and task["ok"]
            check["ok"] = ok
            results["checks"].append(check)
    results["ok"] = all(c["ok"] for c in results["checks"])
    return results
