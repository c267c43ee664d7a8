"""Build the ONNX decoder graph for a llama-family base, with swappable LoRA slots.

Why not Optimum: Optimum exports merged models only (no adapter inputs), and its traced graph
keeps attention as dozens of primitive ops. onnxruntime-genai reaches its speed with a graph made
of onnxruntime's fused operators, built directly from the weights; we do the same, plus the
adapter slots, in one pass with onnx.helper:

  Gather(embed) -> [SimplifiedLayerNorm | SkipSimplifiedLayerNorm] -> qkv -> GroupQueryAttention
  (rotary inside, KV cache in/out) -> o -> SkipSimplifiedLayerNorm -> gate_up -> Split -> SiLU*up
  -> down ... -> SkipSimplifiedLayerNorm -> Slice(logits_to_keep) -> lm_head [-> exact top-k]
  -> logits

Linear layers that read the same input are packed into one MatMul, as onnxruntime-genai does:
q/k/v (GroupQueryAttention takes the packed query) and gate/up. Every packed group y = x W^T (+ b)
becomes y = x W^T (+ b) + (x A) B, where A [in, r] and B [r, out] are graph inputs with rank-0
initializers as defaults (empty slots multiply by empty matrices and add exact zeros), and
onnxruntime's adapter files (or bound OrtValues) override them per run without touching the base
weights. One slot per group, not per layer, because each slot costs a few small operators per
token (measured: per-layer slots cost 30% of decode speed, per-group slots 15%). Calls without
an adapter skip them altogether: add_base_path wraps the graph in If(adapters_active), whose
else-branch is the same graph without slot operators. A packed group's slot is batched:
A [parts, in, r] (one x A_p per member) and B [chunks, r, chunk], the group's output cut into
equal chunks, so no zeros are stored between members (see linear() and onnx_adapter.py). The
embedding and the lm_head have LoRA slots too (x += A[ids] B for the embedding).

slot_set "full" adds, per group, an output scale (ones), an overridable bias (the
base's, or zeros) and, on down_proj, an input scale (ones):
    y = ((x * s_in) W^T + (x * s_in) A B) * s_out + bias
which is what IA3 (scales on k/v outputs and the down_proj input), DoRA (a per-output magnitude
scale, computed at export) and bias tuning / lora_bias (a new bias) need. "lora" leaves them out
for the last few percent of decode speed. "none" has no slot at all, for bases with an adapter
merged in (--merge): empty slots cost ~12% of decode speed on SmolLM2 int4-pure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edgepeft.errors import UnsupportedModel, require
from edgepeft.runtime_contract import ADAPTERS_ACTIVE, LOGITS_TO_KEEP

from .hf_base import BaseModel

MS = "com.microsoft"
SLOT_SETS = ("full", "lora", "none")
OPSET = 17


def slot_names(module: str) -> tuple[str, str]:
    """Graph input names of a linear layer's LoRA slot (A, B)."""
    return f"lora.{module}.A", f"lora.{module}.B"


def kv_names(layer: int) -> tuple[str, str, str, str]:
    return (f"past_key_values.{layer}.key", f"past_key_values.{layer}.value",
            f"present.{layer}.key", f"present.{layer}.value")


