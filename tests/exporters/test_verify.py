"""`edgepeft verify`: passes an honest export, fails one whose adapter is not what it claims."""

import json

from edgepeft.cli import main
from edgepeft.exporters import export_bundle


def test_verify_passes_an_exact_export_and_reports_every_backend_and_adapter(tiny_llama, llama_adapters, tmp_path, capsys):
    bundle = export_bundle(str(tiny_llama), tmp_path / "b", {n: str(llama_adapters[n]) for n in ("qv", "all")},
                           formats="onnx,gguf", onnx_quant="fp32", gguf_quant="F32", quiet=True)
    assert main(["verify", str(bundle.root), "--reference", str(tiny_llama), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["ok"] and {(c["backend"], c["adapter"]) for c in r["checks"]} == {
        (b, a) for b in ("onnx", "gguf") for a in (None, "qv", "all")}
    assert all(c["top1"] == 1.0 and c["kl"] < 1e-8 for c in r["checks"])


def test_verify_fails_when_the_adapter_differs_from_the_reference(tiny_llama, llama_adapters, tmp_path, capsys):
    bundle = export_bundle(str(tiny_llama), tmp_path / "b", {"qv": str(llama_adapters["qv"])},
                           onnx_quant="fp32", quiet=True)
    code = main(["verify", str(bundle.root), "--reference", str(tiny_llama),
                 "--adapter", f"qv={llama_adapters['all']}"])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL" in out and "some checks FAILED" in out
    assert "base" in out.splitlines()[2] and out.splitlines()[2].endswith("ok")


def test_agreement_counts_a_shared_prefix_once():
    import numpy as np

    from edgepeft.exporters.verify import agreement, shared_prefix

    rng = np.random.default_rng(0)
    seqs = [[1, 2, 3, 10, 11], [1, 2, 3, 20], [1, 2, 3, 30, 31, 32]]
    assert shared_prefix(seqs) == 3
    prefix = rng.standard_normal((3, 8))  # identical inputs, identical logits
    refs = [np.concatenate([prefix, rng.standard_normal((len(s) - 3, 8))]) for s in seqs]
    # the shared positions differ (identically in every sequence), the others match exactly
    got = [np.concatenate([r[:3] + np.array([4.0] + [0.0] * 7), r[3:]]) for r in refs]
    once, per_seq = agreement(refs, got, shared=3), agreement(refs, got)
    assert once["positions"] == 3 + 2 + 1 + 3 and per_seq["positions"] == 15
    assert once["kl"] > 0 and abs(once["kl"] * 9 - per_seq["kl"] * 15 / 3) < 1e-9
    assert agreement(refs, refs, shared=3)["kl"] < 1e-12 and agreement(refs, refs)["top1"] == 1.0


def test_verify_scores_the_references_greedy_answer_after_each_prompt(tiny_llama):
    import torch
    import transformers

    from edgepeft.exporters.verify import ANSWER_TOKENS, reference_sequences

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    prompts = [[1, 5, 9, 12], [1, 5, 7]]
    seqs, refs = reference_sequences(model, prompts, stop_ids=set())
    for prompt, seq, ref in zip(prompts, seqs, refs):
        assert seq[:len(prompt)] == prompt and len(seq) == len(prompt) + ANSWER_TOKENS
        assert ref.shape[0] == len(seq)
        # every answer token is the reference's own greedy choice at the position before it
        assert [int(ref[i - 1].argmax()) for i in range(len(prompt), len(seq))] == seq[len(prompt):]
    # a stop token ends the answer, and is scored as its last token
    first = int(refs[0][len(prompts[0]) - 1].argmax())
    seqs, _ = reference_sequences(model, prompts[:1], stop_ids={first})
    assert seqs[0] == prompts[0] + [first]
