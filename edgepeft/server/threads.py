"""Engine calls on the server's worker threads, bridged to the event loop: a stream's pieces
handed over one by one, and a whole call that ends early when its client disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

from starlette.requests import Request


async def in_thread(pool: ThreadPoolExecutor, make, stop: threading.Event):
    """Iterate the iterator `make()` returns on a thread of `pool`, yielding its items on the
    event loop. When `stop` is set (or this generator is closed), the thread closes the iterator
    before asking it for another item."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def put(kind, value):
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
        except RuntimeError:  # the loop is gone (server shutting down)
            stop.set()

    def work():
        it = None
        try:
            it = make()
            for item in it:
                if stop.is_set():
                    break
                put("item", item)
        except BaseException as e:  # noqa: BLE001 - handed to the loop, raised there
            put("error", e)
        else:
            put("end", None)
        finally:
            if it is not None:
                it.close()

    pool.submit(work)
    try:
        while True:
            kind, value = await queue.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()


async def unless_disconnected(request: Request, work, cancel: threading.Event):
    """The result of `work` (a future), or None when the client disconnects first: then `cancel`
    is set, and the call ends before its next token."""
    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    result, watch = asyncio.wrap_future(work), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({result, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if result.done():
        return result.result()
    cancel.set()
    with contextlib.suppress(Exception):
        await result  # the worker is free again once the call has ended
    return None
