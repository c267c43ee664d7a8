"""Device side: load a bundle once, generate with any adapter. Never imports torch,
transformers or peft. Needs an engine extra: `pip install 'edgepeft[onnx]'`."""

from .engine import Engine
from .generate import Completion, StreamPiece, Timings, Usage
from .sampling import SamplingParams

__all__ = ["Completion", "Engine", "SamplingParams", "StreamPiece", "Timings", "Usage"]
