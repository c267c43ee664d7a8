"""Continuous batching: calls that overlap in time decode together, each with its own adapter.

One Scheduler per loaded base (Engine owns it). Generating calls submit a request and read their
tokens from it; one scheduler thread runs the batch. Between steps, requests join (their prompt
runs first, in chunks of CHUNK tokens, one chunk between two decode steps of the others, so a
long prompt delays the running rows by one chunk's time per step, not by its whole prefill) and
leave (finished: an end token, max tokens, their cache budget; or closed by their caller, which
frees their row before the next step). Each row keeps its own sampler (temperature, top-k/p,
seed) and end tokens; stop strings are the caller's (Engine._pieces), which closes the request.

How rows of different adapters share a step is the backend's batcher's business
(runtime/onnx_batch.py: one forward for all rows; GgufBackend.batcher: one llama_decode per
adapter set). At most `parallel` rows decode at once; later requests wait their turn, as in
llama.cpp's server (--parallel) and vLLM (--max-num-seqs).

The thread starts with the first request and ends after IDLE_SECONDS without one, so an idle
Engine holds no thread and (its batcher freed) no batch cache.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from collections import deque

from edgepeft.errors import EngineError

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
    """One call's generation, as the scheduler runs it. The caller reads `out`: token ids, then
    ("end", reason) or an exception."""

    def __init__(self, ids: list[int], handle, budget: int, max_new_tokens: int, sampler, stop_ids: set[int]):
        self.ids, self.handle, self.budget, self.max_new = ids, handle, budget, max_new_tokens
        self.sampler, self.stop_ids = sampler, stop_ids
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = False
        self.row = None
        self.done = 0  # prompt tokens run so far
        self.generated = 0
        self.last: int | None = None  # the token the next step runs
        # When the scheduler made the first token and ended the request: the call's timings come
        # from these, not from when its reader got round to the queue (tokens may wait there).
        self.t_submit, self.t_first, self.t_end = time.perf_counter(), None, None

    def cancel(self) -> None:
        self.cancelled = True

    def take(self, logits) -> bool:
        """Sample the next token from `logits` and hand it to the caller; True when the request
        has ended (the caller has been told why)."""
        token = self.sampler(logits)
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now
        if token in self.stop_ids:
            self.t_end = now
            self.out.put((_END, "stop"))
            return True
        self.generated += 1
        self.out.put(token)
        if self.row.length >= self.budget or self.generated >= self.max_new:
            self.t_end = now
            self.out.put((_END, "length"))
            return True
        self.last = token
        return False

    def tokens(self, timings: dict):
        """The caller's side: yield token ids until the request ends; record timings like an
        unbatched call (prefill_s: until the first token, queueing included)."""
        n = 0
        try:
            while True:
                item = self.out.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, tuple) and item[0] is _END:
                    timings["stop_reason"] = item[1]
                    return
                n += 1
                yield item
        finally:
            self.cancel()
            now = time.perf_counter()
            first = self.t_first if self.t_first is not None else now
            end = self.t_end if self.t_end is not None else now  # closed early: until now
            timings["prefill_s"] = first - self.t_submit
            timings["decode_s"] = max(0.0, end - first)
            timings["decode_tokens"] = n


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
                    batcher.close_row(req.row)
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

    def _join_step(self, batcher, req: Request) -> str | None:
        """Run the next chunk of `req`'s prompt. None while its prompt is not done; "decoding"
        once its first token is taken and it joins the decode steps; "ended" when it ended (an
        end token, cancelled, or failed: its caller has been told)."""
        try:
            if req.cancelled:
                if req.row is not None:
                    batcher.close_row(req.row)
                return "ended"
            if req.row is None:
                req.row = batcher.open_row(req.handle, req.budget)
            chunk = req.ids[req.done: req.done + CHUNK]
            logits = batcher.prefill(req.row, chunk)
            req.done += len(chunk)
            if req.done < len(req.ids):
                return None
            if req.take(logits):
                batcher.close_row(req.row)
                return "ended"
            return "decoding"
        except Exception as e:  # noqa: BLE001 - the caller raises it
            if req.row is not None:
                batcher.close_row(req.row)
            req.out.put(e)
            return "ended"

    def _decode_step(self, batcher, running: list[Request]) -> None:
        try:
            logits = batcher.step([r.row for r in running], [r.last for r in running])
        except Exception as e:  # noqa: BLE001 - every row of the step fails with it
            for req in running:
                batcher.close_row(req.row)
                req.out.put(e)
            running.clear()
            return
        ended = [req for i, req in enumerate(running) if req.take(logits[i])]
        for req in ended:
            running.remove(req)
            batcher.close_row(req.row)
