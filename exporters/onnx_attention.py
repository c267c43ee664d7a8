"""The decoder graph's attention block (part of onnx_graph._DecoderBuilder): packed q/k/v,
q/k (and v) norms per head, GroupQueryAttention with rotary inside and the layer's KV cache in
and out, the output gate of Qwen3.5, o_proj.

Layers differ in head size and KV heads where the family says so (Layout.heads: Gemma 4's
full-attention layers). A KV-sharing consumer (Layout.kv_source: Gemma 4's last layers) has
q_proj only: its GroupQueryAttention reads the producer layer's past KV cache and the producer's
new keys and values of this call (normalised, before rotary), so it attends over exactly the
cache the producer writes; its own present outputs are left unread, and the consumer has no KV
cache input or output of its own."""

from __future__ import annotations

import numpy as np

from edgepeft.runtime_contract import kv_names

from .archs import ATTENTION

MS = "com.microsoft"


class AttentionBlock:
    """The attention methods of _DecoderBuilder (which sets g, d, lay, arch, rotary, seqlens,
    total, and provides group and plain_norm)."""

    def attention_block(self, i: int, layer, x: str) -> str:
        """Packed q/k/v (GroupQueryAttention splits a packed query input itself), attention, o."""
        p = f"model.layers.{i}"
        qkv = self.group(x, p, "qkv_proj", layer)
        out, gate = self.attention(i, qkv, getattr(layer, ATTENTION))
        if gate is not None:  # Qwen3.5: the attention output times sigmoid(gate)
            sig = self.g.node("Sigmoid", [gate], 1, f"/{p}/attn/gate/Sigmoid")
            out = self.g.node("Mul", [out, sig], 1, f"/{p}/attn/gate/Mul")
        return self.group(out, p, "o_proj", layer)

    def attention(self, i: int, qkv: str, att) -> tuple[str, str | None]:
        """GroupQueryAttention over layer i's packed q/k/v (split and normalised per head first
        for families with q/k norms), rotary inside, its KV cache in and out (a consumer's:
        its producer's). Returns its output and, for families with an output gate, the gate
        [batch, seq, heads * head_dim]."""
        d, lay, p, src = self.d, self.lay, f"model.layers.{i}", self.lay.kv_source[i]
        pk, pv, ok, ov = kv_names(src)
        qkv_in, gate = [qkv, "", ""], None
        if self.arch.qk_norm:
            qkv_in, gate = self.head_norms(i, qkv, att, f"{p}.{ATTENTION}")
        if src != i:  # a consumer: the producer's keys and values; its presents stay unread
            qkv_in = [qkv_in[0], *self.kv_new[src]]
            ok, ov = f"/{p}/attn/GQA/present_key", f"/{p}/attn/GQA/present_value"
        elif self.lay.kv_consumers():
            self.kv_new[i] = qkv_in[1:]
        cos, sin = self.rotary[lay.rope[i]]
        attrs = {"softcap": float(lay.attn_softcap)} if lay.attn_softcap else {}
        out = f"/{p}/attn/GQA/out"
        self.g.node("GroupQueryAttention", [*qkv_in, pk, pv, self.seqlens, self.total, cos, sin],
                    [out, ok, ov], f"/{p}/attn/GQA", domain=MS,
                    num_heads=d["num_heads"], kv_num_heads=lay.heads[i][0], scale=float(lay.attention_scale),
                    do_rotary=1, rotary_interleaved=0, local_window_size=int(lay.windows[i] or -1), **attrs)
        return out, gate

    def head_norms(self, i: int, qkv: str, att, prefix: str) -> tuple[list[str], str | None]:
        """q, k, v from the packed projection, q and k each RMS-normalised over every head
        (Qwen3's, Gemma 3's and 4's q_norm / k_norm; Gemma 4's v too, without weight), as
        GroupQueryAttention's three inputs; with an output gate (Qwen3.5), q_proj's heads are
        [query, gate] each, and the gate is returned. A KV-sharing consumer's projection is q
        alone: [q, "", ""]."""
        g, d, gated = self.g, self.d, self.arch.attn_output_gate
        nkv, hd = self.lay.heads[i]
        q_size, kv_size = d["num_heads"] * hd, nkv * hd
        per_head, flat = g.const(f"const.per_head.{hd}", [0, 0, -1, hd]), g.const("const.flat_heads", [0, 0, -1])
        if self.lay.kv_source[i] != i:
            q, k, v = qkv, None, None
        else:
            sizes = g.const(f"const.qkv_split.{q_size}.{kv_size}", [q_size * (2 if gated else 1), kv_size, kv_size])
            q, k, v = g.node("Split", [qkv, sizes], 3, f"/{prefix}/qkv/Split", axis=-1)
        gate = None
        if gated:
            q = g.node("Reshape", [q, g.const("const.gated_heads", [0, 0, -1, 2 * hd])], 1, f"/{prefix}/q/Reshape")
            q, gate = g.node("Split", [q, g.const("const.query_gate", [hd, hd])], 2, f"/{prefix}/q/Split", axis=-1)
            gate = g.node("Reshape", [gate, flat], 1, f"/{prefix}/gate/Flatten")
        norms = list(zip((q, k), self.arch.qk_norm_names))
        if self.arch.v_norm:
            norms.append((v, None))
        normed = []
        for x, norm in norms:
            if x is None:
                normed.append("")
                continue
            heads = g.node("Reshape", [x, per_head], 1, f"/{prefix}/{norm or 'v_norm'}/Reshape")
            if norm is None:  # no weight: ones
                w = self.g.init(f"{prefix}.v_norm.weight", np.ones(hd, np.float32))
                heads = g.node("SimplifiedLayerNormalization", [heads, w], 1, f"/{prefix}/v_norm/Norm",
                               axis=-1, epsilon=d["rms_norm_eps"], stash_type=1)
            else:
                heads = self.plain_norm(heads, getattr(att, norm).weight, f"{prefix}.{norm}")
            normed.append(g.node("Reshape", [heads, flat], 1, f"/{prefix}/{norm or 'v_norm'}/Flatten"))
        if not self.arch.v_norm:
            normed.append(v or "")
        return normed, gate
