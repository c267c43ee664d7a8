"""The two ends of the decoder graph onnx_graph.py builds: the token embedding (a Gather from
the float table, or from an fp16 table converted a block of rows at a time, plus its slot and
Gemma's scale) and the head (final norm, logits_to_keep, the lm_head with its slot, the exact
top-k recompute of a tied 4-bit head, Gemma 2's soft-cap). GraphEnds is a part of
onnx_graph._DecoderBuilder and reads the builder's graph, base and layout."""

from __future__ import annotations

import numpy as np

from edgepeft.runtime_contract import INPUT_IDS, LOGITS, LOGITS_TO_KEEP

from .checkpoint import EMBEDDING as EMBEDDING_WEIGHT
from .checkpoint import HEAD, checkpoint_name, materialized
from .hf_base import BaseModel
from .onnx_external import tensor
from .onnx_slots import EMBEDDING, to_numpy

TABLE_ROWS = 4096  # embedding rows converted to fp16 at a time


def head_is_tied(base: BaseModel) -> bool:
    """Whether the lm_head is the embedding table (after any --merge), as exact_head needs."""
    if base.model.lm_head.weight is base.model.model.embed_tokens.weight:
        return True
    if base.tensors is not None:  # a lazy base: compare the checkpoint's tables a block of rows at a time
        names = [checkpoint_name(base.tensors, n, base.dims["tie_word_embeddings"]) for n in (HEAD, EMBEDDING_WEIGHT)]
        if base.merged is None or not any(n in base.merged for n in names):
            return base.tensors.equal(*names)
    head, embed = base.tensor(HEAD), base.tensor(EMBEDDING_WEIGHT)
    return head.shape == embed.shape and bool((head == embed).all())


class GraphEnds:
    """The embedding and head blocks of _DecoderBuilder (which sets g, base, arch, lay, d, proj,
    slot_set, fp16_embedding, exact_head_top_k and axes1, and provides norm)."""

    def embedding(self) -> str:
        """The token embedding: a Gather (from an fp16 table, cast after the lookup, for int4/int8),
        plus its slot."""
        g = self.g
        if self.fp16_embedding:
            x = g.node("Gather", [self.fp16_table(), INPUT_IDS], 1, "/embed/Gather")
            x = g.node("Cast", [x], 1, "/embed/Cast", to=g.onnx_dtype)
        else:
            with materialized(self.base, self.base.model.model.embed_tokens):
                embed = to_numpy(self.base.model.model.embed_tokens.weight)
            x = g.node("Gather", [g.init(f"{EMBEDDING}.weight", embed), INPUT_IDS], 1, "/embed/Gather")
            del embed
        self.vocab, hidden = self.base.model.model.embed_tokens.weight.shape
        # Gemma scales embeddings by sqrt(hidden): Gemma 3 inside the embedding module (an
        # embedding LoRA adds after the scale), Gemma 2 in the model (the LoRA is scaled too).
        scale = self.arch.embed_scale
        if scale == "module":
            x = self.embed_scale(x)
        if self.slot_set != "none":
            x = self.proj.embedding_slot(x, self.vocab, hidden)
        return self.embed_scale(x) if scale == "model" else x

    def fp16_table(self) -> str:
        """The embedding table in fp16, converted a block of rows at a time (each value as
        float32 then fp16, as the whole table's conversion gives it) and, with an external data
        file, written there block by block: no float32 copy of the table is ever whole."""
        g, name = self.g, f"{EMBEDDING}.weight"
        shape = tuple(self.base.model.model.embed_tokens.weight.shape)
        blocks = (b.float().numpy().astype(np.float16) for b in self.base.stored_rows(EMBEDDING_WEIGHT, TABLE_ROWS))
        if g.external is not None:
            g.inits.append(tensor(g.external.write_rows(np.float16, shape, blocks), name))
            return name
        table = np.empty(shape, np.float16)
        r = 0
        for b in blocks:
            table[r:r + len(b)] = b
            r += len(b)
        return g.init(name, table, cast=False)

    def embed_scale(self, x: str) -> str:
        mult = self.g.init("const.embed_scale", np.array(self.lay.embed_multiplier, np.float32))
        return self.g.node("Mul", [x, mult], 1, "/embed/Scale")

    def head(self, x: str) -> None:
        """The final norm, logits_to_keep's Slice and the lm_head (with its slot) -> logits."""
        g, TP = self.g, self.TP
        final_norm = self.arch.final_norm
        final = self.norm(x, getattr(self.base.model.model, final_norm).weight, f"model.{final_norm}")
        # logits_to_keep (transformers' argument, same meaning): logits for the last n positions
        # only, 0 (the default) for all. A prompt's prefill needs one row, and each row costs a
        # vocab-wide lm_head row and its output; llama.cpp likewise computes only the logits a
        # batch asks for.
        g.add_input(LOGITS_TO_KEEP, TP.INT64, [1])
        start = g.node("Neg", [g.init(LOGITS_TO_KEEP, np.zeros(1, np.int64), cast=False)], 1, "/logits_to_keep/Neg")
        end = g.const("const.int64_max", [np.iinfo(np.int64).max])
        final = g.node("Slice", [final, start, end, self.axes1], 1, "/logits_to_keep/Slice")
        y = self.proj.linear(final, None, "lm_head", self.base.model, ("lm_head",),
                             refine=self.exact_head if self.exact_head_top_k else None)
        if self.lay.final_softcap:  # Gemma 2: logits = cap * tanh(logits / cap)
            cap = g.init("const.final_softcap", np.array(self.lay.final_softcap, np.float32))
            y = g.node("Div", [y, cap], 1, "/lm_head/softcap/Div")
            y = g.node("Tanh", [y], 1, "/lm_head/softcap/Tanh")
            g.node("Mul", [y, cap], 1, "/lm_head/softcap/Mul")
        g.nodes[-1].output[0] = LOGITS  # the head's last operator produces the graph output
        logits = g.h.make_tensor_value_info(LOGITS, g.onnx_dtype, ["batch", "kept_seq", self.d["vocab_size"]])
        g.outputs.insert(0, logits)

    def exact_head(self, x: str, y: str) -> str:
        """The k largest logits of each position, recomputed exactly: x · E[i] for their token
        ids i, from the fp16 embedding table the tied head shares (TopK, Gather, MatMul,
        ScatterElements). The head itself can then be 4-bit: what sampling reads (the top of the
        distribution) is exact, the rest carries 4-bit error. Only the rows logits_to_keep keeps
        pay for it: one per prefill and decode step."""
        g = self.g
        k = g.init("const.exact_head_k", np.array([min(self.exact_head_top_k, self.vocab)], np.int64), cast=False)
        _, ids = g.node("TopK", [y, k], 2, "/lm_head/exact/TopK", axis=-1, largest=1, sorted=0)
        rows = g.node("Gather", [f"{EMBEDDING}.weight", ids], 1, "/lm_head/exact/Gather", axis=0)
        rows = g.node("Cast", [rows], 1, "/lm_head/exact/Cast", to=g.onnx_dtype)  # [batch, seq, k, hidden]
        last = g.init("const.last_axis", np.array([-1], np.int64), cast=False)
        col = g.node("Unsqueeze", [x, last], 1, "/lm_head/exact/Unsqueeze")  # [batch, seq, hidden, 1]
        exact = g.node("MatMul", [rows, col], 1, "/lm_head/exact/MatMul")
        exact = g.node("Squeeze", [exact, last], 1, "/lm_head/exact/Squeeze")
        return g.node("ScatterElements", [y, ids, exact], 1, "/lm_head/exact/Scatter", axis=-1)
