"""One generation loop for every call: alone or in a batch, for complete(), stream(), the CLI
and the server.

A call's decoding rules (`Generation`: sampling, end tokens, the length budget, and when its
first token and its end came) are the same whichever way its logits are computed: `run_alone`
runs them on the call's own sequence, in the caller's thread; the scheduler
(runtime/scheduler.py) runs them on a row of its batch. `steps` turns either's tokens into typed
steps: text decoded incrementally, cut at stop strings, the last step carrying the finish
reason, the usage and the timings.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass
from typing import Iterator

from edgepeft.errors import InvalidArgument

from .backend import Backend
from .tokenizer import IncrementalDecoder, Tokenizer

MAX_STOP_STRINGS = 16


@dataclass(frozen=True)
class Timings:
    """Where one call's time went. The first generated token comes from the prefill's logits,
    so the decode rate counts the forward passes after it."""

    load_s: float  # opening the engine (once; repeated on every call for `run`)
    prompt_tokens: int
    prefill_s: float  # from the call's start to its first token (waiting for a batch row included)
    decode_tokens: int
    decode_s: float  # from the first token to the last
    decode_step_s: float | None = None  # the median time between two tokens: what one preempted step cannot move

    @property
    def prefill_tokens_per_s(self) -> float | None:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else None

    @property
    def decode_tokens_per_s(self) -> float | None:
        return (self.decode_tokens - 1) / self.decode_s if self.decode_tokens > 1 and self.decode_s else None

    def to_json(self) -> dict:
        def rate(x):
            return round(x, 2) if x is not None else None

        return {"load_s": round(self.load_s, 4), "prefill_s": round(self.prefill_s, 4),
                "prefill_tokens_per_s": rate(self.prefill_tokens_per_s), "decode_tokens": self.decode_tokens,
                "decode_s": round(self.decode_s, 4), "decode_tokens_per_s": rate(self.decode_tokens_per_s),
                "decode_step_s": round(self.decode_step_s, 6) if self.decode_step_s is not None else None}


@dataclass(frozen=True)
class Usage:
    """Token counts of one call, as OpenAI's `usage` reports them."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_json(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens}


@dataclass
class StreamPiece:
    """One step of a generation: new text and the generated token ids behind it (several when
    text was held back: an incomplete character, or what could start a stop string). The last
    step has `finish_reason` ("stop": an end token or a stop string; "length": max_new_tokens or
    the context; "cancelled"), `usage` and `timings`, and `stop_string` when one ended the text;
    its text may be empty."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None
    stop_string: str | None = None
    timings: Timings | None = None


@dataclass
class Completion:
    """What one call produced, for `run --json` and the bench."""

    text: str
    tokens: list[int]
    adapter: str | None
    backend: str
    prompt_tokens: int
    stop_reason: str  # the finish reason: stop, length (or cancelled)
    timings: Timings

    def to_json(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "adapter": self.adapter, "backend": self.backend,
                "prompt_tokens": self.prompt_tokens, "stop_reason": self.stop_reason,
                "timings": self.timings.to_json()}


def check_stop(stop) -> list[str]:
    """A call's stop strings: None, one string or a list of strings (at most 16)."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise InvalidArgument("stop must be a string or a list of strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"stop has {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed")
    return list(stops)


