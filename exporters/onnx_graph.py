"""Build the ONNX decoder graph for a base of any family in exporters/archs, with swappable LoRA slots.

Why not Optimum: Optimum exports merged models only (no adapter inputs), and its traced graph
keeps attention as dozens of primitive ops. onnxruntime-genai reaches its speed with a graph made
of onnxruntime's fused operators, built directly from the weights; we do the same, plus the
adapter slots, in one pass with onnx.helper:

  Gather(embed) [* sqrt(hidden)] -> [SimplifiedLayerNorm | SkipSimplifiedLayerNorm] -> qkv
  [-> q/k norms] -> GroupQueryAttention (rotary inside, KV cache in/out) -> o [-> norm]
  -> SkipSimplifiedLayerNorm -> gate_up -> Split -> act(gate)*up -> down [-> norm] ...
  -> SkipSimplifiedLayerNorm -> Slice(logits_to_keep) -> lm_head [-> exact top-k] [-> soft-cap]
  -> logits

The bracketed steps, the activation, the norms' weights and each layer's window, rotary table
and attention scale come from the family's description (exporters/archs: Arch and Layout);
nothing here branches on the model type. A hybrid family's layers differ in their token mixer
(Layout.mixers): attention as above (with Qwen3.5's output gate: o_proj reads the attention
times sigmoid of q_proj's second half per head), a gated short convolution (onnx_conv.py) or a
gated DeltaNet (onnx_deltanet.py), whose states are graph inputs and outputs where an attention
layer has its KV cache.

Linear layers that read the same input are packed into one MatMul, as onnxruntime-genai does:
q/k/v (GroupQueryAttention takes the packed query) and gate/up; each packed group has one adapter
slot (onnx_slots.py). Calls without an adapter skip the slots altogether: add_base_path
(onnx_base_path.py) wraps the graph in If(adapters_active), whose else-branch is the same graph
without slot operators.

The builder below adds the blocks in graph order, so that the graph reads as the pipeline above.
Graph inputs and outputs come from edgepeft.runtime_contract, which the runtime reads too.
"""

from __future__ import annotations

import numpy as np

from edgepeft.errors import UnsupportedModel, require
from edgepeft.runtime_contract import ATTENTION_MASK, INPUT_IDS, kv_names

from .archs import ATTENTION_MIXER, DELTA_NET, MLP, SHORT_CONV
from .checkpoint import materialized
from .hf_base import BaseModel
from .onnx_attention import AttentionBlock
from .onnx_base_path import add_base_path
from .onnx_conv import add_state_io, short_conv
from .onnx_deltanet import gated_deltanet
from .onnx_ends import GraphEnds, head_is_tied
from .onnx_layer_inputs import LayerInputs
from .onnx_rotary import add_rotary_tables
from .onnx_slots import SLOT_SETS, Graph, Projections, slot_names, to_numpy

__all__ = ["SLOT_SETS", "add_base_path", "build_decoder", "head_is_tied", "kv_names", "slot_names"]

MS = "com.microsoft"
OPSET = 17
# onnxruntime's GroupQueryAttention kernels take head sizes in multiples of 16 only.
GQA_HEAD_MULTIPLE = 16


def build_decoder(base: BaseModel, dtype: str = "fp32", context_length: int | None = None,
                  fp16_embedding: bool = False, slot_set: str = "full", exact_head_top_k: int = 0,
                  quantizer=None, external=None):
    """Return (ModelProto, info) for `base`; info lists slots and KV layout for the manifest, and
    what the quantizer and add_base_path need to know about the operators.

    dtype is the float type of activations, weights and slots ("fp32" or "fp16"); int4/int8
    quantize the fp32 graph afterwards (see onnx_quant.py), and pass fp16_embedding: the
    embedding table (not a MatMul, so not quantized) is then stored in fp16 and cast after the
    lookup, halving the largest tensor of small models at an error far below 4/8-bit weights'.
    slot_set: "full" (LoRA, scale and bias slots), "lora" (LoRA slots only) or "none" (no slots:
    a base that runs merged adapters only, at the speed of a graph without adapter operators).
    exact_head_top_k > 0 (a tied lm_head with fp16_embedding; see _DecoderBuilder.exact_head)
    recomputes each position's k largest head logits from the fp16 embedding table.
    quantizer (onnx_quant.WeightQuantizer) takes each base MatMul's weight as it is made; the
    graph then holds no float weight for them (to_matmul_nbits writes their nodes).
    external (onnx_external.ExternalData): the fp16 embedding table goes to the data file as it
    is converted, and the graph holds a reference to it."""
    builder = _DecoderBuilder(base, dtype, context_length, fp16_embedding, slot_set, exact_head_top_k)
    builder.g.quantizer, builder.g.external = quantizer, external
    return builder.build()


