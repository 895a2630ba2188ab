"""An example uplink plugin for the OpenHQM edge gateway: one append-only JSONL journal per queue.

Install it into the gateway's environment (``pip install -e examples/openhqm-file-uplink``)
and select it with ``queue.type: jsonl_file``; its constructor's parameters are the keys:

    queue:
      type: jsonl_file
      directory: /var/lib/openhqm-gateway/outbox
      fsync: true
      max_message_bytes: 1048576
      dead_letter_queue: dead-letters

It is small but honest, so it can pass the gateway's contract suite:

- ``<directory>/<queue>.jsonl`` holds one JSON object per line: ``put`` (a message: id,
  base64 body, attributes, timestamp, priority, not_before, retry_count), ``ack`` (settled
  for good), ``requeue`` (back to the end of the queue, retry_count + 1) and ``dead``
  (moved to the dead-letter queue, whose journal gets a ``put`` carrying ``reason`` and
  ``source_queue`` first). The queue's content is the replay of its journal.
- Durability: every write is one ``write`` + ``fsync`` (``fsync: false`` skips the sync);
  a call returns only after it. A torn last line after a crash is cut off on the next load.
  ``publish_batch`` writes the whole batch in one append.
- One FileQueue per queue at a time: its first use of a queue takes an exclusive ``flock``
  on ``<directory>/<queue>.jsonl.lock`` (another holder means UplinkUnavailable), so the
  gateway's uplink (the request queue) and its downlink (the response queue) can share a
  directory. Readers without the lock (``pending_messages``) are fine.
- Other processes hand messages to a queue someone holds through its inbox: ``drop`` writes
  one file into ``<directory>/<queue>.inbox/`` (atomically: a temporary name, then a
  rename), and ``consume`` moves inbox files into the journal in the order they were
  dropped (each within ``wait_time_seconds``), deleting each file only after its ``put`` is
  in the journal. A crash in between puts it once more; an id still pending is recognised.
- Duplicates: a ``put`` of an id still pending in that queue is recognised and not written
  again, so the gateway's at-least-once redeliveries do not double messages.
- ``consume`` delivers ready messages by (priority desc, arrival); ``delay_seconds`` holds a
  message back until it is due. In-flight messages belong to this instance; after a restart
  everything not acknowledged is delivered again.
- ``get_queue_depth`` = messages not yet acknowledged or dead-lettered (in flight included).
- Journals are compacted (rewritten with only the pending messages, atomically) on load,
  on purge, and when settled lines outnumber pending ones by far.

Errors: an OSError on the directory (missing, read-only, disk full) is UplinkUnavailable;
a message over ``max_message_bytes`` or with attributes that are not strings is
MessageRejected for that message alone.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gateway.errors import MessageRejected, NotSupportedError, QueueError, UplinkUnavailable
from gateway.message import Body, QueueMessage, encode_body, new_message_id
from gateway.queue.interface import Handler, MessageQueueInterface, PublishResult

__all__ = ["FileQueue", "drop", "pending_messages"]

BACKEND = "jsonl_file"
_COMPACT_MIN_LINES = 1000


@dataclass(slots=True)
class _Entry:
    message: QueueMessage
    priority: int
    not_before: float
    seq: int


@dataclass
class _Journal:
    """One queue: its file, the pending messages, and which of them this instance holds."""

    path: Path
    entries: dict[str, _Entry] = field(default_factory=dict)
    in_flight: set[str] = field(default_factory=set)
    lines: int = 0
    next_seq: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def apply(self, record: dict[str, Any]) -> None:
        op, mid = record.get("op"), str(record.get("id", ""))
        self.lines += 1
        if op == "put":
            if mid not in self.entries:
                self.entries[mid] = _Entry(_record_message(record), int(record.get("priority", 0)),
                                           float(record.get("not_before", 0.0)), self._seq())
        elif op in ("ack", "dead"):
            self.entries.pop(mid, None)
            self.in_flight.discard(mid)
        elif op == "requeue" and mid in self.entries:
            entry = self.entries.pop(mid)
            entry.message.retry_count = int(record.get("retry_count", entry.message.retry_count))
            entry.seq = self._seq()
            self.entries[mid] = entry
            self.in_flight.discard(mid)
        self.changed.set()

    def _seq(self) -> int:
        self.next_seq += 1
        return self.next_seq

    def take_ready(self, limit: int, now: float) -> list[QueueMessage]:
        ready = [e for mid, e in self.entries.items()
                 if mid not in self.in_flight and e.not_before <= now]
        ready.sort(key=lambda e: (-e.priority, e.seq))
        # copies: a later requeue must not change a message a handler already holds
        taken = [replace(e.message, attributes=dict(e.message.attributes)) for e in ready[:limit]]
        self.in_flight.update(m.id for m in taken)
        return taken

    def next_due(self, now: float) -> float | None:
        later = [e.not_before for mid, e in self.entries.items()
                 if mid not in self.in_flight and e.not_before > now]
        return min(later) if later else None


def _record_message(record: dict[str, Any]) -> QueueMessage:
    return QueueMessage(str(record["id"]), base64.b64decode(record.get("body", "")),
                        dict(record.get("attributes") or {}), float(record.get("timestamp", 0.0)),
                        int(record.get("retry_count", 0)))


def _put_record(message: QueueMessage, priority: int, not_before: float) -> dict[str, Any]:
    return {"op": "put", "id": message.id, "body": base64.b64encode(message.body).decode(),
            "attributes": message.attributes, "timestamp": message.timestamp,
            "priority": priority, "not_before": not_before, "retry_count": message.retry_count}


def _read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The complete lines of a journal, and the byte length they cover (a torn tail is not)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    end = data.rfind(b"\n") + 1
    records = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return records, end


def drop(directory: str | os.PathLike[str], queue_name: str, body: bytes,
         attributes: dict[str, str] | None = None, message_id: str | None = None) -> str:
    """Hand a message to ``queue_name`` from any process, while a FileQueue holds the queue
    (a cloud-side tool, a sync agent, a test). Returns its id."""
    inbox = Path(directory) / f"{queue_name}.inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    message = QueueMessage(message_id or new_message_id(), body, dict(attributes or {}),
                           time.time())
    name = f"{time.time_ns():020d}-{uuid.uuid4().hex}.json"
    tmp = inbox / f".{name}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(json.dumps(_put_record(message, 0, 0.0)).encode())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, inbox / name)
    return message.id


def _inbox_files(inbox: Path) -> list[Path]:
    try:
        names = sorted(n for n in os.listdir(inbox) if n.endswith(".json"))
    except FileNotFoundError:
        return []
    return [inbox / n for n in names]


def pending_messages(directory: str | os.PathLike[str], queue_name: str) -> list[QueueMessage]:
    """What a queue holds, in delivery order, read without the lock (for tools and tests)."""
    journal = _Journal(Path(directory) / f"{queue_name}.jsonl")
    for record in _read_records(journal.path)[0]:
        journal.apply(record)
    return journal.take_ready(len(journal.entries), float("inf"))


class FileQueue(MessageQueueInterface):
    backend_name = BACKEND

    def __init__(self, directory: str, fsync: bool = True, max_message_bytes: int = 1024 * 1024,
                 dead_letter_queue: str = "dead-letters") -> None:
        if not directory:
            raise ValueError("directory must not be empty")
        if max_message_bytes < 1:
            raise ValueError("max_message_bytes must be positive")
        self.directory = Path(directory)
        self.fsync = fsync
        self.max_message_bytes = max_message_bytes
        self.dead_letter_queue = dead_letter_queue
        self._journals: dict[str, _Journal] = {}
        #: queue name -> the fd holding that queue's flock
        self._locks: dict[str, int] = {}
        self._connected = False

    # -- connection ---------------------------------------------------------------------

    async def connect(self) -> None:
        if self._connected:
            return
        try:
            await asyncio.to_thread(self._check_directory)
        except OSError as exc:
            raise UplinkUnavailable(f"cannot use {self.directory}: {exc}", backend=BACKEND) from None
        self._connected = True

    def _check_directory(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if not os.access(self.directory, os.W_OK):
            raise PermissionError(f"{self.directory} is not writable")

    def _take_lock(self, queue_name: str) -> int:
        fd = os.open(self.directory / f"{queue_name}.jsonl.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OSError(f"queue {queue_name!r} is in use by another FileQueue") from None
        return fd

    def _release(self, queue_name: str) -> None:
        fd = self._locks.pop(queue_name, None)
        if fd is not None:
            os.close(fd)  # closing releases the flock

    async def disconnect(self) -> None:
        self._connected = False
        self._journals.clear()  # in-flight messages are delivered again after a reconnect
        for queue_name in list(self._locks):
            self._release(queue_name)

    async def health_check(self) -> bool:
        if not self._connected:
            return False
        try:
            await asyncio.to_thread(os.stat, self.directory)
        except OSError:
            return False
        return os.access(self.directory, os.W_OK)

    def _require_connected(self) -> None:
        if not self._connected:
            raise UplinkUnavailable("not connected", backend=BACKEND)

    # -- journals -------------------------------------------------------------------------

    def _path(self, queue_name: str) -> Path:
        if not queue_name or "/" in queue_name or queue_name.startswith("."):
            raise MessageRejected(f"{queue_name!r} is not a usable queue (file) name",
                                  backend=BACKEND)
        return self.directory / f"{queue_name}.jsonl"

    async def _journal(self, queue_name: str) -> _Journal:
        self._require_connected()
        journal = self._journals.get(queue_name)
        if journal is None:
            path = self._path(queue_name)
            if queue_name not in self._locks:
                try:
                    self._locks[queue_name] = await asyncio.to_thread(self._take_lock, queue_name)
                except OSError as exc:
                    raise UplinkUnavailable(f"cannot use {path}: {exc}", backend=BACKEND) from None
            journal = _Journal(path)
            records = await self._io(self._load, journal.path)
            for record in records:
                journal.apply(record)
            self._journals[queue_name] = journal
            if journal.lines > len(journal.entries):
                await self._compact(journal)
        return journal

    def _load(self, path: Path) -> list[dict[str, Any]]:
        records, end = _read_records(path)
        if path.exists() and path.stat().st_size != end:
            with open(path, "r+b") as fh:  # a crash tore the last line: cut it off
                fh.truncate(end)
        return records

    async def _io(self, func: Any, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(func, *args)
        except OSError as exc:
            raise UplinkUnavailable(f"{self.directory}: {exc}", backend=BACKEND) from None

    async def _append(self, journal: _Journal, records: list[dict[str, Any]]) -> None:
        data = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)
        async with journal.lock:
            try:
                await self._io(self._write, journal.path, data)
            except UplinkUnavailable:
                # part of the data may have reached the file: reload it from there next time
                self._journals.pop(journal.path.stem, None)
                raise
            for record in records:
                journal.apply(record)

    def _write(self, path: Path, data: bytes) -> None:
        with open(path, "ab") as fh:
            fh.write(data)
            fh.flush()
            if self.fsync:
                os.fsync(fh.fileno())

    async def _compact(self, journal: _Journal) -> None:
        records = [_put_record(e.message, e.priority, e.not_before)
                   for e in sorted(journal.entries.values(), key=lambda e: e.seq)]
        data = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)
        async with journal.lock:
            await self._io(self._replace, journal.path, data)
            journal.lines = len(records)

    def _replace(self, path: Path, data: bytes) -> None:
        tmp = path.with_suffix(".jsonl.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    async def _maybe_compact(self, journal: _Journal) -> None:
        if journal.lines > max(_COMPACT_MIN_LINES, 4 * len(journal.entries)):
            await self._compact(journal)

    # -- publishing -----------------------------------------------------------------------

    def _check(self, message: QueueMessage) -> None:
        if len(message.body) > self.max_message_bytes:
            raise MessageRejected(f"{len(message.body)} bytes is over max_message_bytes "
                                  f"({self.max_message_bytes})", backend=BACKEND)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in message.attributes.items()):
            raise MessageRejected("attributes must map strings to strings", backend=BACKEND)

    async def publish(self, queue_name: str, message: Body, priority: int = 0,
                      attributes: dict[str, str] | None = None, delay_seconds: float = 0, *,
                      message_id: str | None = None) -> str:
        now = time.time()
        msg = QueueMessage(message_id or new_message_id(), encode_body(message),
                           dict(attributes or {}), now)
        self._check(msg)
        journal = await self._journal(queue_name)
        if msg.id not in journal.entries:
            await self._append(journal, [_put_record(msg, priority, now + max(delay_seconds, 0))])
        return msg.id

    async def publish_batch(self, queue_name: str,
                            messages: Sequence[QueueMessage]) -> list[PublishResult]:
        try:
            journal = await self._journal(queue_name)
        except QueueError as exc:
            return [PublishResult(m.id, exc) for m in messages]
        now = time.time()
        errors: list[QueueError | None] = []
        records: list[dict[str, Any]] = []
        for msg in messages:
            try:
                self._check(msg)
            except MessageRejected as exc:
                errors.append(exc)
                continue
            errors.append(None)
            if msg.id not in journal.entries:
                stamped = QueueMessage(msg.id, msg.body, dict(msg.attributes), msg.timestamp or now)
                records.append(_put_record(stamped, 0, 0.0))
        if records:
            try:
                await self._append(journal, records)
            except UplinkUnavailable as exc:
                return [PublishResult(m.id, exc) for m in messages]
        return [PublishResult(m.id, e) for m, e in zip(messages, errors, strict=True)]

    # -- consuming and settling ---------------------------------------------------------------

    async def consume(self, queue_name: str, handler: Handler, batch_size: int = 10,
                      wait_time_seconds: float = 1.0) -> None:
        while True:
            journal = await self._journal(queue_name)
            journal.changed.clear()
            await self._import_inbox(journal)
            now = time.time()
            batch = journal.take_ready(max(batch_size, 1), now)
            if not batch:
                due = journal.next_due(now)
                wait = wait_time_seconds if due is None else min(wait_time_seconds, due - now)
                # asyncio.timeout, not wait_for: 3.11's wait_for can turn a cancellation
                # that races its timeout into TimeoutError, and consume would never stop
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(wait, 0.01)):
                        await journal.changed.wait()
                continue
            for msg in batch:
                try:
                    await handler(msg)
                except Exception:  # the handler's failure is the message's outcome: requeue
                    if msg.id in journal.in_flight:
                        await self._requeue(journal, msg.id)

    async def _import_inbox(self, journal: _Journal) -> None:
        """Move what other processes dropped into the journal, in the order they dropped it."""
        files = await self._io(_inbox_files, journal.path.with_suffix(".inbox"))
        if not files:
            return
        records: list[dict[str, Any]] = []
        for path in files:
            try:
                record = json.loads(await self._io(path.read_bytes))
            except ValueError:  # not ours or torn: set aside, never imported twice
                await self._io(os.replace, path, path.with_suffix(".bad"))
                continue
            if record.get("id") not in journal.entries:
                records.append({**record, "op": "put"})
        if records:
            await self._append(journal, records)
        for path in files:  # only now: a crash before this imports them again (same ids)
            with contextlib.suppress(FileNotFoundError):
                await self._io(path.unlink)

    def _holder(self, message_id: str) -> _Journal | None:
        return next((j for j in self._journals.values() if message_id in j.in_flight), None)

    async def acknowledge(self, message_id: str) -> bool:
        journal = self._holder(message_id)
        if journal is None:
            return False
        await self._append(journal, [{"op": "ack", "id": message_id}])
        await self._maybe_compact(journal)
        return True

    async def reject(self, message_id: str, requeue: bool = True, reason: str = "") -> bool:
        journal = self._holder(message_id)
        if journal is None:
            return False
        if requeue:
            await self._requeue(journal, message_id)
            return True
        entry = journal.entries[message_id]
        dead = await self._journal(self.dead_letter_queue)
        record = _put_record(entry.message, entry.priority, 0.0)
        record.update(reason=reason, source_queue=journal.path.stem)
        await self._append(dead, [record])
        await self._append(journal, [{"op": "dead", "id": message_id, "reason": reason}])
        return True

    async def _requeue(self, journal: _Journal, message_id: str) -> None:
        retry_count = journal.entries[message_id].message.retry_count + 1
        await self._append(journal, [{"op": "requeue", "id": message_id,
                                      "retry_count": retry_count}])

    # -- administration -------------------------------------------------------------------

    async def get_queue_depth(self, queue_name: str) -> int:
        return len((await self._journal(queue_name)).entries)

    async def create_queue(self, queue_name: str, **kwargs: Any) -> bool:
        if kwargs:
            raise NotSupportedError(BACKEND, "create_queue options",
                                    f"a journal takes none of {sorted(kwargs)}")
        self._require_connected()
        path = self._path(queue_name)
        created: bool = await self._io(self._create, path)
        return created

    @staticmethod
    def _create(path: Path) -> bool:
        try:
            with open(path, "xb"):
                return True
        except FileExistsError:
            return False

    async def delete_queue(self, queue_name: str) -> bool:
        self._require_connected()
        path = self._path(queue_name)
        self._journals.pop(queue_name, None)
        self._release(queue_name)
        try:
            await asyncio.to_thread(path.unlink)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise UplinkUnavailable(f"{path}: {exc}", backend=BACKEND) from None
        return True

    async def purge_queue(self, queue_name: str) -> int:
        journal = await self._journal(queue_name)
        removed = len(journal.entries)
        async with journal.lock:
            await self._io(self._replace, journal.path, b"")
            journal.entries.clear()
            journal.in_flight.clear()
            journal.lines = 0
        return removed