class StopStrings:
    """Cuts streamed text at the first of several stop strings (the stop string itself is not
    returned, as OpenAI and vLLM do). Text that could be the start of a stop string is held back
    until the next piece shows whether it is."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.matched: str | None = None

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was reached)."""
        buf = self.held + text
        hits = [(i, s) for s in self.stops if (i := buf.find(s)) >= 0]
        if hits:
            cut, self.matched = min(hits)
            self.held = ""
            return buf[:cut], True
        keep = max((k for s in self.stops for k in range(min(len(s) - 1, len(buf)), 0, -1)
                    if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


class Generation:
    """One call's decoding rules, the same alone and in a batch: the next token from the
    sampler, end tokens, max_new_tokens and the cache budget; and when its first token and its
    end came (timings come from these, not from when a reader took the tokens)."""

    def __init__(self, ids: list[int], adapter, budget: int, max_new_tokens: int, sampler, stop_ids: set[int]):
        self.ids, self.adapter, self.budget, self.max_new = ids, adapter, budget, max_new_tokens
        self.sampler, self.stop_ids = sampler, stop_ids
        self.generated = 0
        self.finish_reason: str | None = None
        self.t_start, self.t_first, self.t_end = time.perf_counter(), None, None
        self.t_tokens: list[float] = []  # when each token was taken

    def take(self, logits, length: int) -> int | None:
        """The next token from `logits`, `length` positions run so far; None when an end token
        ends the call. `finish_reason` is set once the call has ended."""
        token = self.sampler(logits)
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now
        self.t_tokens.append(now)
        if token in self.stop_ids:
            self._finish("stop", now)
            return None
        self.generated += 1
        if length >= self.budget or self.generated >= self.max_new:
            self._finish("length", now)
        return token

    def _finish(self, reason: str, now: float) -> None:
        self.finish_reason, self.t_end = reason, now

    def end(self) -> None:
        """The caller stopped reading: the call ends now, if it had not."""
        if self.t_end is None:
            self.t_end = time.perf_counter()

    def timings(self, load_s: float, decoded: int) -> Timings:
        end = self.t_end if self.t_end is not None else time.perf_counter()
        first = self.t_first if self.t_first is not None else end
        t = self.t_tokens[:decoded]
        step = statistics.median(b - a for a, b in zip(t, t[1:])) if len(t) > 1 else None
        return Timings(load_s, len(self.ids), first - self.t_start, decoded, max(0.0, end - first), step)


def run_alone(backend: Backend, gen: Generation) -> Iterator[int]:
    """`gen`'s tokens from a sequence of its own, in the caller's thread."""
    try:
        with backend.open_sequence(gen.adapter, gen.budget) as seq:
            logits = seq.forward(gen.ids)[-1]
            while (token := gen.take(logits, seq.length)) is not None:
                yield token
                if gen.finish_reason is not None:
                    return
                logits = seq.forward([token])[-1]
    finally:
        gen.end()


def steps(tokens: Iterator[int], gen: Generation, tokenizer: Tokenizer, stops: list[str], load_s: float,
          text: bool = True, cancel: threading.Event | None = None) -> Iterator[StreamPiece]:
    """The generation loop: `tokens` (from run_alone or the scheduler) as StreamPieces. With
    text=False (no stop strings, text decoded once at the end) only the last piece is yielded.
    Closing this iterator, or setting `cancel`, ends the call before its next token."""
    decoder, cutter = (IncrementalDecoder(tokenizer) if text else None), StopStrings(stops)
    pending: list[int] = []  # generated ids whose text is not yielded yet
    n, cancelled = 0, False
    try:
        for token in tokens:
            n += 1
            pending.append(token)
            if decoder is not None:
                piece, hit = cutter.push(decoder.push(token))
                if hit:
                    break
                if piece:
                    yield StreamPiece(piece, pending)
                    pending = []
            if cancel is not None and cancel.is_set():
                cancelled = True
                break
    finally:
        tokens.close()  # ends the sequence now, also when our caller stopped early
        gen.end()
    tail = ""
    if decoder is not None and cutter.matched is None and not cancelled:
        tail, _ = cutter.push(decoder.flush())
        if cutter.matched is None:
            tail += cutter.flush()
    reason = "cancelled" if cancelled else "stop" if cutter.matched is not None else gen.finish_reason or "length"
    yield StreamPiece(tail, pending, reason, Usage(len(gen.ids), n), cutter.matched, gen.timings(load_s, n))


def collect(pieces: Iterator[StreamPiece], tokenizer: Tokenizer, adapter, backend: str) -> Completion:
    """A whole call's Completion from its steps."""
    tokens, texts, last = [], [], None
    for last in pieces:
        tokens += last.token_ids
        texts.append(last.text)
    # Cut text is the pieces'; otherwise the whole output decoded at once.
    text = "".join(texts) if last.stop_string is not None else tokenizer.decode(tokens)
    return Completion(text, tokens, adapter, backend, last.usage.prompt_tokens, last.finish_reason, last.timings)
