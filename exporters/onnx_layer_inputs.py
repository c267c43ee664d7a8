"""Per-layer inputs in the decoder graph (Gemma 4's per-layer embeddings; archs.PerLayerInput
says what the modules compute), part of onnx_graph._DecoderBuilder.

Once per call, after the token embedding: a Gather from the per-layer table times sqrt(size),
plus the RMS-normalised projection of the embedding, times the input scale -> [batch, seq,
layers, size]. The table is an initializer (in the bundle's external data file, which onnxruntime
memory-maps; the export holds it whole while it builds the graph).
In each layer after the MLP: gate projection, activation, times the layer's input, projection,
norm, added to the residual stream; then the layer's scalar."""

from __future__ import annotations

import numpy as np

from edgepeft.runtime_contract import INPUT_IDS

from .checkpoint import materialized


class LayerInputs:
    """The per-layer input methods of _DecoderBuilder (which sets g, base, arch, lay, d, proj,
    and provides norm_weight, plain_norm, activation)."""

    def per_layer_inputs(self, x: str) -> None:
        """Every layer's input from the token ids and the embedding `x` (its slot included), as
        self.layer_inputs [batch, seq, layers, size]."""
        g, spec, model = self.g, self.arch.per_layer_input, self.base.model.model
        n, size = self.d["num_layers"], self.lay.per_layer_input
        rows = g.node("Gather", [self.layer_table(f"model.{spec.table}.weight"), INPUT_IDS], 1, "/per_layer/Gather")
        scale = g.init("const.per_layer.table_scale", np.array(size ** 0.5, np.float32))
        rows = g.node("Mul", [rows, scale], 1, "/per_layer/table/Scale")
        shape = g.const("const.per_layer.shape", [0, 0, n, size])
        rows = g.node("Reshape", [rows, shape], 1, "/per_layer/table/Reshape")
        parts = (getattr(model, spec.model_projection), getattr(model, spec.projection_norm))
        with materialized(self.base, *parts):
            proj = self.proj.linear(x, "model", spec.model_projection, model, (spec.model_projection,))
            proj_scale = g.init("const.per_layer.projection_scale",
                                np.array(float(self.d["hidden_size"]) ** -0.5, np.float32))
            proj = g.node("Mul", [proj, proj_scale], 1, "/per_layer/projection/Scale")
            proj = g.node("Reshape", [proj, shape], 1, "/per_layer/projection/Reshape")
            proj = self.plain_norm(proj, parts[1].weight, f"model.{spec.projection_norm}")
        total = g.node("Add", [proj, rows], 1, "/per_layer/Add")
        both = g.init("const.per_layer.input_scale", np.array(spec.input_scale, np.float32))
        self.layer_inputs = g.node("Mul", [total, both], 1, "/per_layer/Scale")

    def layer_table(self, name: str) -> str:
        """The per-layer table as an initializer in the graph's float type (the export saves it
        to the external data file, which onnxruntime memory-maps)."""
        return self.g.init(name, self.base.tensor(name).numpy())

    def layer_input_block(self, i: int, layer, h: str) -> str:
        """Layer i's per-layer input mixed into the residual stream `h`; returns the new stream."""
        g, spec, p = self.g, self.arch.per_layer_input, f"model.layers.{i}"
        index = g.const(f"const.per_layer.{i}", [i])
        mine = g.node("Gather", [self.layer_inputs, index], 1, f"/{p}/per_layer/Gather", axis=2)  # [b, s, 1, size]
        flat = g.const("const.per_layer.flat", [0, 0, self.lay.per_layer_input])
        mine = g.node("Reshape", [mine, flat], 1, f"/{p}/per_layer/Reshape")
        y = self.proj.linear(h, p, spec.gate, layer, (spec.gate,))
        y = g.node("Mul", [self.activation(y, f"/{p}/per_layer/act"), mine], 1, f"/{p}/per_layer/Mul")
        y = self.proj.linear(y, p, spec.projection, layer, (spec.projection,))
        y = self.plain_norm(y, getattr(layer, spec.post_norm).weight, f"{p}.{spec.post_norm}")
        return g.node("Add", [h, y], 1, f"/{p}/per_layer/Residual")

    def layer_end(self, i: int, layer, out: str) -> str:
        """The end of a layer whose output goes through more than the next norm's skip add
        (per-layer inputs, a layer scalar): the residual stream made explicit, then those; the
        next norm starts the stream anew from the result."""
        g, h = self.g, self.g.node("Add", [self.residual, out], 1, f"/model.layers.{i}/Residual")
        if self.lay.per_layer_input:
            h = self.layer_input_block(i, layer, h)
        if self.arch.layer_scalar:
            s = self.base.tensor(f"model.layers.{i}.{self.arch.layer_scalar}").numpy().reshape(-1)
            h = g.node("Mul", [h, g.init(f"model.layers.{i}.{self.arch.layer_scalar}", s)], 1,
                       f"/model.layers.{i}/Scalar")
        self.residual = None
        return h
