"""Activation statistics for importance-weighted 4-bit quantization (what llama.cpp calls an
importance matrix): the mean square of each input channel of every base linear layer, over a
fixed, built-in calibration text. Channels that carry large activations make their weights'
rounding error count more; the quantizer weighs its error by these (onnx_quant.py).

The text is generic prose, code and chat, and shares no prompt with `edgepeft verify`.
"""

from __future__ import annotations

import numpy as np

from edgepeft.errors import UnsupportedModel, require

from .layerwise import Layerwise
from .progress import QUIET

CALIBRATION_TEXTS = (
    "The history of the Roman Empire spans more than a thousand years, from the founding of the city "
    "to the fall of Constantinople.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)",
    "Photosynthesis converts light energy into chemical energy stored in glucose, releasing oxygen as a "
    "by-product.",
    "Dear customer, your order has shipped and should arrive within three to five business days.",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "Water boils at 100 degrees Celsius at sea level; at higher altitudes it boils at lower temperatures.",
    "Summarize the following meeting notes: the team agreed to move the launch to March and to hire two "
    "engineers.",
    "Q: How many legs does a spider have? A: Eight. Q: What is the largest planet? A: Jupiter.",
)


def _token_batches(base, vocab_size: int) -> list[list[int]]:
    """The calibration text as token ids, each text raw and (where the base has a chat template)
    as a user turn; a base without a usable tokenizer gets fixed pseudo-random ids instead."""
    if not (base.local_dir / "tokenizer.json").is_file():  # a bare checkpoint: fixed ids still give statistics
        rng = np.random.default_rng(0)
        return [rng.integers(0, vocab_size, 48).tolist() for _ in CALIBRATION_TEXTS]
    transformers = require("transformers", "export")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(base.local_dir))
    except (OSError, ValueError) as e:
        raise UnsupportedModel(f"{base.local_dir}: cannot load its tokenizer for calibration "
                               f"({str(e).splitlines()[0][:160]})") from None
    batches = [tok(t)["input_ids"] for t in CALIBRATION_TEXTS]
    if getattr(tok, "chat_template", None):
        batches += [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=True,
                                           return_dict=False)
                    for t in CALIBRATION_TEXTS]
    return [list(map(int, ids)) for ids in batches if len(ids)]


def activation_importance(base, modules: dict[str, str], progress=QUIET) -> dict[str, np.ndarray]:
    """{key: mean x^2 per input channel} for modules {key: torch module name} of `base`, from one
    teacher-forced pass of the calibration text through the float model, run a decoder layer at a
    time over every text batched (layerwise.py): each layer's weights are read once."""
    torch = require("torch", "export")
    model = base.model
    sums: dict[str, list] = {}

    def add(name, rows):
        rows = rows.detach().double()
        acc = sums.setdefault(name, [0.0, 0])
        acc[0] = acc[0] + (rows * rows).sum(0)
        acc[1] += rows.shape[0]

    wanted = set(modules.values())
    with torch.no_grad():
        run = Layerwise(base, _token_batches(base, int(base.dims["vocab_size"])))
    hooks = [module.register_forward_hook(lambda _m, args, _out, name=name: add(name, run.rows(args[0])))
             for name, module in model.named_modules() if name in wanted]
    try:
        run.run(progress)
        head = _head_name(model)
        if head in wanted:  # the head's input, without computing its logits
            for rows in run.normed():
                add(head, rows)
    finally:
        for h in hooks:
            h.remove()
    return {key: (sums[name][0] / sums[name][1]).numpy() for key, name in modules.items() if name in sums}


def _head_name(model) -> str | None:
    head = model.get_output_embeddings()
    return next((name for name, m in model.named_modules() if m is head), None)


def linear_modules(model) -> dict[str, str]:
    """{name: name} of every linear layer of `model`: what activation_importance records when the
    graph's MatMuls are not known yet (their statistics are those of the first module they pack)."""
    torch = require("torch", "export")
    return {name: name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
