"""Tiny random bases and PEFT adapters, built in seconds, for parity tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(out: Path):
    """A byte-level BPE tokenizer (256 byte tokens, a few merges, 3 specials), saved HF-style."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def _longrope(rotary_dim: int) -> dict:
    """LongRoPE factors for a rotary width: short ones near 1, long ones growing with frequency."""
    half = rotary_dim // 2
    return {"type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(half)],
            "long_factor": [1.0 + 1.5 * i for i in range(half)]}


# arch: (config class, model class, config overrides). A test config of every family in
# edgepeft.exporters.archs, with what makes it differ from Llama switched on.
ARCHS = {
    # Llama with grouped-query attention (4 query heads share 2 KV heads).
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    # Qwen2: biases on q/k/v.
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    # Qwen3: q/k RMSNorm per head (its head_dim defaults to 128).
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    # Gemma 2: layers alternate sliding (window 8) and global, soft-capped attention and logits.
    # query_pre_attn_scalar = head_dim, as llama.cpp's gemma2 assumes.
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {
        "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8, "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0, "rope_theta": 10000.0}),
    # Gemma 3: 5 sliding layers (window 8, rotary base 10000) then a global one (base 1e6), q/k norms.
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8, "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10000.0, "num_hidden_layers": 6}),
    # Gemma 3 scaled as Gemma 3 is not in llama.cpp: query_pre_attn_scalar != head_dim (ONNX only).
    "gemma3_scaled": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 8, "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 20000.0, "num_hidden_layers": 2, "final_logit_softcapping": 20.0}),
    # Phi-3: fused qkv_proj / gate_up_proj.
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": None}),
    # Phi-3.5 / Phi-4-mini style: LongRoPE past an original context of 32, partial rotary (half of
    # head_dim 32 rotates).
    "phi3_longrope": ("Phi3Config", "Phi3ForCausalLM", {
        "sliding_window": None, "hidden_size": 128, "partial_rotary_factor": 0.5,
        "original_max_position_embeddings": 32, "rope_scaling": _longrope(16)}),
    # LFM2: gated short-convolution layers (kernel 5: a state of 4 inputs) between full-attention
    # layers with q/k norms, 2 heads sharing 1 KV head; the MLP width adjusted from
    # intermediate_size (block_auto_adjust_ff_dim: 128 -> 96).
    "lfm2": ("Lfm2Config", "Lfm2ForCausalLM", {
        "num_hidden_layers": 4, "layer_types": ["conv", "full_attention", "conv", "full_attention"],
        "conv_L_cache": 5, "num_attention_heads": 2, "num_key_value_heads": 1, "block_multiple_of": 16}),
    # Qwen3.5 (text): three gated DeltaNet layers (2 key heads each serving 2 of 4 value heads,
    # convolution kernel 4) then a gated full-attention layer (head_dim 64 of which a quarter
    # rotates, the released models' factor; 4 heads sharing 2 KV heads).
    "qwen3_5_text": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", {
        "num_hidden_layers": 4, "head_dim": 64, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
        "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4}),
    # Gemma 4 (text): 2 sliding layers (window 8, head 16) and a global one (head 32, a quarter
    # rotating, proportional rotary) store KV; the last 3 layers (2 sliding, 1 global) reuse
    # theirs, with MLPs twice as wide (use_double_wide_mlp); per-layer inputs of 8 per
    # layer; logits soft-capped.
    "gemma4_text": ("Gemma4TextConfig", "Gemma4ForCausalLM", {
        "num_hidden_layers": 6, "head_dim": 16, "global_head_dim": 32, "sliding_window": 8,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2,
        "num_kv_shared_layers": 3, "use_double_wide_mlp": True, "hidden_size_per_layer_input": 8,
        "vocab_size_per_layer_input": 300,
        "final_logit_softcapping": 30.0, "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}}}),
}


def make_base(out: Path, arch: str = "llama", seed: int = 0, layers: int = 2, hidden: int = 64,
              tie: bool = False, **overrides) -> Path:
    """Save a random tiny `arch` model plus tokenizer at `out` and return `out`."""
    import torch
    import transformers

    cfg_name, model_name, extra = ARCHS[arch]
    tok = make_tokenizer(out)
    kwargs = dict(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=tie,
        rope_theta=10000.0,
    )
    kwargs.update(extra)
    kwargs["intermediate_size"] = 2 * kwargs["hidden_size"]
    kwargs.update(overrides)
    cfg = getattr(transformers, cfg_name)(**kwargs)
    if cfg.pad_token_id is not None and cfg.pad_token_id >= len(tok):  # Phi-3's default points past it
        cfg.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).eval()
    with torch.no_grad():  # larger weights than the default init, so outputs differ visibly
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(out, safe_serialization=True)
    return out


