"""The base GGUF of an export, quantized beside the ONNX export.

A type that llama.cpp's quantizer makes (Q4_K_M, Q8_0, ...) needs a float source first (written
here, by gguf_base.write_base_gguf) and then the quantizer, which at 1B takes about 40 s. That
call is native code that releases the GIL, and the ONNX build leaves a core idle much of the
time (its main thread builds the graph and reads weights while the 4-bit search runs in a pool),
so the quantizer runs in a background thread while the ONNX export goes on. Two things bound the
export's peak memory while both run:
- the ONNX export waits for the quantizer before it reads its head (`before_head`): the two
  largest buffers of a big-vocabulary model, llama.cpp's float32 copy of the embedding and the
  ONNX head's float32 weight with its search, are never held at once;
- the quantizer reads its mapped source with its pages given back as it goes (mapped_pages).
F32 and F16 are written directly, with nothing in the background.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from edgepeft.files import TMP_PREFIX

from .decode_bytes import gguf_decode_bytes
from .gguf_base import quantize_gguf, quantize_source_type, write_base_gguf
from .hf_base import BaseModel
from .progress import Progress

DIRECT = ("F32", "F16")  # written by gguf-py, no quantizer


class GgufJob:
    """Start with the source written (and the quantizer started); wait() joins the quantizer;
    finish() returns the manifest's backends["gguf"] entry once the file is complete."""

    def __init__(self, root: Path, base: BaseModel, quant: str, context_length: int | None, progress: Progress):
        self.quant, self.root = quant.upper(), root
        self.rel = f"gguf/base-{self.quant}.gguf"
        self.context_length = int(context_length or min(base.dims["max_position_embeddings"], 8192))
        self.thread, self.error, self.seconds, self.decode_bytes = None, None, 0.0, None
        (root / "gguf").mkdir(exist_ok=True)
        if self.quant in DIRECT:
            progress.step(f"writing GGUF ({self.quant})")
            write_base_gguf(base, root / self.rel, self.quant)
            progress.done()
            return
        source_type = quantize_source_type(base)
        self.source = root / "gguf" / f"{TMP_PREFIX}base-{source_type}.gguf"
        progress.step(f"writing GGUF source ({source_type})")
        write_base_gguf(base, self.source, source_type)
        progress.done()
        self.thread = threading.Thread(target=self._quantize, name="edgepeft-gguf-quantize", daemon=True)
        self.thread.start()

    def _quantize(self) -> None:
        start = time.perf_counter()
        try:
            quantize_gguf(self.source, self.root / self.rel, self.quant)
            # here too: gguf-py parses the whole vocabulary to list the tensors (4 s at 128k tokens)
            self.decode_bytes = gguf_decode_bytes(self.root / self.rel)
        except BaseException as e:  # raised again by wait(), in the export's thread
            self.error = e
        finally:
            self.source.unlink(missing_ok=True)
            self.seconds = time.perf_counter() - start

    def wait(self) -> None:
        """Block until the quantizer has finished; raise what it raised."""
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:
            raise self.error

    def finish(self, progress: Progress) -> dict:
        """Wait for the file (a step of its own, the time left after the ONNX export) and return
        the manifest entry."""
        if self.thread is not None:
            progress.step(f"quantizing GGUF ({self.quant})")
            self.wait()
            progress.done()
            progress.note(f"quantizing GGUF ({self.quant}) took {self.seconds:.1f} s in all, beside the steps before")
        if self.decode_bytes is None:
            self.decode_bytes = gguf_decode_bytes(self.root / self.rel)
        return {"model": self.rel, "quant": self.quant, "decode_bytes": self.decode_bytes,
                "context_length": self.context_length}

    def abandon(self) -> None:
        """The export failed: wait for a running quantizer, so that it ends before its staging
        directory is removed (a Ctrl-C does not wait: the process is ending)."""
        if self.thread is not None:
            self.thread.join()