def check_onnx_shapes(where, lay) -> None:
    """Refuse, at export, a shape onnxruntime's fused operators cannot run (else every call of the
    bundle would fail inside onnxruntime): each attention layer's head size and rotary width."""
    for i, mixer in enumerate(lay.mixers):
        if mixer != ATTENTION_MIXER:
            continue
        hd, rotary_dim = lay.heads[i][1], lay.rotary_dims[i]
        if hd % GQA_HEAD_MULTIPLE:
            raise UnsupportedModel(f"{where}: head_dim {hd} cannot run on onnxruntime's GroupQueryAttention "
                                   f"(head sizes must be multiples of {GQA_HEAD_MULTIPLE}); export --format gguf "
                                   "instead")
        if (rotary_dim // 2) % 8:  # its rotary tables: half the rotary width, a multiple of 8
            raise UnsupportedModel(f"{where}: a rotary width of {rotary_dim} (partial_rotary_factor) cannot run on "
                                   "onnxruntime's GroupQueryAttention (half of it must be a multiple of 8); "
                                   "export --format gguf instead")


class _DecoderBuilder(GraphEnds, AttentionBlock, LayerInputs):
    """Builds the decoder in graph order, one method per block: inputs, attention lengths, rotary
    tables, embedding (and its slot), each decoder layer, the head. Projections (onnx_slots.py)
    adds every projection with its slot."""

    def __init__(self, base: BaseModel, dtype: str, context_length: int | None, fp16_embedding: bool,
                 slot_set: str, exact_head_top_k: int):
        if slot_set not in SLOT_SETS:
            raise UnsupportedModel(f"unknown slot set {slot_set!r} (choose from {', '.join(SLOT_SETS)})")
        self.TP = require("onnx", "export").TensorProto
        self.torch = require("torch", "export")
        np_dtype, onnx_dtype = (np.float16, self.TP.FLOAT16) if dtype == "fp16" else (np.float32, self.TP.FLOAT)
        self.g = Graph(np_dtype, onnx_dtype)
        self.base, self.d, self.dtype = base, base.dims, dtype
        self.arch, self.lay = base.arch, base.layout
        self.groups = {group.name: group for group in self.arch.groups}
        check_onnx_shapes(base.local_dir, self.lay)
        self.ctx = int(context_length or min(self.d["max_position_embeddings"], 8192))
        self.fp16_embedding = fp16_embedding and dtype == "fp32"
        self.slot_set = slot_set
        self.exact_head_top_k = exact_head_top_k
        if exact_head_top_k and not (self.fp16_embedding and head_is_tied(base)):
            raise UnsupportedModel("an exact head top-k needs a tied lm_head and an fp16 embedding table")
        self.proj = Projections(self.g, slot_set)
        self.residual: str | None = None  # the residual stream, from the first norm on
        self.kv_new: dict[int, list[str]] = {}  # a KV producer's new keys and values, for its consumers
        self.mixers = {ATTENTION_MIXER: self.attention_block, SHORT_CONV: self.short_conv_block,
                       DELTA_NET: self.deltanet_block}

    def build(self):
        self.inputs()
        self.attention_lengths()
        self.rotary_tables()
        x = self.embedding()
        if self.lay.per_layer_input:
            self.per_layer_inputs(x)
        for i, layer in enumerate(self.base.model.model.layers):
            with materialized(self.base, layer):  # one decoder layer's weights at a time
                x = self.layer(i, layer, x)
        with materialized(self.base, getattr(self.base.model.model, self.arch.final_norm), self.base.model.lm_head):
            self.head(x)
        return self.finish()

    def inputs(self) -> None:
        """The token ids, the attention mask, and each attention layer's KV cache in and out
        (each state-carrying layer's states instead, in a hybrid family)."""
        g, TP, d = self.g, self.TP, self.d
        g.add_input(INPUT_IDS, TP.INT64, ["batch", "seq"])
        g.add_input(ATTENTION_MASK, TP.INT64, ["batch", "total_seq"])
        for i in range(d["num_layers"]):
            for state, shape in self.lay.states[i].items():
                add_state_io(g, i, state, shape)
        for i in self.lay.attention_layers():
            nkv, hd = self.lay.heads[i]
            pk, pv, ok, ov = kv_names(i)
            for n in (pk, pv):
                g.add_input(n, g.onnx_dtype, ["batch", nkv, "past_seq", hd])
            for n in (ok, ov):
                g.outputs.append(g.h.make_tensor_value_info(n, g.onnx_dtype, ["batch", nkv, "present_seq", hd]))

    def attention_lengths(self) -> None:
        """GroupQueryAttention takes per-sequence lengths (total - 1) and the total length as int32.
        Both paths of the base path share them (info["prelude"])."""
        g, TP = self.g, self.TP
        first = len(g.nodes)
        self.axes1 = g.init("const.axes1", np.array([1], np.int64), cast=False)
        mask_sum = g.node("ReduceSum", [ATTENTION_MASK, self.axes1], 1, "/seqlens/ReduceSum", keepdims=0)
        seqlens = g.node("Sub", [mask_sum, g.init("const.one_i64", np.array(1, np.int64), cast=False)], 1,
                         "/seqlens/Sub")
        self.seqlens = g.node("Cast", [seqlens], 1, "/seqlens/Cast", to=TP.INT32)
        mask_shape = g.node("Shape", [ATTENTION_MASK], 1, "/total/Shape")
        total = g.node("Gather", [mask_shape, g.init("const.one_idx", np.array(1, np.int64), cast=False)], 1,
                       "/total/Gather", axis=0)
        self.total = g.node("Cast", [total], 1, "/total/Cast", to=TP.INT32)
        self.prelude = [n.name for n in g.nodes[first:]]

    def rotary_tables(self) -> None:
        """Each rotary table the layers use (onnx_rotary.py); a LongRoPE choice between two
        tables joins the prelude, both paths reading it."""
        lay = self.lay
        widths = {lay.rope[i]: lay.rotary_dims[i] for i, m in enumerate(lay.mixers) if m == ATTENTION_MIXER}
        self.rotary, ops, self.longrope_switch = add_rotary_tables(
            self.g, self.torch, self.base.model, widths, self.ctx, self.total)
        self.prelude += ops

    def norm_weight(self, weight, name: str) -> str:
        """A norm's weight as the graph applies it: the family's offset folded in (Gemma's 1 + w,
        which transformers computes in float32 too)."""
        w = to_numpy(weight)
        return self.g.init(f"{name}.weight", w + np.float32(self.arch.norms.offset) if self.arch.norms.offset else w)

    def plain_norm(self, inp: str, weight, name: str, axis: int = -1) -> str:
        """RMSNorm of inp alone (a block's output norm, a q/k head norm); the residual stream
        is untouched."""
        return self.g.node("SimplifiedLayerNormalization", [inp, self.norm_weight(weight, name)], 1, f"/{name}/Norm",
                           axis=axis, epsilon=self.d["rms_norm_eps"], stash_type=1)

    def norm(self, inp: str, weight, name: str) -> str:
        """RMSNorm of residual+inp (fused skip add); updates the residual stream."""
        g, eps = self.g, self.d["rms_norm_eps"]
        w = self.norm_weight(weight, name)
        if self.residual is None:
            self.residual = inp
            return g.node("SimplifiedLayerNormalization", [inp, w], 1, f"/{name}/Norm",
                          axis=-1, epsilon=eps, stash_type=1)
        outs = [f"/{name}/out", "", "", f"/{name}/residual"]
        g.node("SkipSimplifiedLayerNormalization", [inp, self.residual, w], outs, f"/{name}/SkipNorm",
               domain=MS, epsilon=eps)
        self.residual = outs[3]
        return outs[0]

    def group(self, x: str, layer_prefix: str, name: str, layer, in_scale: bool = False) -> str:
        """The family's projection group `name` of a decoder layer, with its slot."""
        grp = self.groups[name]
        parent = getattr(layer, grp.parent)
        members = tuple(m for m in grp.members if getattr(parent, m, None) is not None)  # a KV consumer: q only
        return self.proj.linear(x, f"{layer_prefix}.{grp.parent}", name, parent, members, in_scale=in_scale)

    def layer(self, i: int, layer, x: str) -> str:
        """Decoder layer i: attention, then the gated MLP, each after a norm (and, where the family
        has them, followed by one). Returns the block's output, which the next norm adds to the
        residual stream."""
        g, p, norms = self.g, f"model.layers.{i}", self.arch.norms
        x = self.norm(x, getattr(layer, norms.pre_attention).weight, f"{p}.{norms.pre_attention}")
        o = self.mixers[self.lay.mixers[i]](i, layer, x)
        if norms.post_attention:
            o = self.plain_norm(o, getattr(layer, norms.post_attention).weight, f"{p}.{norms.post_attention}")
        x = self.norm(o, getattr(layer, norms.pre_mlp).weight, f"{p}.{norms.pre_mlp}")
        gate_up = self.group(x, p, "gate_up_proj", layer)
        # the layer's MLP width (Gemma 4's double-wide layers): half the packed (or fused) output
        grp = self.groups["gate_up_proj"]
        inter = sum(int(getattr(getattr(layer, grp.parent), m).weight.shape[0]) for m in grp.members) // 2
        split = g.const(f"const.gate_up_split.{inter}", [inter, inter])
        gate, up = g.node("Split", [gate_up, split], 2, f"/{p}/{MLP}/Split", axis=-1)
        prod = g.node("Mul", [self.activation(gate, f"/{p}/{MLP}/act"), up], 1, f"/{p}/{MLP}/Mul")
        out = self.group(prod, p, "down_proj", layer, in_scale=True)
        if norms.post_mlp:
            out = self.plain_norm(out, getattr(layer, norms.post_mlp).weight, f"{p}.{norms.post_mlp}")
        if self.lay.per_layer_input or self.arch.layer_scalar:
            return self.layer_end(i, layer, out)
        return out

    def short_conv_block(self, i: int, layer, x: str) -> str:
        """The gated short convolution (onnx_conv.py), its state in and out."""
        sc, p = self.arch.block(SHORT_CONV), f"model.layers.{i}"
        return short_conv(self.g, i, getattr(layer, sc.parent), sc.conv, x, f"{p}.{sc.parent}",
                          lambda y, group: self.group(y, p, group, layer), sc.in_group, sc.out_group)

    def deltanet_block(self, i: int, layer, x: str) -> str:
        """The gated DeltaNet (onnx_deltanet.py), its convolution and recurrent states in and out."""
        spec, p = self.arch.block(DELTA_NET), f"model.layers.{i}"
        return gated_deltanet(self.g, i, getattr(layer, spec.parent), spec, self.base.config, x, f"{p}.{spec.parent}",
                              lambda y, group: self.group(y, p, group, layer))

    def activation(self, x: str, name: str) -> str:
        """The MLP's gate activation: SiLU as x * sigmoid(x), or tanh GELU (FastGelu is
        onnxruntime's tanh approximation, transformers' gelu_pytorch_tanh)."""
        if self.arch.activation == "gelu_tanh":
            return self.g.node("FastGelu", [x], 1, f"{name}/FastGelu", domain=MS)
        sig = self.g.node("Sigmoid", [x], 1, f"{name}/Sigmoid")
        return self.g.node("Mul", [x, sig], 1, f"{name}/Mul")

    def kv_info(self) -> dict:
        """The manifest's kv: the KV cache's shape; where not every layer has one of its own, the
        layers that have (a hybrid's attention layers, a KV-sharing family's producers) and the
        others' states (state_names); where layers differ in head size, each KV layer's
        [KV heads, head size] (runtime_contract.kv_shape)."""
        d, lay = self.d, self.lay
        kv = {"num_layers": d["num_layers"], "num_kv_heads": d["num_kv_heads"], "head_dim": d["head_dim"]}
        layers = lay.attention_layers()
        if layers != list(range(d["num_layers"])):
            kv["layers"] = layers
            kv["states"] = [{"layer": i, "name": n, "shape": list(shape)}
                            for i, st in enumerate(lay.states) for n, shape in st.items()]
        if any(lay.heads[i] != (d["num_kv_heads"], d["head_dim"]) for i in layers):
            kv["heads"] = [list(lay.heads[i]) for i in layers]
        return kv

    def finish(self):
        g, h = self.g, self.g.h
        graph = h.make_graph(g.nodes, "edgepeft_decoder", g.inputs, g.outputs, g.inits)
        proto = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET), h.make_opsetid(MS, 1)],
                             producer_name="edgepeft")
        proto.ir_version = 8
        info = {
            "context_length": self.ctx,
            "dtype": self.dtype,
            "slots": self.proj.slots,
            "slot_set": self.slot_set,
            "row_masks": self.slot_set != "none",
            "lora_nodes": g.lora_nodes,
            "base_matmuls": g.base_matmuls,
            "exact_head_top_k": int(self.exact_head_top_k),
            "kv": self.kv_info(),
            "projections": g.projections,
            "members": g.members,
            "slot_ops": g.slot_ops,
            "prelude": self.prelude,
            "longrope_switch": self.longrope_switch,
        }
        return proto, info