def bf16_copy(src: Path, dest: Path) -> Path:
    """`src` (a make_base directory) copied to `dest` with its weights saved in bf16."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dest)
    for f in dest.glob("*.safetensors"):
        f.unlink()
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).to(torch.bfloat16).save_pretrained(dest)
    return dest


def all_linear(arch: str) -> list[str]:
    """The linear layers of `arch`'s checkpoint, for "LoRA on every linear layer"."""
    if ARCHS[arch][1] == "Phi3ForCausalLM":  # stored fused
        return ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    if ARCHS[arch][1] == "Lfm2ForCausalLM":  # out_proj: both the attention's and the convolution's
        return ["q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w3", "w2"]
    if ARCHS[arch][1] == "Gemma4ForCausalLM":  # the per-layer inputs' projections too
        return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "per_layer_input_gate",
                "per_layer_projection", "per_layer_model_projection"]
    if ARCHS[arch][1] == "Qwen3_5ForCausalLM":  # out_proj: the DeltaNet's
        return ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a",
                "out_proj", "gate_proj", "up_proj", "down_proj"]
    return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_lora(base_dir: Path, out: Path, seed: int = 1, **lora_kwargs) -> Path:
    """A PEFT LoRA adapter with random, non-zero A and B, saved as safetensors at `out`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}
    kwargs.update(lora_kwargs)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


def gemma2_all_projection_gguf(root: Path, **base_overrides):
    """A random Gemma 2 base (tied head) with a rank-8 rsLoRA on every projection, exported to an
    F32 GGUF bundle and opened on the GGUF backend: (base dir, adapter dir, Engine). What the
    family test of ggml's GELU table and benchmarks/gemma2_gelu.py both score."""
    from edgepeft.exporters import export_bundle
    from edgepeft.runtime import Engine

    base = make_base(root / "base", "gemma2", seed=11, tie=True, **base_overrides)
    adapter = make_lora(base, root / "all", seed=12, r=8, lora_alpha=16, use_rslora=True,
                        target_modules=all_linear("gemma2"))
    bundle = export_bundle(str(base), root / "b", {"all": str(adapter)}, formats="gguf", gguf_quant="F32",
                           quiet=True)
    return base, adapter, Engine.open(bundle.root, backend="gguf", max_context=256)


def load_reference(base_dir: Path):
    """The fp32 PyTorch model as designed (eager attention where sdpa would drop a soft-cap)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgepeft.exporters.hf_base import reference_kwargs

    extra = reference_kwargs(AutoConfig.from_pretrained(base_dir))
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, **extra).eval()


def _ggml_gelu_table() -> np.ndarray:
    """tanh GELU of every fp16 value, rounded to fp16: the table ggml's CPU backend looks GELU up in."""
    x = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
    with np.errstate(all="ignore"):  # inf / nan entries are never looked up (|x| >= 10 is computed)
        y = 0.5 * x * (1 + np.tanh(np.float32(0.7978845608) * x * (1 + np.float32(0.044715) * x * x)))
    return y.astype(np.float16).astype(np.float32)


