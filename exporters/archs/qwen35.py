"""Qwen3.5 (text): a hybrid whose layers are gated DeltaNet linear attention or gated full
attention (config.layer_types: "linear_attention" / "full_attention", three of the first kind to
one of the second in the released models). Every layer opens with `input_layernorm` and has a
SwiGLU MLP after `post_attention_layernorm`; every RMSNorm but the DeltaNet's gated output norm
applies `1 + w` (q/k norms included). The attention's q_proj gives each head's query and an
output gate (sigmoid), q and k are RMS-normalised per head, and only the first
partial_rotary_factor of each head rotates. The DeltaNet block is base.DeltaNet.

The released checkpoints are vision-language models (Qwen3_5ForConditionalGeneration, config
model_type "qwen3_5") whose text weights sit under `model.language_model.`: the exporters read
their text config and those weights (hf_base.read_config, checkpoint.CheckpointTensors) and
leave the vision tower out."""

from .base import ATTENTION, MLP, Arch, DeltaNet, Group, Norms

_LINEAR = DeltaNet()

GROUPS = (
    Group("qkv_proj", ATTENTION, ("q_proj", "k_proj", "v_proj")),
    Group("o_proj", ATTENTION, ("o_proj",)),
    Group(_LINEAR.in_group, _LINEAR.parent, ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")),
    Group(_LINEAR.out_group, _LINEAR.parent, ("out_proj",)),
    Group("gate_up_proj", MLP, ("gate_proj", "up_proj")),
    Group("down_proj", MLP, ("down_proj",)),
)

QWEN35 = Arch(family="qwen35", gguf_arch="QWEN35", groups=GROUPS, norms=Norms(offset=1.0), qk_norm=True,
              attn_output_gate=True, gguf_pre_tokenizer="qwen35", mixers=(("linear_attention", _LINEAR),))
