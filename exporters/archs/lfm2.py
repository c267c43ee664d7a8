"""LFM2 / LFM2.5 (Liquid): a hybrid whose layers are either gated short convolutions or full
attention (config.layer_types: "conv" / "full_attention"). Every layer opens with
`operator_norm` and has a SwiGLU MLP (`feed_forward`: w1 gate, w3 up, w2 down) after
`ffn_norm`. The convolution block (`conv`) is in_proj -> B, C, x; B * x through a depthwise
causal convolution of kernel conv_L_cache; C times that -> out_proj. The attention layers have
q/k norms (`q_layernorm`, `k_layernorm`) and name their output projection `out_proj`. The final
norm is `embedding_norm`. The MLP's width is not config.intermediate_size when
block_auto_adjust_ff_dim is set (mlp_size below)."""

from .base import ATTENTION, Arch, Group, Norms, ShortConv

_FF = "feed_forward"
_CONV = ShortConv()

GROUPS = (
    Group("qkv_proj", ATTENTION, ("q_proj", "k_proj", "v_proj")),
    Group("o_proj", ATTENTION, ("out_proj",)),
    Group(_CONV.in_group, _CONV.parent, ("in_proj",)),
    Group(_CONV.out_group, _CONV.parent, ("out_proj",)),
    Group("gate_up_proj", _FF, ("w1", "w3")),
    Group("down_proj", _FF, ("w2",)),
)


def mlp_size(config) -> int:
    """The MLP width transformers' Lfm2MLP builds from the config: with
    block_auto_adjust_ff_dim, two thirds of intermediate_size, times block_ffn_dim_multiplier,
    rounded up to a multiple of block_multiple_of."""
    size = int(config.intermediate_size)
    if getattr(config, "block_auto_adjust_ff_dim", False):
        size = int(2 * size / 3)
        multiplier = getattr(config, "block_ffn_dim_multiplier", None)
        if multiplier is not None:
            size = int(multiplier * size)
            step = int(config.block_multiple_of)
            size = step * ((size + step - 1) // step)
    return size


LFM2 = Arch(family="lfm2", gguf_arch="LFM2", groups=GROUPS,
            norms=Norms(pre_attention="operator_norm", pre_mlp="ffn_norm"),
            qk_norm=True, qk_norm_names=("q_layernorm", "k_layernorm"), final_norm="embedding_norm",
            norm_eps_field="norm_eps", mlp_size=mlp_size, mixers=(("conv", _CONV),))