@dataclass
class _Graph:
    np_dtype: type
    onnx_dtype: int
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    lora_nodes: list = field(default_factory=list)
    base_matmuls: dict = field(default_factory=dict)  # MatMul node -> torch module that reads its input

    def __post_init__(self):
        self.h = require("onnx", "export").helper

    def init(self, name: str, arr: np.ndarray, cast: bool = True) -> str:
        nh = require("onnx", "export").numpy_helper
        if cast:
            arr = arr.astype(self.np_dtype)
        self.inits.append(nh.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str] | int, name: str, domain: str = "", **attrs):
        if isinstance(outputs, int):
            outputs = [f"{name}/out{i}" for i in range(outputs)]
        self.nodes.append(self.h.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def head_is_tied(base: BaseModel) -> bool:
    """Whether the lm_head is the embedding table (after any --merge), as exact_head needs."""
    head, embed = base.model.lm_head.weight, base.model.model.embed_tokens.weight
    return head.shape == embed.shape and bool((head == embed).all())


def build_decoder(base: BaseModel, dtype: str = "fp32", context_length: int | None = None,
                  fp16_embedding: bool = False, slot_set: str = "full", exact_head_top_k: int = 0):
    """Return (ModelProto, info) for `base`; info lists slots and KV layout for the manifest.

    dtype is the float type of activations, weights and slots ("fp32" or "fp16"); int4/int8
    quantize the fp32 graph afterwards (see onnx_quant.py), and pass fp16_embedding: the
    embedding table (not a MatMul, so not quantized) is then stored in fp16 and cast after the
    lookup, halving the largest tensor of small models at an error far below 4/8-bit weights'.
    slot_set: "full" (LoRA, scale and bias slots), "lora" (LoRA slots only) or "none" (no slots:
    a base that runs merged adapters only, at the speed of a graph without adapter operators).
    exact_head_top_k > 0 (a tied lm_head with fp16_embedding; see exact_head()) recomputes each
    position's k largest head logits from the fp16 embedding table."""
    if slot_set not in SLOT_SETS:
        raise UnsupportedModel(f"unknown slot set {slot_set!r} (choose from {', '.join(SLOT_SETS)})")
    onnx = require("onnx", "export")
    torch = require("torch", "export")
    TP = onnx.TensorProto
    np_dtype, onnx_dtype = (np.float16, TP.FLOAT16) if dtype == "fp16" else (np.float32, TP.FLOAT)
    g = _Graph(np_dtype, onnx_dtype)
    h = g.h
    d = base.dims
    L = d["num_layers"]
    nh, nkv, hd = d["num_heads"], d["num_kv_heads"], d["head_dim"]
    ctx = int(context_length or min(d["max_position_embeddings"], 8192))
    model = base.model
    inner = model.model

    # ---- inputs ------------------------------------------------------------------------------
    g.inputs.append(h.make_tensor_value_info("input_ids", TP.INT64, ["batch", "seq"]))
    g.inputs.append(h.make_tensor_value_info("attention_mask", TP.INT64, ["batch", "total_seq"]))
    for i in range(L):
        pk, pv, ok, ov = kv_names(i)
        for n in (pk, pv):
            g.inputs.append(h.make_tensor_value_info(n, onnx_dtype, ["batch", nkv, "past_seq", hd]))
        for n in (ok, ov):
            g.outputs.append(h.make_tensor_value_info(n, onnx_dtype, ["batch", nkv, "present_seq", hd]))

    # GroupQueryAttention takes per-sequence lengths (total - 1) and the total length as int32.
    mask_sum = g.node("ReduceSum", ["attention_mask", g.init("const.axes1", np.array([1], np.int64), cast=False)],
                      1, "/seqlens/ReduceSum", keepdims=0)
    seqlens = g.node("Sub", [mask_sum, g.init("const.one_i64", np.array(1, np.int64), cast=False)], 1, "/seqlens/Sub")
    seqlens = g.node("Cast", [seqlens], 1, "/seqlens/Cast", to=TP.INT32)
    mask_shape = g.node("Shape", ["attention_mask"], 1, "/total/Shape")
    total = g.node("Gather", [mask_shape, g.init("const.one_idx", np.array(1, np.int64), cast=False)], 1, "/total/Gather", axis=0)
    total = g.node("Cast", [total], 1, "/total/Cast", to=TP.INT32)

    # Rotary tables from the model's own rotary module, so every rope variant transformers
    # implements (llama3, linear, dynamic at load, yarn scaling) comes out exactly as in PyTorch.
    with torch.no_grad():
        pos = torch.arange(ctx).unsqueeze(0)
        cos, sin = inner.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)
    cos_cache = g.init("rotary.cos_cache", _np(cos[0, :, : hd // 2]))
    sin_cache = g.init("rotary.sin_cache", _np(sin[0, :, : hd // 2]))

    slots = []
    full = slot_set == "full"

    def vector_slot(name: str, size: int, default: np.ndarray) -> str:
        g.inputs.append(h.make_tensor_value_info(name, onnx_dtype, [size]))
        return g.init(name, default)

    def linear(x: str, prefix: str | None, group: str, parent, members: tuple[str, ...],
               in_scale: bool = False) -> str:
        """One MatMul for `members` (linear layers of `parent` that read the same input, their
        outputs concatenated), plus one LoRA slot pair for the whole group; with full slots also
        an output scale, an overridable bias and (in_scale) an input scale:
            y = ((x * s_in) W^T + (x * s_in) A B) * s_out + bias"""
        mods = [getattr(parent, m) for m in members]
        module = f"{prefix}.{group}" if prefix else group
        name = f"/{prefix}/{group}" if prefix else f"/{group}"
        w = np.concatenate([_np(m.weight) for m in mods], axis=0)  # [out_total, in]
        fan_in, fan_out = w.shape[1], w.shape[0]
        has_bias = any(m.bias is not None for m in mods)
        bias = np.concatenate([_np(m.bias) if m.bias is not None else np.zeros(m.weight.shape[0], np.float32)
                               for m in mods]) if has_bias else np.zeros(fan_out, np.float32)
        slot = {"module": module, "in": int(fan_in), "out": int(fan_out), "has_bias": has_bias}
        if full and in_scale:
            slot["scale_in"] = vector_slot(f"scale.{module}.in", fan_in, np.ones(fan_in))
            x = g.node("Mul", [x, slot["scale_in"]], 1, f"{name}/ScaleIn")
        y = g.node("MatMul", [x, g.init(f"{module}.weight_T", w.T)], 1, f"{name}/MatMul")
        g.base_matmuls[f"{name}/MatMul"] = f"{prefix}.{members[0]}" if prefix else members[0]
        if module == "lm_head" and exact_head_top_k:
            y = exact_head(x, y)
        if slot_set == "none":  # a base without hot-swap (merged adapters): the plain projection
            return g.node("Add", [y, g.init(f"{module}.bias", bias)], 1, f"{name}/BiasAdd") if has_bias else y
        a_name, b_name = slot_names(module)
        rank_dim = f"rank.{module}"
        g.lora_nodes += [f"{name}/lora/MatMulA", f"{name}/lora/MatMulB"]
        if len(mods) == 1:
            g.inputs.append(h.make_tensor_value_info(a_name, onnx_dtype, [fan_in, rank_dim]))
            g.inputs.append(h.make_tensor_value_info(b_name, onnx_dtype, [rank_dim, fan_out]))
            g.init(a_name, np.zeros((fan_in, 0)))
            g.init(b_name, np.zeros((0, fan_out)))
            xa = g.node("MatMul", [x, a_name], 1, f"{name}/lora/MatMulA")
            xab = g.node("MatMul", [xa, b_name], 1, f"{name}/lora/MatMulB")
        else:
            # A packed group's slot is batched, so that no weight is stored for the zeros a
            # block-diagonal B would hold (a third of a q/k/v slot's bytes; measured 7% of decode
            # speed with a rank-16 adapter on SmolLM2): A [parts, in, r] gives one x A_p per
            # member; the group's output columns are cut into equal chunks (the gcd of the
            # members' widths), chunk c reading part chunks[c]; B [chunks, r, chunk].
            outs = [int(m.weight.shape[0]) for m in mods]
            chunk = math.gcd(*outs)
            chunks = [p for p, o in enumerate(outs) for _ in range(o // chunk)]
            g.inputs.append(h.make_tensor_value_info(a_name, onnx_dtype, [len(mods), fan_in, rank_dim]))
            g.inputs.append(h.make_tensor_value_info(b_name, onnx_dtype, [len(chunks), rank_dim, chunk]))
            g.init(a_name, np.zeros((len(mods), fan_in, 0)))
            g.init(b_name, np.zeros((len(chunks), 0, chunk)))
            xa = g.node("MatMul", [x, a_name], 1, f"{name}/lora/MatMulA")  # [parts, seq, r] (batch 1)
            if len(chunks) != len(mods):
                xa = g.node("Gather", [xa, g.init(f"{module}.lora_chunks", np.array(chunks, np.int64), cast=False)],
                            1, f"{name}/lora/Gather", axis=0)
            xab = g.node("MatMul", [xa, b_name], 1, f"{name}/lora/MatMulB")  # [chunks, seq, chunk]
            xab = g.node("Transpose", [xab], 1, f"{name}/lora/Transpose", perm=[1, 0, 2])
            xab = g.node("Reshape", [xab, g.init(f"{module}.lora_shape", np.array([1, -1, fan_out], np.int64),
                                                 cast=False)], 1, f"{name}/lora/Reshape")
            slot.update(chunk=chunk, chunks=chunks)
        y = g.node("Add", [y, xab], 1, f"{name}/lora/Add")
        if full:
            slot["scale_out"] = vector_slot(f"scale.{module}.out", fan_out, np.ones(fan_out))
            y = g.node("Mul", [y, slot["scale_out"]], 1, f"{name}/ScaleOut")
            slot["bias"] = vector_slot(f"bias.{module}", fan_out, bias)
            y = g.node("Add", [y, slot["bias"]], 1, f"{name}/BiasAdd")
        elif has_bias:
            y = g.node("Add", [y, g.init(f"{module}.bias", bias)], 1, f"{name}/BiasAdd")
        parts, offset = [], 0
        for member, m in zip(members, mods):
            parts.append({"module": f"{prefix}.{member}" if prefix else member, "target": member,
                          "offset": offset, "out": int(m.weight.shape[0])})
            offset += int(m.weight.shape[0])
        slots.append({**slot, "A": a_name, "B": b_name, "parts": parts})
        return y

    def exact_head(x: str, y: str) -> str:
        """The k largest logits of each position, recomputed exactly: x · E[i] for their token
        ids i, from the fp16 embedding table the tied head shares (TopK, Gather, MatMul,
        ScatterElements). The head itself can then be 4-bit: what sampling reads (the top of the
        distribution) is exact, the rest carries 4-bit error. Measured on SmolLM2-135M int4 (k=64
        against the head at 8 bits): decode +12%, 14 MiB smaller, verify's base KL 0.077 against
        0.071 (sentiment adapter 0.136 against 0.130). Only the rows logits_to_keep keeps pay
        for it: one per prefill and decode step."""
        k = g.init("const.exact_head_k", np.array([min(exact_head_top_k, vocab)], np.int64), cast=False)
        _, ids = g.node("TopK", [y, k], 2, "/lm_head/exact/TopK", axis=-1, largest=1, sorted=0)
        rows = g.node("Gather", ["model.embed_tokens.weight", ids], 1, "/lm_head/exact/Gather", axis=0)
        rows = g.node("Cast", [rows], 1, "/lm_head/exact/Cast", to=onnx_dtype)  # [batch, seq, k, hidden]
        last = g.init("const.last_axis", np.array([-1], np.int64), cast=False)
        col = g.node("Unsqueeze", [x, last], 1, "/lm_head/exact/Unsqueeze")  # [batch, seq, hidden, 1]
        exact = g.node("MatMul", [rows, col], 1, "/lm_head/exact/MatMul")
        exact = g.node("Squeeze", [exact, last], 1, "/lm_head/exact/Squeeze")
        return g.node("ScatterElements", [y, ids, exact], 1, "/lm_head/exact/Scatter", axis=-1)

    def embedding_slot(x: str, vocab: int, hidden: int) -> str:
        """Embedding LoRA (PEFT's lora_embedding_A/B): x += A[ids] B, A [vocab, r], B [r, hidden]."""
        a_name, b_name = slot_names("model.embed_tokens")
        g.inputs.append(h.make_tensor_value_info(a_name, onnx_dtype, [vocab, "rank.model.embed_tokens"]))
        g.inputs.append(h.make_tensor_value_info(b_name, onnx_dtype, ["rank.model.embed_tokens", hidden]))
        g.init(a_name, np.zeros((vocab, 0)))
        g.init(b_name, np.zeros((0, hidden)))
        xa = g.node("Gather", [a_name, "input_ids"], 1, "/embed/lora/GatherA")
        xab = g.node("MatMul", [xa, b_name], 1, "/embed/lora/MatMulB")
        g.lora_nodes.append("/embed/lora/MatMulB")
        x = g.node("Add", [x, xab], 1, "/embed/lora/Add")
        slots.append({"module": "model.embed_tokens", "embedding": True, "in": int(vocab), "out": int(hidden),
                      "has_bias": False, "A": a_name, "B": b_name,
                      "parts": [{"module": "model.embed_tokens", "target": "embed_tokens", "offset": 0, "out": int(hidden)}]})
        return x

    eps = d["rms_norm_eps"]
    embed = _np(inner.embed_tokens.weight)
    if exact_head_top_k and not (fp16_embedding and dtype == "fp32" and head_is_tied(base)):
        raise UnsupportedModel("an exact head top-k needs a tied lm_head and an fp16 embedding table")
    if fp16_embedding and dtype == "fp32":
        table = g.init("model.embed_tokens.weight", embed.astype(np.float16), cast=False)
        x = g.node("Gather", [table, "input_ids"], 1, "/embed/Gather")
        x = g.node("Cast", [x], 1, "/embed/Cast", to=onnx_dtype)
    else:
        x = g.node("Gather", [g.init("model.embed_tokens.weight", embed), "input_ids"], 1, "/embed/Gather")
    vocab, hidden = embed.shape
    if slot_set != "none":
        x = embedding_slot(x, vocab, hidden)
    residual = None
    pending = x  # output of the previous block, to be added to the residual stream

    def norm(inp: str, weight, name: str) -> str:
        """RMSNorm of residual+inp (fused skip add); updates the residual stream."""
        nonlocal residual
        w = g.init(f"{name}.weight", _np(weight))
        if residual is None:
            residual = inp
            return g.node("SimplifiedLayerNormalization", [inp, w], 1, f"/{name}/Norm",
                          axis=-1, epsilon=eps, stash_type=1)
        outs = [f"/{name}/out", "", "", f"/{name}/residual"]
        g.node("SkipSimplifiedLayerNormalization", [inp, residual, w], outs, f"/{name}/SkipNorm",
               domain=MS, epsilon=eps)
        residual = outs[3]
        return outs[0]

    inter = d["intermediate_size"]
    split_sizes = g.init("const.gate_up_split", np.array([inter, inter], np.int64), cast=False)
    for i, layer in enumerate(inner.layers):
        p = f"model.layers.{i}"
        hnorm = norm(pending, layer.input_layernorm.weight, f"{p}.input_layernorm")
        att = layer.self_attn
        # Packed q/k/v: GroupQueryAttention splits a packed query input itself.
        qkv = linear(hnorm, f"{p}.self_attn", "qkv_proj", att, ("q_proj", "k_proj", "v_proj"))
        pk, pv, ok, ov = kv_names(i)
        attn_out = f"/{p}/attn/GQA/out"
        g.node("GroupQueryAttention", [qkv, "", "", pk, pv, seqlens, total, cos_cache, sin_cache],
               [attn_out, ok, ov], f"/{p}/attn/GQA", domain=MS,
               num_heads=nh, kv_num_heads=nkv, scale=float(hd ** -0.5), do_rotary=1,
               rotary_interleaved=0, local_window_size=int(d["sliding_window"] or -1))
        o = linear(attn_out, f"{p}.self_attn", "o_proj", att, ("o_proj",))
        hnorm = norm(o, layer.post_attention_layernorm.weight, f"{p}.post_attention_layernorm")
        mlp = layer.mlp
        gate_up = linear(hnorm, f"{p}.mlp", "gate_up_proj", mlp, ("gate_proj", "up_proj"))
        gate, up = g.node("Split", [gate_up, split_sizes],
                          2, f"/{p}/mlp/Split", axis=-1)
        sig = g.node("Sigmoid", [gate], 1, f"/{p}/mlp/act/Sigmoid")
        act = g.node("Mul", [gate, sig], 1, f"/{p}/mlp/act/Mul")
        prod = g.node("Mul", [act, up], 1, f"/{p}/mlp/Mul")
        pending = linear(prod, f"{p}.mlp", "down_proj", mlp, ("down_proj",), in_scale=True)

    final = norm(pending, inner.norm.weight, "model.norm")
    # logits_to_keep (transformers' argument, same meaning): logits for the last n positions
    # only, 0 (the default) for all. A prompt's prefill needs one row, and each row costs a
    # vocab-wide lm_head row and its output (SmolLM2: 28M multiply-adds and 192 KiB a position);
    # llama.cpp likewise computes only the logits a batch asks for.
    g.inputs.append(h.make_tensor_value_info(LOGITS_TO_KEEP, TP.INT64, [1]))
    start = g.node("Neg", [g.init(LOGITS_TO_KEEP, np.zeros(1, np.int64), cast=False)], 1, "/logits_to_keep/Neg")
    final = g.node("Slice", [final, start, g.init("const.int64_max", np.array([np.iinfo(np.int64).max]), cast=False),
                             "const.axes1"], 1, "/logits_to_keep/Slice")
    linear(final, None, "lm_head", model, ("lm_head",))
    g.nodes[-1].output[0] = "logits"  # the lm_head group's last operator produces the graph output
    g.outputs.insert(0, h.make_tensor_value_info("logits", onnx_dtype, ["batch", "kept_seq", d["vocab_size"]]))

    graph = h.make_graph(g.nodes, "edgepeft_decoder", g.inputs, g.outputs, g.inits)
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET), h.make_opsetid(MS, 1)],
                         producer_name="edgepeft")
    proto.ir_version = 8
    info = {
        "context_length": ctx,
        "dtype": dtype,
        "slots": slots,
        "slot_set": slot_set,
        "lora_nodes": g.lora_nodes,
        "base_matmuls": g.base_matmuls,
        "exact_head_top_k": int(exact_head_top_k),
        "kv": {"num_layers": L, "num_kv_heads": nkv, "head_dim": hd},
    }
    return proto, info


def add_base_path(proto, info: dict):
    """Return `proto` (a decoder with slots, quantized or not) as If(adapters_active): the
    then-branch is the graph as built, the else-branch the same graph without its slot operators,
    for calls with no adapter active. Both branches read the same outer-scope initializers, so the
    weights are stored and prepacked once. Empty slots cost a few small operators per projection
    even at rank 0 (measured on SmolLM2 int4: 8-29% of decode speed); the base path adds one
    Cast and one If per call, and decodes at 0.91-0.94x a slot-free graph (docs/design.md).
    Slot adapters set the flag (their files carry it as 1, see
    edgepeft.runtime_contract.ADAPTERS_ACTIVE); prompt-learning adapters only fill the KV cache
    and run the base path.

    Why an If and not a second session: a second onnxruntime session would load and prepack its
    own copy of every weight. Sets info["base_path"], which the manifest records (adapter files
    for such a base carry the flag)."""
    onnx = require("onnx", "export")

    h, TP = onnx.helper, onnx.TensorProto
    g = proto.graph
    outputs = [o.name for o in g.output]
    prelude = [n for n in g.node if n.name.startswith(("/seqlens/", "/total/"))]
    body = [n for n in g.node if not n.name.startswith(("/seqlens/", "/total/"))]
    keeps_bias = {s["module"] for s in info["slots"] if s.get("has_bias")}

    def is_slot_op(n) -> str | None:
        """For a slot operator, the value it passes through when the slot is empty ("" if it
        only feeds other slot operators); None for a base operator."""
        if "/lora/" in n.name:
            return n.input[0] if n.name.endswith("/lora/Add") else ""
        if n.op_type == "Mul" and n.input[1].startswith("scale."):
            return n.input[0]
        if n.op_type == "Add" and n.input[1].startswith("bias.") and n.input[1][5:] not in keeps_bias:
            return n.input[0]
        return None

    def branch(tag: str, strip: bool):
        nodes, alias = [], {}
        for n in body:
            through = is_slot_op(n) if strip else None
            if through is None:
                nodes.append(onnx.NodeProto.FromString(n.SerializeToString()))
            elif through:
                alias[n.output[0]] = through
        resolve = lambda v: resolve(alias[v]) if v in alias else v  # noqa: E731
        for n in nodes:
            n.input[:] = [resolve(v) for v in n.input]
        for out in outputs:  # a graph output written by a dropped operator: its producer writes it
            if out in alias:
                src = resolve(out)
                for n in nodes:
                    n.input[:] = [out if v == src else v for v in n.input]
                    n.output[:] = [out if v == src else v for v in n.output]
        produced = {v for n in nodes for v in n.output if v}
        rename = {v: f"{tag}:{v}" for v in produced}  # subgraph values may not shadow the outer graph's
        for n in nodes:
            n.name = f"{tag}:{n.name}"
            n.input[:] = [rename.get(v, v) for v in n.input]
            n.output[:] = [rename.get(v, v) for v in n.output]
        outs = [h.make_tensor_value_info(rename[o.name], o.type.tensor_type.elem_type, None) for o in g.output]
        return h.make_graph(nodes, f"{tag}_path", [], outs)

    g.input.append(h.make_tensor_value_info(ADAPTERS_ACTIVE, TP.FLOAT, [1]))
    g.initializer.append(onnx.numpy_helper.from_array(np.zeros(1, np.float32), ADAPTERS_ACTIVE))
    cond = h.make_node("Cast", [ADAPTERS_ACTIVE], ["/adapters/active"], name="/adapters/Cast", to=TP.BOOL)
    choose = h.make_node("If", ["/adapters/active"], outputs, name="/adapters/If",
                         then_branch=branch("slots", False), else_branch=branch("base", True))
    del g.node[:]
    g.node.extend(prelude + [cond, choose])
    info["base_path"] = True
    return proto
