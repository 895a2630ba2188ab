"""The async face of the store: group commit, wake-ups and one dedicated SQLite thread.

Promises (on top of the SQL invariants in ``gateway.store.db``):

- ``append`` resolves only after the messages' transaction committed. Concurrent appends
  are coalesced: while one commit runs, newcomers gather, and the next commit takes them all
  (up to ``commit_batch_size``; one append is never split, so a large one can exceed it).
  Commits start at most once per ``commit_interval_ms``, which bounds fsyncs per second on
  an SD card; a message waits at most that interval plus one commit before it is durable.
  While every uplink is unreachable (``uplink_state``) the interval is
  ``offline_commit_interval_ms``: nothing is waiting to be uplinked fast then, and fewer,
  larger commits write less to the card and cost less CPU. One uplink online keeps commits
  fast (its latency must not depend on another's outage).
- Every SQLite call runs on one thread, in submission order; the event loop never blocks on
  disk I/O.
- ``wait_ready`` wakes a consumer when messages are committed or released, or when the
  earliest delayed/backing-off message falls due; there is no polling loop.
- The daemon holds an exclusive lock file beside the database, so two gateways never share
  one store; read-only tools (``status``) need no lock.
- Delivered messages cost no write: their cursor is persisted by a timer armed at the first
  settlement after a write (``store.cursor_sync_interval``), or at once after
  ``cursor_sync_messages``, and at ``close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import IO, TypeVar

from gateway.aio import wait_event
from gateway.config import StoreConfig
from gateway.errors import StoreError
from gateway.store.db import Destination, Limits, StoreDb, is_disk_full
from gateway.store.lane import Lane
from gateway.store.records import (
    AppendOutcome,
    DeadLetter,
    NewMessage,
    QueueStats,
    Settlement,
    StoredMessage,
)
from gateway.store.recovery import open_checked

log = logging.getLogger("gateway.store")
R = TypeVar("R")

_Pending = tuple[str, Sequence[NewMessage], "asyncio.Future[list[AppendOutcome]]"]


class Store:
    def __init__(self, path: str, cfg: StoreConfig, *, exclusive: bool = True,
                 stamp: Mapping[str, str] | None = None) -> None:
        """``stamp``: attributes added to every message handed out, never stored (the
        gateway id); they win over a stored attribute of the same name."""
        self.path = path
        self.cfg = cfg
        self.exclusive = exclusive
        self._db = StoreDb(path, Limits.from_config(cfg))
        self._db.stamp.update(stamp or {})
        self._executor: Lane | None = None
        self._lock_file: IO[bytes] | None = None
        self._pending: list[_Pending] = []
        self._pending_count = 0
        self._wake = asyncio.Event()
        self._batch_full = asyncio.Event()
        self._ready: dict[str, asyncio.Event] = {}
        #: queue -> the names of its cursors (registered destinations) to wake on a commit
        self._readers: dict[str, tuple[str, ...]] = {}
        self._committer: asyncio.Task[None] | None = None
        self._sync_timer: asyncio.TimerHandle | None = None
        #: uplinks known to be unreachable: commits are spaced by offline_commit_interval_ms
        self._offline: set[str] = set()
        self._last_commit = 0.0
        #: commit what is pending without waiting for the interval (commit_soon)
        self._hurry = False
        self._closing = False
        #: time spent in the last append commit, seconds (for metrics and benchmarks)
        self.last_commit_seconds = 0.0
        self.commit_seconds_total = 0.0
        self.commits = 0

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        if self.exclusive:
            self._take_lock()
        self._executor = Lane("store")
        try:
            # the daemon checks the file first; a damaged one is moved aside (recovery.py)
            await self._run(open_checked if self.exclusive else StoreDb.open, self._db)
            if self.exclusive:
                released = await self._run(self._db.release_all_leases)
                if released:
                    log.info("released %d leases held before the last stop", released)
        except (StoreError, sqlite3.Error, OSError) as exc:
            await self._shutdown_executor()
            self._release_lock()
            raise StoreError(f"cannot open the store {self.path}: {exc}") from exc
        self._closing = False
        self._committer = asyncio.create_task(self._commit_loop(), name="store-commit")

    async def close(self) -> None:
        """Commit what is pending, persist the cursors, close the database, release the lock."""
        self._closing = True
        if self._sync_timer is not None:
            self._sync_timer.cancel()
            self._sync_timer = None
        if self._committer is not None:
            self._wake.set()
            self._batch_full.set()
            await self._committer
            self._committer = None
        if self._executor is not None:
            with contextlib.suppress(sqlite3.Error):
                await self._run(self._db.close)
            await self._shutdown_executor()
        self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    async def _shutdown_executor(self) -> None:
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await executor.close()

    def _take_lock(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fh = open(self.path + ".lock", "wb")  # noqa: SIM115 - held for the store's lifetime
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise StoreError(f"{self.path} is in use by another gateway process") from None
        self._lock_file = fh

    async def _run(self, fn: Callable[..., R], *args: object) -> R:
        if self._executor is None:
            raise StoreError("the store is not open")
        return await self._translated(self._executor.submit(fn, *args),
                                      getattr(fn, "__name__", "store call"))

    @staticmethod
    async def _translated(call: Awaitable[R], what: str) -> R:
        """SQLite errors leave the store as StoreError (disk_full set for SQLITE_FULL)."""
        try:
            return await call
        except sqlite3.Error as exc:
            raise StoreError(f"{what} failed: {exc}", disk_full=is_disk_full(exc)) from exc

    # -- append with group commit --------------------------------------------------------

    async def append(self, queue: str, messages: Sequence[NewMessage]) -> list[AppendOutcome]:
        """Store messages durably; resolves after their transaction committed."""
        if not messages:
            return []
        return await self.enqueue(queue, messages)

    def enqueue(self, queue: str, messages: Sequence[NewMessage]) -> asyncio.Future[list[AppendOutcome]]:
        """``append`` without awaiting: the messages take their place in the commit order
        now (before any later call), the future resolves after their commit."""
        if self._closing or self._committer is None:
            raise StoreError("the store is closed")
        fut: asyncio.Future[list[AppendOutcome]] = asyncio.get_running_loop().create_future()
        self._pending.append((queue, messages, fut))
        self._pending_count += len(messages)
        self._wake.set()
        if self._pending_count >= self.cfg.commit_batch_size:
            self._batch_full.set()
        return fut

    def commit_soon(self) -> None:
        """Start the next commit without waiting for ``commit_interval_ms`` (an uplink about
        to take messages from memory wants what was stored before them delivered first)."""
        if self._pending:
            self._hurry = True
            self._batch_full.set()

    async def caught_up(self, name: str) -> bool:
        """Cursor ``name`` has nothing to deliver (after every commit submitted before)."""
        return await self._run(self._db.caught_up, name)

    def uplink_state(self, name: str, online: bool) -> None:
        """An uplink became reachable or unreachable (the forwarder says so)."""
        if online and name in self._offline:
            was_all = self._all_offline()
            self._offline.discard(name)
            if was_all:
                self._batch_full.set()  # what waits for the long interval is committed now
        elif not online:
            self._offline.add(name)

    def _all_offline(self) -> bool:
        """Every uplink the store knows of is unreachable."""
        uplinks = {n for names in self._readers.values() for n in names} or {"default"}
        return bool(self._offline) and uplinks <= self._offline

    async def _commit_loop(self) -> None:
        while True:
            interval = (self.cfg.offline_commit_interval_ms if self._all_offline()
                        else self.cfg.commit_interval_ms) / 1000
            await self._wake.wait()
            if not self._pending:
                self._wake.clear()
                if self._closing:
                    return
                continue
            gap = self._last_commit + interval - time.monotonic()
            if (gap > 0 and self._pending_count < self.cfg.commit_batch_size
                    and not self._closing and not self._hurry):
                self._batch_full.clear()
                await wait_event(self._batch_full, gap)
            self._wake.clear()
            self._hurry = False
            await self._commit_pending()

    async def _commit_pending(self) -> None:
        batch = self._take_batch()
        started = time.monotonic()
        try:
            results = await self._run(self._db.append, [(q, msgs) for q, msgs, _ in batch])
        except (StoreError, OSError) as exc:
            error = StoreError(f"commit failed: {exc}")
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(error)
            log.error("store commit failed: %s", exc)
        else:
            for (_, _, fut), outcomes in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(outcomes)
            for queue in {q for q, _, _ in batch}:
                self._notify_queue(queue)
        self._last_commit = time.monotonic()
        self.last_commit_seconds = self._last_commit - started
        self.commit_seconds_total += self.last_commit_seconds
        self.commits += 1
        if self._pending:
            self._wake.set()

    def _take_batch(self) -> list[_Pending]:
        limit = self.cfg.commit_batch_size
        max_bytes = self._db.max_txn_bytes
        taken = size = 0
        batch: list[_Pending] = []
        while self._pending and ((taken < limit and size < max_bytes) or not batch):
            item = self._pending.pop(0)
            batch.append(item)
            taken += len(item[1])
            size += sum(len(m.payload) for m in item[1])
        self._pending_count -= taken
        return batch

    # -- delivery ------------------------------------------------------------------------

    def _event(self, queue: str) -> asyncio.Event:
        event = self._ready.get(queue)
        if event is None:
            event = self._ready[queue] = asyncio.Event()
            event.set()  # a new waiter looks once before it sleeps
        return event

    def _notify(self, queue: str) -> None:
        self._event(queue).set()

    def _notify_queue(self, queue: str) -> None:
        """New messages in ``queue``: wake its cursors (its registered destinations, or the
        cursor named like it)."""
        for name in self._readers.get(queue, (queue,)):
            self._notify(name)

    async def lease(self, queue: str, limit: int, lease_seconds: float | None = None,
                    max_bytes: int = 0) -> list[StoredMessage]:
        """Lease ready messages: at most ``limit``, and at most ``max_bytes`` of payload
        when > 0 (the first message always)."""
        self._event(queue).clear()
        return await self._run(self._db.lease, queue, limit,
                               self.cfg.lease if lease_seconds is None else lease_seconds,
                               time.time(), max_bytes)

    async def register(self, queue: str, destinations: Sequence[Destination]) -> list[str]:
        """The queue's destinations (uplinks), exactly; see ``StoreDb.register``."""
        removed = await self._run(self._db.register, queue, destinations)
        self._readers[queue] = tuple(d.name for d in destinations)
        return removed

    def wake(self, queue: str) -> None:
        """End a ``wait_ready`` of ``queue`` now (the forwarder is stopping)."""
        self._notify(queue)

    async def wait_woken(self, queue: str, timeout: float) -> bool:
        """Clear ``queue``'s event, then sleep until a commit, a release or ``wake`` sets it
        (True) or ``timeout`` passes (False). For a consumer that knows the store holds
        nothing for it (an open write-avoidance lane): no lease round trip per wake-up."""
        event = self._event(queue)
        event.clear()
        return await wait_event(event, timeout)

    async def wait_ready(self, queue: str, timeout: float | None = None) -> None:
        """Sleep until new messages may be ready in ``queue`` (or the timeout, or a due one)."""
        event = self._event(queue)
        due = None
        if self._db.may_fall_due(queue):  # else nothing can fall due: no round trip
            due = await self._run(self._db.next_due, queue, time.time())
        if due is not None:
            until_due = max(0.0, due - time.time()) + 0.001
            timeout = until_due if timeout is None else min(timeout, until_due)
        if not await wait_event(event, timeout):
            # nothing woke us: look for what other processes wrote (``dlq replay``)
            await self._run(self._db.refresh_totals)

    async def settle(self, settlement: Settlement) -> None:
        await self.submit_settle(settlement)

    def submit_settle(self, settlement: Settlement) -> asyncio.Future[None]:
        """Queue the settlement on the store thread now (ahead of any later call) and return
        a future for it. Waiters are woken afterwards: a release, a retry or the delivery of
        a retried message can make messages ready."""
        if self._executor is None:
            raise StoreError("the store is not open")
        submitted = self._executor.submit(self._db.settle, settlement, time.time())  # in order
        fut = asyncio.ensure_future(self._translated(submitted, "settle"))

        # a release, a retry, or the end of a parked message (delivered or dead) can make
        # messages ready; the delivery of a log record cannot
        readies = bool(settlement.release or settlement.retry or settlement.dead
                       or (settlement.delivered and settlement.delivered[0] < 0)
                       or any(h < 0 for h in settlement.delivered))

        def wake(_: asyncio.Future[None]) -> None:
            if readies:
                for queue in list(self._ready):
                    self._notify(queue)
            self._arm_sync()

        fut.add_done_callback(wake)
        return fut

    def _arm_sync(self) -> None:
        """Persist cursors within ``cursor_sync_interval`` of the first unsaved settlement."""
        if self._sync_timer is not None or self._closing:
            return
        loop = asyncio.get_running_loop()
        self._sync_timer = loop.call_later(self.cfg.cursor_sync_interval, self._sync_now)

    def _sync_now(self) -> None:
        self._sync_timer = None
        if self._executor is None or self._closing:
            return
        done = asyncio.ensure_future(self._translated(
            self._executor.submit(self._db.sync_and_check),
            "sync_cursors"))

        def rearm(fut: asyncio.Future[bool]) -> None:
            if fut.cancelled():
                return
            if fut.exception() is not None:
                log.error("writing cursor positions failed: %s", fut.exception())
                self._arm_sync()
            elif fut.result():
                self._arm_sync()

        done.add_done_callback(rearm)

    # -- retention, dead letters, stats ---------------------------------------------------

    async def expire(self) -> int:
        total = 0
        while True:
            n = await self._run(self._db.expire, self.cfg.max_age, time.time())
            total += n
            if n < 1000:
                break
        await self._run(self._db.vacuum_if_sparse)
        await self._run(self._db.refresh_totals)
        if total:
            log.warning("dropped %d messages older than store.max_age (%.0fs)", total,
                        self.cfg.max_age)
        return total

    async def list_dead(self, queue: str | None = None, limit: int = 100) -> list[DeadLetter]:
        return await self._run(self._db.list_dead, queue, limit)

    async def replay_dead(self, queue: str | None = None, ids: Sequence[str] | None = None) -> int:
        n = await self._run(self._db.replay_dead, queue, ids)
        for q in list(self._ready):
            self._notify(q)
        return n

    async def purge_dead(self, queue: str | None = None, ids: Sequence[str] | None = None) -> int:
        return await self._run(self._db.purge_dead, queue, ids)

    async def depth(self, queue: str) -> int:
        return await self._run(self._db.depth, queue)

    async def purge(self, queue: str) -> int:
        return await self._run(self._db.purge, queue)

    async def create_queue(self, queue: str) -> bool:
        return await self._run(self._db.create_queue, queue)

    async def delete_queue(self, queue: str) -> bool:
        return await self._run(self._db.delete_queue, queue)

    async def ping(self) -> bool:
        """A real round trip through the store thread and SQLite."""
        return await self._run(self._db.ping)

    async def stats(self, queue: str) -> QueueStats:
        return await self._run(self._db.stats, queue, time.time())

    async def queues(self) -> list[str]:
        return await self._run(self._db.queues)

    @property
    def message_count(self) -> int:
        return self._db.totals[0]

    @property
    def message_bytes(self) -> int:
        return self._db.totals[1]

    def file_bytes(self) -> int:
        return self._db.file_bytes()
