"""The store's thread: one worker running calls in the order they were submitted.

Every SQLite statement of the daemon runs here, so the event loop never waits on the disk.
A ThreadPoolExecutor does the same with more machinery per call (a work item, a
concurrent.futures.Future, a wrapping asyncio future and their callbacks): measured here, a
round trip cost ~80 µs of CPU through it and ~40 µs through this lane, and the forwarder
makes a few per batch, the ingress one per commit.

Promises: calls run one at a time, in submission order (``submit`` queues at once, so a
settlement submitted before a lease runs before it); each result or exception reaches the
caller's asyncio future on the loop that submitted it; ``close`` runs what was queued, then
ends the thread and waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

R = TypeVar("R")

_Item = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"] | None


def _deliver(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if fut.done():  # the caller gave up (cancelled): nobody waits for this
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


class Lane:
    def __init__(self, name: str = "store") -> None:
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()
        self._closed = False

    def submit(self, fn: Callable[..., R], *args: Any) -> asyncio.Future[R]:
        """Queue ``fn(*args)`` now; the future resolves on the calling loop."""
        if self._closed:
            raise RuntimeError("the store's thread has stopped")
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.put((fn, args, fut))
        return fut

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args, fut = item
            try:
                outcome: tuple[bool, Any] = (True, fn(*args))
            except BaseException as exc:  # handed to the caller, not swallowed
                outcome = (False, exc)
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is left to tell
                fut.get_loop().call_soon_threadsafe(_deliver, fut, *outcome)

    async def close(self) -> None:
        """Run what is queued, then stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
