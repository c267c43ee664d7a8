"""What the exporters need to know of each Hugging Face architecture, as one table.

One row per `model_type`: callers look the base's row up here instead of branching on the
type, so supporting a family is a row (and, where it differs from these, the code that reads the
new field). SmolLM models are model_type "llama".
"""

from __future__ import annotations

from dataclasses import dataclass

from edgepeft.errors import UnsupportedModel


@dataclass(frozen=True)
class Arch:
    """One model family as the exporters see it."""

    gguf_arch: str  # gguf-py's MODEL_ARCH member llama.cpp runs this family as
    # llama.cpp's llama architecture rotates interleaved pairs, so its converter permutes the
    # rows of q_proj and k_proj (and LoRA B of those modules must follow); NeoX-layout ones don't.
    permute_qk: bool
    # The config flag that switches `sliding_window` on, for families whose configs carry a
    # window that is only used when the flag is set (Qwen2's use_sliding_window); None: the
    # window, when set, always applies.
    sliding_window_flag: str | None = None
    # llama.cpp's tokenizer.ggml.pre for this family, when it is named by the family rather than
    # recognised from the pre-tokenizer's structure.
    gguf_pre_tokenizer: str | None = None


ARCHS: dict[str, Arch] = {
    "llama": Arch(gguf_arch="LLAMA", permute_qk=True),
    "mistral": Arch(gguf_arch="LLAMA", permute_qk=True),
    "qwen2": Arch(gguf_arch="QWEN2", permute_qk=False, sliding_window_flag="use_sliding_window",
                  gguf_pre_tokenizer="qwen2"),
}


def arch_of(model_type: str, where: object = "this model") -> Arch:
    """The table row of `model_type`; an architecture outside the table is refused in one line."""
    arch = ARCHS.get(model_type)
    if arch is None:
        raise UnsupportedModel(f"{where}: architecture {model_type!r} is not supported "
                               f"(supported: {', '.join(ARCHS)})")
    return arch
