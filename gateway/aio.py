"""Small asyncio helpers shared by the daemon's tasks."""

from __future__ import annotations

import asyncio


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
