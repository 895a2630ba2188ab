"""Small asyncio helpers shared by the daemon's tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait for ``event`` up to ``timeout`` seconds (None = forever); False on timeout.

    On Python 3.11, ``asyncio.wait_for`` returns normally when the task is cancelled in the
    same loop iteration as the inner wait completes, swallowing the cancellation (a loop
    around it then never stops). ``asyncio.timeout`` keeps the cancellation."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


class Interrupted(Exception):
    """``unless_set`` gave up on an awaitable because its event was set."""


async def unless_set(aw: Awaitable[T], event: asyncio.Event, grace: float) -> T:
    """Await ``aw`` (as a task); once ``event`` is set, allow it ``grace`` seconds more, then
    cancel it and raise Interrupted. Cancelling the caller cancels ``aw`` too.

    For a shutdown that honours its promise with any peer: work that is about to finish
    finishes, work waiting on a dead server is abandoned at once (its caller releases what
    it held) instead of waiting out the server's timeouts."""
    task = asyncio.ensure_future(aw)
    stopper = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            await asyncio.wait({task}, timeout=grace)
    except BaseException:
        task.cancel()
        raise
    finally:
        stopper.cancel()
    if not task.done():
        task.cancel()
        # a well-behaved awaitable ends at once when cancelled; never wait long for one
        await asyncio.wait({task}, timeout=CANCEL_WAIT)
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: an error raised while cancelling is not the point
        raise Interrupted(f"interrupted after a {grace:g}s grace")
    return task.result()


#: how long ``unless_set`` waits for a cancelled awaitable to finish
CANCEL_WAIT = 1.0