def use_ggml_gelu(model) -> None:
    """Make a Gemma reference compute its GeGLU's GELU as llama.cpp does on CPU (ggml's
    GGML_GELU_FP16): input rounded to fp16, output read from an fp16 table, exact for |x| >= 10.
    Own code: no library exposes ggml's table to PyTorch."""
    import torch

    assert model.config.hidden_activation == "gelu_pytorch_tanh", model.config.hidden_activation
    table = torch.from_numpy(_ggml_gelu_table())

    class TableGelu(torch.nn.Module):
        def forward(self, x):
            looked_up = table[x.half().view(torch.int16).long() & 0xFFFF]
            return torch.where(x <= -10, 0.0, torch.where(x >= 10, x, looked_up))

    for layer in model.model.layers:
        layer.mlp.act_fn = TableGelu()


def reference_logits(base_dir: Path, adapter_dir: Path | None, ids, ggml_gelu: bool = False) -> "np.ndarray":
    """Logits of PyTorch (+PEFT) for `ids` (a list of token ids); `ggml_gelu`: with GELU computed
    as llama.cpp's CPU backend does (use_ggml_gelu)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = load_reference(base_dir)
    if ggml_gelu:
        use_ggml_gelu(model)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].numpy()


ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def _train(model, texts: list[str], tok, steps: int, lr: float, seed: int):
    """A few hundred steps of next-token training on `texts` (whole-sequence teacher forcing)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    batch = torch.tensor([tok.encode(t) for t in texts])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(texts), (8,), generator=g)
        loss = model(input_ids=batch[idx], labels=batch[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def alphabet_texts(step: int, n: int = 26, length: int = 24) -> list[str]:
    """Letters walking the alphabet by `step` from each start letter: a task a model can learn."""
    return ["".join(ALPHABET[(s + step * i) % 26] for i in range(length)) for s in range(n)]


def make_trained_base(out: Path, arch: str = "llama", steps: int = 150) -> Path:
    """A tiny base trained to continue the alphabet (a->b->c): confident, peaked logits, so
    quantized exports can be compared on greedy continuations."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_base(out, arch, seed=0)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.manual_seed(0)
    _train(model, alphabet_texts(1), tok, steps, 3e-3, seed=0)
    model.save_pretrained(out, safe_serialization=True)
    return out


def make_trained_lora(base_dir: Path, out: Path, step: int = -1, steps: int = 120, **lora_kwargs) -> Path:
    """A LoRA trained on the base to walk the alphabet by `step` (default backwards)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    kwargs = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
              "gate_proj", "up_proj", "down_proj"], "lora_dropout": 0.0}
    kwargs.update(lora_kwargs)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **kwargs))
    _train(peft_model, alphabet_texts(step), tok, steps, 1e-2, seed=1)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


def make_prompt_adapter(base_dir: Path, out: Path, peft_type: str = "PROMPT_TUNING", seed: int = 1,
                        num_virtual_tokens: int = 5, **kwargs) -> Path:
    """A PEFT prompt-learning adapter (PROMPT_TUNING, P_TUNING or PREFIX_TUNING) with random
    trainable parameters large enough to change the logits, saved as safetensors at `out`."""
    import torch
    import peft
    from transformers import AutoModelForCausalLM

    config_cls = {"PROMPT_TUNING": peft.PromptTuningConfig, "P_TUNING": peft.PromptEncoderConfig,
                  "PREFIX_TUNING": peft.PrefixTuningConfig}[peft_type]
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = peft.get_peft_model(model, config_cls(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens,
                                                       **kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


def graph_paths(model) -> dict[str, list]:
    """The operators of an exported decoder per path, names without the branch tag: "slots" (the
    If's then-branch) and "base" (its else-branch, see onnx_base_path.add_base_path); a graph without
    the If (slot set "none") has only "slots"."""
    import copy

    from edgepeft.runtime_contract import PATH_TAGS, tagged

    top = list(model.graph.node)
    choose = next((n for n in top if n.op_type == "If"), None)
    if choose is None:
        return {PATH_TAGS["then_branch"]: top}
    paths = {}
    for attr in choose.attribute:
        tag = PATH_TAGS[attr.name]
        nodes, prefix = [copy.deepcopy(n) for n in attr.g.node], tagged(tag, "")
        for n in nodes:
            assert n.name.startswith(prefix)
            n.name = n.name[len(prefix):]
        paths[tag] = nodes
    return paths
