"""The gated short-convolution block of hybrid families (LFM2) in the ONNX decoder, its state
carried as a graph input and output beside the attention layers' KV cache.

    in_proj (slot) -> Split B, C, x -> B * x -> Transpose [batch, hidden, seq]
    -> Concat(past state, .) along time -> Conv (depthwise, no padding) -> Transpose back
    -> C * . -> out_proj (slot)

The state is the last kernel-1 inputs of the convolution, [batch, hidden, kernel - 1], as
llama.cpp and onnxruntime's CausalConvWithState keep it; a sequence starts from zeros. The
present state is the last kernel-1 columns of the Concat, so a prefill of any length and a
decode of one token are the same operators. Plain operators rather than onnxruntime's
CausalConvWithState contrib operator: that one is only in recent onnxruntime releases, and
the `onnx` extra allows onnxruntime >= 1.20.

Every position is taken as a token of its row: the block does not read attention_mask.
transformers zeroes padding positions before in_proj, which matters for a left-padded batch
prefill only; a row of a batched decode step is one real token wherever its mask's padding
lies (the runtime pads masks on the right, each row's state being its own), and a prefill with
padding would leave the pads in the state, so a prefill must be one sequence per row, unpadded.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgepeft.errors import UnsupportedModel
from edgepeft.runtime_contract import state_names

from .archs.base import CONV_STATE
from .onnx_slots import Graph, to_numpy


def add_state_io(g: Graph, layer: int, state: str, shape: tuple[int, ...]) -> None:
    """Layer `layer`'s state `state` (shape without the batch axis) as a graph input and output."""
    past, present = state_names(layer, state)
    g.add_input(past, g.onnx_dtype, ["batch", *shape])
    g.outputs.append(g.h.make_tensor_value_info(present, g.onnx_dtype, ["batch", *shape]))


def short_conv(g: Graph, layer: int, block, conv_name: str, x: str, prefix: str,
               projection: Callable[[str, str], str], in_group: str, out_group: str) -> str:
    """The block of decoder layer `layer` (torch module `block`, its depthwise Conv1d named
    `conv_name`) over x [batch, seq, hidden]; projection(x, group) adds one of its two
    projections with its slot. Returns the block's output [batch, seq, hidden]."""
    conv = getattr(block, conv_name)
    hidden, kernel = int(conv.in_channels), int(conv.kernel_size[0])
    if kernel < 2 or conv.groups != hidden:
        raise UnsupportedModel(f"layer {layer}: a short convolution of kernel {kernel} and {conv.groups} groups "
                               f"over {hidden} channels is not exported (a depthwise kernel of 2 or more is)")
    past, present = state_names(layer, CONV_STATE)
    name = f"/{prefix}"
    bcx = projection(x, in_group)
    b, c, v = g.node("Split", [bcx, g.const(f"const.conv_split.{hidden}", [hidden] * 3)], 3, f"{name}/Split",
                     axis=-1)
    bx = g.node("Mul", [b, v], 1, f"{name}/Bx")
    bx = g.node("Transpose", [bx], 1, f"{name}/Transpose", perm=[0, 2, 1])  # [batch, hidden, seq]
    window = g.node("Concat", [past, bx], 1, f"{name}/Concat", axis=2)  # [batch, hidden, kernel - 1 + seq]
    inputs = [window, g.init(f"{prefix}.{conv_name}.weight", to_numpy(conv.weight))]  # [hidden, 1, kernel]
    if conv.bias is not None:
        inputs.append(g.init(f"{prefix}.{conv_name}.bias", to_numpy(conv.bias)))
    y = g.node("Conv", inputs, 1, f"{name}/Conv", group=hidden, kernel_shape=[kernel], pads=[0, 0])
    g.node("Slice", [window, g.const(f"const.conv_state_start.{kernel}", [1 - kernel]),
                     g.const("const.int64_max", [np.iinfo(np.int64).max]), g.const("const.axes2", [2])],
           [present], f"{name}/State")
    y = g.node("Transpose", [y], 1, f"{name}/TransposeBack", perm=[0, 2, 1])  # [batch, seq, hidden]
    y = g.node("Mul", [c, y], 1, f"{name}/Cy")
    return projection(y, out_group)
