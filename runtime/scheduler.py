"""Continuous batching: calls that overlap in time decode together, each with its own adapter.

One Scheduler per loaded base (Engine owns it). Generating calls submit a request and read their
tokens from it; one scheduler thread runs the batch. Between steps, requests join (their prompt
runs first, in chunks of CHUNK tokens, one chunk between two decode steps of the others, so a
long prompt delays the running rows by one chunk's time per step, not by its whole prefill) and
leave (ended by their Generation's rules, or closed by their caller, which frees their row
before the next step). Each row keeps its own sampler, end tokens and budget
(runtime/generate.Generation, the same rules a call alone follows).

How rows of different adapters share a step is the backend's Batcher's business (ONNX: one
forward for all rows; GGUF: one llama_decode per adapter set). At most `parallel` rows decode at
once; later requests wait their turn, as in llama.cpp's server (--parallel) and vLLM
(--max-num-seqs). The thread starts with the first request and ends after IDLE_SECONDS without
one, so an idle Engine holds no thread and (its batcher freed) no batch cache.
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from collections import deque

from edgepeft.errors import EngineError

from .backend import Batcher
from .generate import Generation

CHUNK = 128  # prompt tokens per prefill step of a newcomer
IDLE_SECONDS = 2.0
_END = object()
_LIVE: "weakref.WeakSet[Scheduler]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """At interpreter exit, stop every scheduler thread before the backends are torn down (a
    thread still holding llama.cpp contexts then would touch freed memory)."""
    for scheduler in list(_LIVE):
        scheduler.stop()


class Request:
    """One call's generation as the scheduler runs it. The caller reads `out`: token ids, then
    _END or an exception."""

    def __init__(self, gen: Generation):
        self.gen = gen
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = False
        self.row = None
        self.done = 0  # prompt tokens run so far
        self.last: int | None = None  # the token the next step runs

    def cancel(self) -> None:
        self.cancelled = True

    def take(self, logits) -> bool:
        """Hand the caller the next token; True when the request has ended."""
        token = self.gen.take(logits, self.row.length)
        if token is not None:
            self.out.put(token)
            self.last = token
        if self.gen.finish_reason is not None:
            self.out.put(_END)
            return True
        return False

    def tokens(self):
        """The caller's side: token ids until the request ends."""
        try:
            while True:
                item = self.out.get()
                if isinstance(item, BaseException):
                    raise item
                if item is _END:
                    return
                yield item
        finally:
            self.cancel()


class Scheduler:
    def __init__(self, make_batcher, parallel: int):
        self.make_batcher, self.parallel = make_batcher, max(1, int(parallel))
        self.cv = threading.Condition()
        self.waiting: deque[Request] = deque()
        self.thread: threading.Thread | None = None
        self.batcher = None  # the running thread's batcher (None while idle)
        self.stopping = False
        _LIVE.add(self)

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread (after the step in progress) and free its batcher."""
        with self.cv:
            self.stopping = True
            thread = self.thread
            self.cv.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def submit(self, req: Request) -> None:
        with self.cv:
            self.waiting.append(req)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="edgepeft-scheduler", daemon=True)
                self.thread.start()
            self.cv.notify()

    def _run(self) -> None:
        batcher = self.batcher = self.make_batcher()
        running: list[Request] = []  # decoding, in join order
        joining: Request | None = None  # its prompt is running, chunk by chunk
        try:
            while True:
                with self.cv:
                    while not (running or joining or self.waiting) or self.stopping:
                        if self.stopping or (not self.cv.wait(IDLE_SECONDS) and not self.waiting):
                            self.thread = None  # a later submit starts a new thread
                            for req in running + ([joining] if joining else []) + list(self.waiting):
                                req.out.put(EngineError("the engine is shutting down"))
                            self.waiting.clear()
                            return
                    if joining is None and len(running) < self.parallel:
                        while self.waiting and joining is None:
                            req = self.waiting.popleft()
                            if not req.cancelled:
                                joining = req
                for req in [r for r in running if r.cancelled]:
                    running.remove(req)
                    req.row.close()
                if joining is not None:
                    state = self._join_step(batcher, joining)
                    if state == "decoding":
                        running.append(joining)
                    if state is not None:
                        joining = None
                if running:
                    self._decode_step(batcher, running)
        except BaseException as e:  # a bug here must not leave callers waiting forever
            for req in running + ([joining] if joining else []):
                req.out.put(e)
            with self.cv:
                for req in self.waiting:
                    req.out.put(e)
                self.waiting.clear()
                self.thread = None
            raise
        finally:
            batcher.close()
            if self.batcher is batcher:
                self.batcher = None

    def _join_step(self, batcher: Batcher, req: Request) -> str | None:
        """Run the next chunk of `req`'s prompt. None while its prompt is not done; "decoding"
        once its first token is taken and it joins the decode steps; "ended" when it ended (an
        end token, cancelled, or failed: its caller has been told)."""
        try:
            if req.cancelled:
                if req.row is not None:
                    req.row.close()
                return "ended"
            ids = req.gen.ids
            if req.row is None:
                req.row = batcher.open_row(req.gen.adapter, req.gen.budget)
            chunk = ids[req.done: req.done + CHUNK]
            logits = req.row.forward(chunk)[-1]
            req.done += len(chunk)
            if req.done < len(ids):
                return None
            if req.take(logits):
                req.row.close()
                return "ended"
            return "decoding"
        except Exception as e:  # noqa: BLE001 - the caller raises it
            if req.row is not None:
                req.row.close()
            req.out.put(e)
            return "ended"

    def _decode_step(self, batcher: Batcher, running: list[Request]) -> None:
        try:
            logits = batcher.step([r.row for r in running], [r.last for r in running])
        except Exception as e:  # noqa: BLE001 - every row of the step fails with it
            for req in running:
                req.row.close()
                req.out.put(e)
            running.clear()
            return
        ended = [req for i, req in enumerate(running) if req.take(logits[i])]
        for req in ended:
            running.remove(req)
            req.row.close()
