"""The shape of an architecture description, and what one base's config makes of it.

An `Arch` is data a family module declares once (exporters/archs/<family>.py): how its
checkpoint's linear layers pack into slot groups, which norms sit where and how their weight is
applied, the activation, q/k norms, the embedding scale, which config fields give the attention
scale and the local rotary base, and how llama.cpp names and lays out the family. `Layout` is
what a given config makes of that: per-layer attention windows and rotary tables, the
attention scale, soft-caps. The ONNX graph builder and the GGUF writers read these two and
nothing else about the family.

Hybrid families (LFM2, Qwen3.5) mix token mixers: `Arch.mixers` maps a config `layer_types`
value to the block such a layer has instead of attention (a `ShortConv`, a `DeltaNet`), and
`Layout.states` gives each layer's per-sequence states beside the KV cache, as that block states
them (a short convolution's last kernel-1 inputs; a gated DeltaNet's convolution inputs and its
recurrent matrix per value head). A new kind of block is a dataclass with a `kind` and a
`states(config, dims)` like ShortConv's, and a method of the graph builder for its kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from ..hf_config import FULL, partial_rotary_factor, rope_parameters

ATTENTION, MLP = "self_attn", "mlp"
# A decoder layer's token mixer: attention over the KV cache, or a gated short convolution
# (ShortConv) that carries its last kernel-1 inputs per sequence instead of a KV cache.
# Qwen3.5's gated DeltaNet (DeltaNet) carries the inputs of its causal convolution and a
# recurrent [key_dim, value_dim] matrix per value head.
ATTENTION_MIXER, SHORT_CONV, DELTA_NET = "attention", "short_conv", "gated_deltanet"
CONV_STATE = "conv"  # a causal convolution's last kernel-1 inputs (Layout.states; runtime_contract.state_names)
RECURRENT_STATE = "recurrent"  # a linear-attention block's recurrent matrices


@dataclass(frozen=True)
class Group:
    """Linear layers of one parent module that read the same input, packed into one MatMul with
    one adapter slot. `members` are the checkpoint's module names, in output order; a checkpoint
    that is already fused (Phi-3's qkv_proj) has one member."""

    name: str
    parent: str
    members: tuple[str, ...]


# Llama-style checkpoints: separate q/k/v and gate/up layers, packed by the exporter.
SPLIT_GROUPS = (
    Group("qkv_proj", ATTENTION, ("q_proj", "k_proj", "v_proj")),
    Group("o_proj", ATTENTION, ("o_proj",)),
    Group("gate_up_proj", MLP, ("gate_proj", "up_proj")),
    Group("down_proj", MLP, ("down_proj",)),
)
# Checkpoints that store q/k/v and gate/up fused (Phi-3): PEFT adapters target the fused layers.
FUSED_GROUPS = (
    Group("qkv_proj", ATTENTION, ("qkv_proj",)),
    Group("o_proj", ATTENTION, ("o_proj",)),
    Group("gate_up_proj", MLP, ("gate_up_proj",)),
    Group("down_proj", MLP, ("down_proj",)),
)


@dataclass(frozen=True)
class Norms:
    """The RMSNorms of a decoder layer, by module name. `pre_attention` and `pre_mlp` open each
    block; `post_attention` / `post_mlp` (Gemma 2/3) normalise a block's output before it joins
    the residual stream. `offset` is added to every norm weight (Gemma applies `1 + w`), q/k
    norms included."""

    pre_attention: str = "input_layernorm"
    pre_mlp: str = "post_attention_layernorm"
    post_attention: str | None = None
    post_mlp: str | None = None
    offset: float = 0.0


@dataclass(frozen=True)
class ShortConv:
    """A gated short-convolution block (LFM2's Lfm2ShortConv), by module and config names:
    `in_group` projects to 3 x hidden, cut into B, C, x in that order; B * x goes through the
    depthwise causal convolution `conv` (kernel `kernel_field`, no activation); C times its output
    goes through `out_group`. Its state is the convolution's last kernel-1 inputs."""

    parent: str = "conv"  # the block's module in a decoder layer
    conv: str = "conv"  # the depthwise Conv1d inside the block
    in_group: str = "conv_in_proj"  # Group names (Arch.groups) of its two projections
    out_group: str = "conv_out_proj"
    kernel_field: str = "conv_L_cache"  # config field of the kernel size
    kind: ClassVar[str] = SHORT_CONV
    bias_field: str = "conv_bias"  # config flag: biases on the convolution and both projections
    # Submodules whose weights the block's forward reads without calling them (transformers'
    # Lfm2ShortConv passes its Conv1d to a function): checkpoint.float32_compute reads them
    # around the block's forward, since their own forward hooks never fire.
    direct: tuple[str, ...] = ("conv",)

    def kernel(self, config) -> int:
        return int(getattr(config, self.kernel_field))

    def manifest_dims(self, config) -> dict:
        """What the block adds to the manifest's dims: nothing."""
        return {}

    def states(self, config, dims: dict) -> dict[str, tuple[int, ...]]:
        """Per sequence: the convolution's last kernel-1 inputs, [hidden, kernel - 1]."""
        return {CONV_STATE: (int(dims["hidden_size"]), self.kernel(config) - 1)}


@dataclass(frozen=True)
class DeltaNet:
    """A gated DeltaNet block (Qwen3.5's Qwen3_5GatedDeltaNet), by module and config names.
    `in_group` packs in_proj_qkv, in_proj_z, in_proj_b, in_proj_a (one input, one slot); the qkv
    stream goes through the depthwise causal convolution `conv` (SiLU after), q and k are
    L2-normalised per head, and the gated delta rule runs per value head with decay
    -exp(A_log) * softplus(a + dt_bias) and rate sigmoid(b); its output goes through an RMSNorm
    per value head (weight `norm`, no offset) gated by silu(z), then `out_group`. Each key head
    serves value_heads / key_heads consecutive value heads."""

    parent: str = "linear_attn"
    conv: str = "conv1d"
    norm: str = "norm"
    in_group: str = "linear_in_proj"
    out_group: str = "linear_out_proj"
    kernel_field: str = "linear_conv_kernel_dim"
    key_heads_field: str = "linear_num_key_heads"
    value_heads_field: str = "linear_num_value_heads"
    key_dim_field: str = "linear_key_head_dim"
    value_dim_field: str = "linear_value_head_dim"
    kind: ClassVar[str] = DELTA_NET
    # transformers' causal_conv1d_forward reads conv1d.weight without calling the Conv1d
    # (ShortConv.direct says why that matters).
    direct: tuple[str, ...] = ("conv1d",)

    def kernel(self, config) -> int:
        return int(getattr(config, self.kernel_field))

    def heads(self, config) -> tuple[int, int, int, int]:
        """(key heads, value heads, key head dim, value head dim)."""
        return tuple(int(getattr(config, f)) for f in (self.key_heads_field, self.value_heads_field,
                                                       self.key_dim_field, self.value_dim_field))

    def manifest_dims(self, config) -> dict:
        """What the block adds to the manifest's dims: its head counts and sizes (GGUF LoRA files
        reorder value heads by them: gguf_deltanet.py)."""
        return {"linear_heads": list(self.heads(config))}

    def conv_channels(self, config) -> int:
        """The convolution's channels: q, k (key heads x key dim each) and v."""
        nk, nv, dk, dv = self.heads(config)
        return 2 * nk * dk + nv * dv

    def states(self, config, dims: dict) -> dict[str, tuple[int, ...]]:
        """Per sequence: the convolution's last kernel-1 inputs [channels, kernel - 1], and the
        recurrent matrix of each value head [value heads, key dim, value dim]."""
        _, nv, dk, dv = self.heads(config)
        return {CONV_STATE: (self.conv_channels(config), self.kernel(config) - 1), RECURRENT_STATE: (nv, dk, dv)}


@dataclass(frozen=True)
class PerLayerInput:
    """Per-layer inputs (Gemma 4's per-layer embeddings), by module and config names. Once per
    call: a second table `table` ([vocab, layers x size], scaled by sqrt(size)) gives each token a
    vector per layer, and `model_projection` of the scaled token embedding (times
    hidden ** -0.5, RMS-normalised per layer by `projection_norm`) another; their sum times
    `input_scale` is layer i's input. In layer i, after the MLP: the residual stream through
    `gate` (the MLP's activation), times that input, through `projection` and `post_norm`, is
    added to the residual stream."""

    table: str = "embed_tokens_per_layer"
    model_projection: str = "per_layer_model_projection"
    projection_norm: str = "per_layer_projection_norm"
    gate: str = "per_layer_input_gate"
    projection: str = "per_layer_projection"
    post_norm: str = "post_per_layer_input_norm"
    size_field: str = "hidden_size_per_layer_input"
    input_scale: float = 2.0 ** -0.5

    def size(self, config) -> int:
        return int(getattr(config, self.size_field, 0) or 0)


@dataclass(frozen=True)
class Arch:
    """One model family as the exporters see it."""

    family: str  # the module under exporters/archs/ that declares it
    gguf_arch: str  # gguf-py's MODEL_ARCH member llama.cpp runs this family as
    groups: tuple[Group, ...] = SPLIT_GROUPS
    norms: Norms = field(default_factory=Norms)
    activation: str = "silu"  # of the gated MLP: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    qk_norm: bool = False  # q_norm / k_norm: an RMSNorm over each head's q and k, before rotary
    # Embeddings times sqrt(hidden_size): None, "module" (inside the embedding module, so an
    # embedding LoRA adds after the scale: Gemma 3) or "model" (by the model after the module,
    # scaling an embedding LoRA too: Gemma 2).
    embed_scale: str | None = None
    # Config field whose value v gives the attention scale v ** -0.5 (default head_dim).
    attention_scale_field: str | None = None
    # Whether sliding-window layers rotate with their own rotary settings (Gemma 3); False:
    # every layer shares one rotary table.
    local_rope: bool = False
    # The config flag that switches `sliding_window` on, for families whose configs carry a
    # window that is only used when the flag is set (Qwen2's use_sliding_window); None: the
    # window, when set, always applies.
    sliding_window_flag: str | None = None
    # llama.cpp's llama architecture rotates interleaved pairs, so its converter permutes the
    # rows of q_proj and k_proj (and LoRA B of those modules must follow); NeoX-layout ones don't.
    permute_qk: bool = False
    # llama.cpp's tokenizer.ggml.pre for this family, when it is named by the family rather than
    # recognised from the pre-tokenizer's structure.
    gguf_pre_tokenizer: str | None = None
    # What llama.cpp hard-codes for this architecture rather than reading from the file: the
    # sliding-window layer pattern (every n-th layer global, the rest windowed), the rotary base
    # of windowed layers, an attention scale of head_dim ** -0.5, soft-caps. A config that differs
    # cannot be written as a GGUF llama.cpp runs correctly, and is refused.
    gguf_swa_pattern: int | None = None
    gguf_local_rope_base: float | None = None
    gguf_scale_is_head_dim: bool = False
    # Whether llama.cpp soft-caps attention scores and logits whatever the config says (with its
    # defaults, 50 and 30, where the file has no caps).
    gguf_softcaps: bool = False
    # Whether llama.cpp reads attention.sliding_window for this architecture.
    gguf_sliding_window: bool = False
    # Module names the Llama layout fixes: each head's q/k norms, the final norm.
    qk_norm_names: tuple[str, str] = ("q_norm", "k_norm")
    final_norm: str = "norm"
    norm_eps_field: str = "rms_norm_eps"  # the config field of the RMSNorms' epsilon
    # The gated MLP's width from the config, for families whose config field is not the size
    # the weights have (LFM2's block_auto_adjust_ff_dim); None: config.intermediate_size.
    mlp_size: Callable[[object], int] | None = None
    # Hybrid families: (layer_types value, block) for the layer types whose token mixer is not
    # attention, the block describing it (ShortConv, DeltaNet).
    mixers: tuple[tuple[str, ShortConv | DeltaNet], ...] = ()
    # Qwen3.5's gated attention: q_proj gives each head's query and then its output gate
    # (2 x head_dim per head); the attention output times sigmoid(gate) goes into o_proj.
    attn_output_gate: bool = False
    # Gemma 4: per-layer inputs (PerLayerInput; None: the family has none, or a config sets
    # their size to 0).
    per_layer_input: PerLayerInput | None = None
    # Config field of the number of last layers that reuse an earlier layer's KV cache instead
    # of keeping their own (Gemma 4's num_kv_shared_layers): each reads the last layer of its
    # layer type before them (Layout.kv_source).
    kv_shared_field: str | None = None
    # An RMSNorm without weight over each head's values before they are cached (Gemma 4).
    v_norm: bool = False
    # A fixed attention scale (Gemma 4: 1.0, q and k being RMS-normalised per head); None:
    # attention_scale_field or head_dim ** -0.5.
    attention_scale: float | None = None
    # A decoder layer's buffer its output is multiplied by (Gemma 4's layer_scalar).
    layer_scalar: str | None = None
    # Whether layers differ in head size and KV heads (Gemma 4's global_head_dim on its
    # full-attention layers), read per layer from transformers' config.per_layer_config.
    per_layer_heads: bool = False
    # Config options the description does not cover, refused at export: (field, the value it
    # must have, what the option is).
    refused: tuple[tuple[str, object, str], ...] = ()

    def block(self, kind: str) -> ShortConv | DeltaNet | None:
        """The family's description of its `kind` token mixer (SHORT_CONV, DELTA_NET), None without one."""
        return next((b for _, b in self.mixers if b.kind == kind), None)


@dataclass(frozen=True)
class Layout:
    """What one base's config makes of its family's description, per layer where it varies."""

    windows: tuple[int | None, ...]  # attention window of each layer (None: full attention)
    rope: tuple[str, ...]  # each layer's rotary table: "global" or "local"
    attention_scale: float
    attn_softcap: float | None  # tanh soft-cap of attention scores
    final_softcap: float | None  # tanh soft-cap of the logits
    rotary_dim: int  # leading dimensions of each head that rotate (partial rotary: < head_dim)
    embed_multiplier: float | None
    # Each layer's token mixer (ATTENTION_MIXER, SHORT_CONV, DELTA_NET), and the per-sequence
    # states it carries beside the KV cache: {state name: shape without the batch axis}, empty
    # for attention layers; a short convolution's "conv" state is [hidden, kernel - 1].
    mixers: tuple[str, ...]
    states: tuple[dict, ...]
    # Per layer: (KV heads, head size), the layer whose KV cache it attends over (itself, or an
    # earlier layer's for a KV-sharing consumer), and its rotary width.
    heads: tuple[tuple[int, int], ...] = ()
    kv_source: tuple[int, ...] = ()
    rotary_dims: tuple[int, ...] = ()
    per_layer_input: int = 0  # size of each layer's per-layer input (0: none)

    def attention_layers(self) -> list[int]:
        """The layers that have a KV cache of their own (not a KV-sharing consumer's)."""
        return [i for i, m in enumerate(self.mixers) if m == ATTENTION_MIXER and self.kv_source[i] == i]

    def kv_consumers(self) -> list[int]:
        """The layers that attend over an earlier layer's KV cache."""
        return [i for i, src in enumerate(self.kv_source) if src != i]

    def state_layers(self) -> list[int]:
        """A hybrid's layers that carry states instead of a KV cache."""
        return [i for i, m in enumerate(self.mixers) if m != ATTENTION_MIXER]


def layout(arch: Arch, config, dims: dict) -> Layout:
    """Read `config` the way `arch`'s family does."""
    n, window = dims["num_layers"], dims["sliding_window"]
    types = getattr(config, "layer_types", None)
    if types and window:
        windows = tuple(window if t == "sliding_attention" else None for t in types[:n])
    else:
        windows = (window,) * n
    local = arch.local_rope
    rope = tuple("local" if local and w else "global" for w in windows)
    scale_from = getattr(config, arch.attention_scale_field) if arch.attention_scale_field else dims["head_dim"]
    scale = arch.attention_scale if arch.attention_scale is not None else float(scale_from) ** -0.5
    partial = partial_rotary_factor(config)
    mixers, states = _mixers(arch, config, dims)
    heads = _heads(arch, config, dims)
    ple = arch.per_layer_input.size(config) if arch.per_layer_input else 0
    return Layout(
        windows=windows, rope=rope, attention_scale=scale,
        attn_softcap=getattr(config, "attn_logit_softcapping", None) or None,
        final_softcap=getattr(config, "final_logit_softcapping", None) or None,
        rotary_dim=int(dims["head_dim"] * partial),
        embed_multiplier=float(dims["hidden_size"]) ** 0.5 if arch.embed_scale else None,
        mixers=mixers, states=states, heads=heads, kv_source=_kv_sources(arch, config, n),
        rotary_dims=tuple(_rotary_dim(config, types[i] if types else None, hd, partial)
                          for i, (_, hd) in enumerate(heads)),
        per_layer_input=ple,
    )


def _heads(arch: Arch, config, dims: dict) -> tuple[tuple[int, int], ...]:
    """Each layer's (KV heads, head size): the config's, or per_layer_config's (per_layer_heads)."""
    n, plain = dims["num_layers"], (int(dims["num_kv_heads"]), int(dims["head_dim"]))
    if not arch.per_layer_heads:
        return (plain,) * n
    views = config.per_layer_config
    return tuple((int(getattr(views[i], "num_key_value_heads", None) or plain[0]),
                  int(getattr(views[i], "head_dim", None) or plain[1])) for i in range(n))


def _rotary_dim(config, layer_type: str | None, head_dim: int, partial: float) -> int:
    """The rotary width of a layer: the leading partial_rotary_factor of its head, or all of it
    for transformers' "proportional" rotary, whose table spans the head with zero frequencies
    past the rotated share (cos 1, sin 0: those dimensions pass unrotated)."""
    params = rope_parameters(config, layer_type or FULL)
    if params["rope_type"] == "proportional":
        return head_dim
    own = getattr(config, "partial_rotary_factor", None) or params.get("partial_rotary_factor")
    per_type = isinstance(getattr(config, "rope_parameters", None), dict) and layer_type in config.rope_parameters
    return int(head_dim * float(own or (1.0 if per_type else partial)))


def _kv_sources(arch: Arch, config, n: int) -> tuple[int, ...]:
    """Each layer's KV cache: its own, or for the last `kv_shared_field` layers the last earlier
    layer of the same layer type (as transformers' kv_sharing_modes pairs them)."""
    shared = int(getattr(config, arch.kv_shared_field, 0) or 0) if arch.kv_shared_field else 0
    if not shared:
        return tuple(range(n))
    types, first = list(config.layer_types), n - shared
    out = list(range(n))
    for i in range(first, n):
        out[i] = max(j for j in range(first) if types[j] == types[i])
    return tuple(out)


def _mixers(arch: Arch, config, dims: dict) -> tuple[tuple[str, ...], tuple[dict, ...]]:
    """Each layer's mixer (from config.layer_types through arch.mixers; attention where the
    family has one mixer) and its states."""
    n, blocks = dims["num_layers"], dict(arch.mixers)
    types = list(getattr(config, "layer_types", None) or []) if blocks else []
    per_layer = [blocks.get(types[i]) if i < len(types) else None for i in range(n)]
    return (tuple(b.kind if b else ATTENTION_MIXER for b in per_layer),
            tuple(b.states(config, dims) if b else {} for b in per_layer))
