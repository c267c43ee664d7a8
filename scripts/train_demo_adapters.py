#!/usr/bin/env python3
"""Train the demo LoRA adapters shipped with edgepeft, on builtin:smollm2-135m.

    python scripts/train_demo_adapters.py            # all tasks, CPU or GPU
    python scripts/train_demo_adapters.py --only json --steps 50
    python scripts/train_demo_adapters.py --evaluate-only   # re-score the shipped adapters

Data comes from edgepeft.demo.tasks (generated, fixed seeds); each adapter is saved with PEFT
(safetensors, fp16) under edgepeft/data/adapters/smollm2-135m/<task>/, and metrics.json there
records base vs adapter accuracy on held-out prompts in PyTorch, and the adapter's outcome per
prompt, which `edgepeft demo`, `edgepeft verify` and the tests compare the exported model with
(edgepeft.demo.tasks.compare_to_reference). Needs `pip install 'edgepeft[export,demo]'`.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from edgepeft.exporters.hf_base import resolve_base_dir
from edgepeft.files import write_json_atomic
from edgepeft.demo.tasks import TASK_PROMPTS, TASKS

OUT = Path(__file__).resolve().parent.parent / "edgepeft" / "data" / "adapters" / "smollm2-135m"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Three ranks and two target sets, on purpose: the demo exercises per-adapter shapes.
RECIPES = {
    "json": dict(r=12, lora_alpha=24, target_modules=ALL_LINEAR, steps=300, lr=1e-3),
    "upper": dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR, steps=120, lr=1e-3),
    "sentiment": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], steps=100, lr=1e-3),
}
BATCH, EVAL_N, SEED = 8, TASK_PROMPTS, 0


def chat_ids(tok, prompt: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                   tokenize=True)


def make_batch(tok, examples, device):
    """Left-aligned prompt+answer sequences; loss only on the answer and its <|im_end|>."""
    rows = []
    for e in examples:
        p = chat_ids(tok, e.prompt)
        a = tok.encode(e.target + "<|im_end|>", add_special_tokens=False)
        rows.append((p + a, [-100] * len(p) + a))
    width = max(len(r[0]) for r in rows)
    pad = tok.pad_token_id
    ids = torch.tensor([r[0] + [pad] * (width - len(r[0])) for r in rows], device=device)
    labels = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows], device=device)
    return ids, labels, mask


@torch.no_grad()
def answers(model, tok, prompts: list[str], max_new_tokens: int, device) -> list[str]:
    """Greedy answers, batched with left padding."""
    tok.padding_side = "left"
    out = []
    for i in range(0, len(prompts), 16):
        chunk = [chat_ids(tok, p) for p in prompts[i : i + 16]]
        width = max(map(len, chunk))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(c)) + c for c in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=device)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id)
        out += [tok.decode(g[width:], skip_special_tokens=True) for g in gen]
    return out


def train_one(name: str, base_dir: Path, device: str, steps: int | None) -> dict:
    task, recipe = TASKS[name], dict(RECIPES[name])
    steps = steps or recipe.pop("steps")
    recipe.pop("steps", None)
    lr = recipe.pop("lr")
    torch.manual_seed(SEED)
    random.seed(SEED)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **recipe))
    train = task.examples(steps * BATCH, held_out=False, seed=SEED)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.05, 1 - s / steps))
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        ids, labels, mask = make_batch(tok, train[step * BATCH : (step + 1) * BATCH], device)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0 or step == steps - 1:
            print(f"{name}: step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)
    train_s = time.perf_counter() - t0
    out = OUT / name
    model = model.to("cpu").half()  # fp16 halves the shipped file; the exporter reads F16
    model.save_pretrained(out, safe_serialization=True)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's model-card template; the set has one README
    metrics = {
        "task": task.description, "rank": recipe["r"], "alpha": recipe["lora_alpha"],
        "targets": recipe["target_modules"], "steps": steps, "batch": BATCH, "lr": lr,
        "train_seconds": round(train_s, 1), "device": device, "torch": torch.__version__,
    }
    del model
    return {**metrics, **evaluate_one(name, base_dir, device)}


@torch.no_grad()
def evaluate_one(name: str, base_dir: Path, device: str) -> dict:
    """PyTorch figures of the shipped adapter `name` (as saved: fp16 weights in an fp32 model, what
    the exporter reads) on EVAL_N held-out prompts: accuracy with and without it, and its outcome
    per prompt ("1"/"0"), which the exported model's task check is paired with."""
    from peft import PeftModel

    task = TASKS[name]
    tok = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device)
    model = PeftModel.from_pretrained(base, OUT / name).to(device).eval()
    held = task.examples(EVAL_N, held_out=True, seed=SEED)
    prompts = [e.prompt for e in held]
    adapted = answers(model, tok, prompts, task.max_new_tokens, device)
    with model.disable_adapter():
        plain = answers(model, tok, prompts, task.max_new_tokens, device)
    metrics = {
        "held_out": EVAL_N, "pytorch_accuracy": task.accuracy(held, adapted),
        "base_accuracy": task.accuracy(held, plain),
        "pytorch_correct": "".join("1" if task.check(e, a) else "0" for e, a in zip(held, adapted)),
        "sample": {"prompt": prompts[0], "adapter": adapted[0], "base": plain[0]},
    }
    print(json.dumps({name: metrics}, indent=1), flush=True)
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="builtin:smollm2-135m")
    ap.add_argument("--only", choices=list(RECIPES), action="append")
    ap.add_argument("--steps", type=int, default=None, help="override every recipe's step count")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--evaluate-only", action="store_true",
                    help="do not train: re-score the shipped adapters in PyTorch and update metrics.json")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base_dir = resolve_base_dir(args.base)
    path = OUT / "metrics.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    for name in args.only or list(RECIPES):
        if args.evaluate_only:
            metrics[name] = {**metrics.get(name, {}), **evaluate_one(name, base_dir, args.device)}
        else:
            metrics[name] = train_one(name, base_dir, args.device, args.steps)
        write_json_atomic(path, metrics)


if __name__ == "__main__":
    main()
