"""``type: redis``: a Redis Streams uplink (redis.asyncio, redis-py >= 5).

Stream entry layout (one stream per queue name; the field names are a contract for the
consumers on the other side):

    id          the gateway message id (32 hex chars), the same on every retry
    body        the exact payload bytes (binary, empty or JSON: never re-encoded)
    attributes  the attributes as a JSON object of strings
    timestamp   when the gateway accepted the message, seconds since the epoch
    priority    an integer; stored for consumers, Redis itself does not order by it
    retry_count only on re-queued copies: how often the message was handed back
    reason, source_stream, source_entry_id, failed_at
                only in the dead-letter stream (``queue.dlq_name``)

Delivery: at least once, through the consumer group ``redis_consumer_group`` (created on
demand at id 0, so everything already in the stream is backlog) under a stable consumer
name (``redis_consumer_name`` or the gateway id). ``consume`` first re-delivers this
consumer's own pending entries (left by a crash or restart), then keeps reclaiming entries
other consumers left pending longer than ``redis_claim_idle`` (XAUTOCLAIM) and reads new
ones with a blocking XREADGROUP. It survives outages: it backs off and resumes.
Publishing is at least once as well: a batch whose answer was lost is sent again, so a
stream can hold one ``id`` twice; consumers deduplicate by ``id``.

- acknowledge = XACK, then XDEL in the same MULTI when ``redis_delete_acked`` (default), so
  the stream holds exactly the unacknowledged backlog and memory stays bounded. Switch it
  off when other consumer groups read the same stream; the acknowledged history then stays
  until MAXLEN trims it.
- reject(requeue=True) appends a copy with ``retry_count`` + 1 to the end of the stream and
  acknowledges the old entry; reject(requeue=False) appends a copy with the reason to the
  dead-letter stream and acknowledges the old entry. Both run in one Lua script, so the move
  is atomic: never lost, never doubled, and a destination of the wrong type leaves the
  entry pending.
- get_queue_depth = the group's lag (entries not yet delivered; counted with XRANGE when
  Redis cannot tell, e.g. Redis < 7) + its pending entries; XLEN when the group does not
  exist yet; 0 when the stream does not exist.
- purge_queue trims the stream to nothing (XTRIM MAXLEN 0, the count it returns is the
  answer) and recreates every group on it at ``$`` in the same MULTI, which clears their
  pending lists so the depth really drops to 0.
- Not supported: ``delay_seconds`` > 0 (Redis Streams have no native delay: it raises
  NotSupportedError), broker-side priority ordering, options to ``create_queue``.

Errors: connection, timeout, loading, read-only and out-of-memory answers are
UplinkUnavailable (the server cannot take anything now); a refusal of one entry
(WRONGTYPE, ...) is MessageRejected for that message; a command the server does not know
is NotSupportedError. No redis-py exception leaves this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import orjson
import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.typing import EncodableT, FieldT

from gateway.errors import (
    ConfigError,
    MessageRejected,
    NotSupportedError,
    PermanentError,
    QueueError,
    RetryableError,
    UplinkUnavailable,
)
from gateway.masking import mask_url
from gateway.message import Body, QueueMessage, encode_body, new_message_id
from gateway.queue.inflight import InFlight
from gateway.queue.interface import Handler, MessageQueueInterface, PublishResult
from gateway.uplinks.redis.settings import RedisSettings

_hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None
try:  # the redis extra installs it; without it the connection's Python packer is used
    import hiredis

    _hiredis_pack = hiredis.pack_command
except ImportError:  # pragma: no cover - depends on the installation
    _hiredis_pack = None

if TYPE_CHECKING:
    from gateway.config import Config

log = logging.getLogger(__name__)

BACKEND = "redis"
Fields = dict[bytes, bytes]
Entry = tuple[bytes, Fields]

# Answers that mean "the server cannot take anything right now", not "this message is bad".
_UNAVAILABLE = (rexc.ConnectionError, rexc.TimeoutError, rexc.OutOfMemoryError,
                rexc.ReadOnlyError, rexc.ClusterDownError, rexc.TryAgainError, OSError)
_MIN_BACKOFF = 0.1
_MAX_BACKOFF = 5.0
_RANGE_PAGE = 1000

# KEYS[1] source stream, KEYS[2] destination stream; ARGV: group, entry id, "1" to XDEL the
# source entry, MAXLEN for the destination (0 = none), then field/value pairs.
# The type check and the XACK come first: a failure leaves the entry pending, untouched.
_MOVE_SCRIPT = """
local t = redis.call('TYPE', KEYS[2])['ok']
if t ~= 'none' and t ~= 'stream' then
  return redis.error_reply('WRONGTYPE ' .. KEYS[2] .. ' holds a ' .. t .. ', not a stream')
end
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return false
end
local args = {}
if tonumber(ARGV[4]) > 0 then
  args = {'MAXLEN', '~', ARGV[4]}
end
table.insert(args, '*')
for i = 5, #ARGV do
  table.insert(args, ARGV[i])
end
local new_id = redis.call('XADD', KEYS[2], unpack(args))
if ARGV[3] == '1' then
  redis.call('XDEL', KEYS[1], ARGV[2])
end
return new_id
"""


def translate(exc: BaseException, operation: str, *, per_message: bool = False) -> QueueError:
    """A redis-py (or socket) exception as the gateway error the caller can act on."""
    if isinstance(exc, QueueError):
        return exc
    text = str(exc) or type(exc).__name__
    if isinstance(exc, _UNAVAILABLE):
        return UplinkUnavailable(f"{operation}: {text}", backend=BACKEND, code=type(exc).__name__)
    if isinstance(exc, rexc.ResponseError) and text.lower().startswith("unknown command"):
        return NotSupportedError(BACKEND, operation, f"the server does not implement it ({text})")
    if isinstance(exc, rexc.ResponseError | rexc.DataError):
        first = text.split(" ", 1)[0]
        code = first if first.isupper() else None
        cls = MessageRejected if per_message else PermanentError
        return cls(f"{operation}: {text}", backend=BACKEND, code=code)
    return RetryableError(f"{operation}: {text}", backend=BACKEND, code=type(exc).__name__)


@contextlib.contextmanager
def _boundary(operation: str, *, per_message: bool = False) -> Iterator[None]:
    """Translate what redis-py raises, and re-raise a cancellation it lost.

    redis-py (seen with 8.1) can swallow a task.cancel() that lands mid-command, or turn it
    into a ConnectionError; the task's cancel count still shows it, so it is raised again
    here. Otherwise a cancelled consume() would run on.
    """
    task = asyncio.current_task()
    cancels = task.cancelling() if task is not None else 0
    try:
        yield
    except (rexc.RedisError, OSError) as exc:
        _raise_lost_cancel(task, cancels)
        raise translate(exc, operation, per_message=per_message) from exc
    _raise_lost_cancel(task, cancels)


def _raise_lost_cancel(task: asyncio.Task[Any] | None, cancels_before: int) -> None:
    if task is not None and task.cancelling() > cancels_before:
        raise asyncio.CancelledError


@dataclass(slots=True)
class _InFlight:
    stream: str
    entry_id: bytes
    fields: Fields
    retry_count: int


@dataclass(slots=True)
class _ConsumeState:
    ready: bool = False
    claim_cursor: bytes = b"0-0"
    next_claim: float = 0.0
    backoff: float = _MIN_BACKOFF


class RedisStreamsQueue(MessageQueueInterface):
    backend_name = BACKEND

    def __init__(self, settings: RedisSettings | None = None, *, dlq_name: str = "openhqm-dlq",
                 consumer_name: str = "") -> None:
        self.settings = settings or RedisSettings()
        self.dlq_name = dlq_name
        self.group = self.settings.redis_consumer_group
        self.consumer = (self.settings.redis_consumer_name or consumer_name
                         or socket.gethostname())
        self._maxlen = self.settings.redis_maxlen if self.settings.redis_maxlen > 0 else None
        self._client: aioredis.Redis | None = None
        self._move: Any = None
        self._in_flight: InFlight[_InFlight] = InFlight(lambda r: (r.stream, r.entry_id))

    @classmethod
    def from_config(cls, config: Config) -> Self:
        settings = config.queue.settings
        if not isinstance(settings, RedisSettings):
            raise ConfigError("queue.type", config.queue.type,
                              "the redis uplink needs the redis settings", config.source)
        return cls(settings, dlq_name=config.queue.dlq_name, consumer_name=config.gateway_id)

    # -- connection -------------------------------------------------------------------

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise UplinkUnavailable("not connected", backend=BACKEND)
        return self._client

    @property
    def target(self) -> str:
        return mask_url(self.settings.redis_url)

    async def connect(self) -> None:
        if self._client is not None:
            return
        timeout = self.settings.redis_socket_timeout
        try:
            # One immediate retry on a fresh connection, for the pooled connection a server
            # restart left dead. No more: timeouts and real outages surface at once as
            # UplinkUnavailable, and the forwarder and consume() back off themselves.
            client = aioredis.Redis.from_url(
                self.settings.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 1, supported_errors=(rexc.ConnectionError,)),
                decode_responses=False, protocol=2)
        except ValueError as exc:
            raise ConfigError("queue.redis_url", "<hidden>", f"not a Redis URL: {exc}") from None
        try:
            with _boundary("connect"):
                await client.ping()
        except QueueError as exc:
            await client.aclose()
            if isinstance(exc, UplinkUnavailable):
                raise
            raise UplinkUnavailable(str(exc), backend=BACKEND, code=exc.code) from exc
        self._client = client
        self._move = client.register_script(_MOVE_SCRIPT)

    async def disconnect(self) -> None:
        client, self._client = self._client, None
        # Entries still in flight stay pending in Redis under our consumer name; the next
        # consume() re-delivers them.
        self._in_flight.clear()
        if client is not None:
            with contextlib.suppress(rexc.RedisError, OSError):
                await client.aclose()

    async def health_check(self) -> bool:
        client = self._client
        if client is None:
            return False
        try:
            pong = await asyncio.wait_for(client.ping(), self.settings.redis_socket_timeout)
        except (rexc.RedisError, OSError):
            return False
        return bool(pong)

    # -- publishing -------------------------------------------------------------------

    async def publish(
        self,
        queue_name: str,
        message: Body,
        priority: int = 0,
        attributes: dict[str, str] | None = None,
        delay_seconds: float = 0,
        *,
        message_id: str | None = None,
    ) -> str:
        if delay_seconds > 0:
            raise NotSupportedError(BACKEND, "delay_seconds",
                                    "Redis Streams have no native message delay")
        mid = message_id or new_message_id()
        fields = _entry_fields(mid, encode_body(message), attributes or {}, time.time(), priority)
        with _boundary("publish", per_message=True):
            await self.client.xadd(queue_name, fields, maxlen=self._maxlen, approximate=True)
        return mid

    async def publish_batch(
        self, queue_name: str, messages: Sequence[QueueMessage]
    ) -> list[PublishResult]:
        """One pipelined round trip of XADDs; each reply is that message's outcome.

        Sent on a pooled connection of the client rather than through redis-py's pipeline
        object, which cost ~55 us of CPU per message here (every argument encoded in Python,
        an asyncio timeout and five calls per reply): the commands are packed by hiredis
        when it is installed (the ``redis`` extra installs it) and one timeout,
        ``redis_socket_timeout``, bounds the whole round trip (~10 us per message)."""
        try:
            client = self.client
        except UplinkUnavailable as exc:
            return [PublishResult(m.id, exc) for m in messages]
        head: tuple[EncodableT, ...] = (b"XADD", queue_name, b"*")
        if self._maxlen is not None:
            head = (b"XADD", queue_name, b"MAXLEN", b"~", self._maxlen, b"*")
        now = time.time()
        commands: list[tuple[EncodableT, ...]] = []
        errors: list[QueueError | None] = []
        for msg in messages:
            try:
                fields = _entry_fields(msg.id, msg.body, msg.attributes, msg.timestamp or now, 0)
            except MessageRejected as exc:
                errors.append(exc)
                continue
            errors.append(None)
            commands.append((*head, *itertools.chain.from_iterable(fields.items())))
        try:
            with _boundary("publish_batch"):
                replies = iter(await self._pipeline(client, commands))
        except QueueError as batch_error:
            # Nothing of a broken pipeline can be trusted: every message is retried later.
            return [PublishResult(m.id, batch_error) for m in messages]
        results: list[PublishResult] = []
        for msg, encode_error in zip(messages, errors, strict=True):
            error: QueueError | None = encode_error
            if error is None:
                reply = next(replies)
                if isinstance(reply, Exception):
                    error = translate(reply, "publish", per_message=True)
            results.append(PublishResult(msg.id, error))
        return results

    async def _pipeline(self, client: aioredis.Redis,
                        commands: list[tuple[EncodableT, ...]]) -> list[Any]:
        """Send ``commands`` in one write on a pooled connection and read a reply each: the
        server's answer, or the error it returned for that command. A pooled connection the
        server closed since its last use (a restart) is retried once on a fresh one, as the
        client's own commands are (``connect``); what was sent is sent again (at least once,
        with the same ids). Any other failure closes the connection, so no late reply is
        read as another command's."""
        if not commands:
            return []
        pool = client.connection_pool
        timeout = self.settings.redis_socket_timeout
        for attempt in (1, 2):
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                packed = _pack_commands(conn, commands)
                async with asyncio.timeout(timeout):
                    await conn.send_packed_command(packed, check_health=False)
                    return [await _reply(conn) for _ in commands]
            except rexc.ConnectionError:
                await conn.disconnect()
                if attempt == 2:
                    raise
            except TimeoutError:
                await conn.disconnect()
                raise UplinkUnavailable(
                    f"publish_batch: no reply within queue.redis_socket_timeout ({timeout:g}s)",
                    backend=BACKEND, code="TimeoutError") from None
            finally:
                await pool.release(conn)
        raise AssertionError("unreachable")

    # -- consuming --------------------------------------------------------------------

    async def consume(
        self,
        queue_name: str,
        handler: Handler,
        batch_size: int = 10,
        wait_time_seconds: float = 1.0,
    ) -> None:
        block_ms = self._block_ms(wait_time_seconds)
        state = _ConsumeState()
        while True:
            self.client  # noqa: B018 - raises UplinkUnavailable once disconnected
            try:
                await self._consume_step(queue_name, handler, batch_size, block_ms, state)
                state.backoff = _MIN_BACKOFF
            except UplinkUnavailable as exc:
                level = logging.WARNING if state.backoff == _MIN_BACKOFF else logging.DEBUG
                log.log(level, "consuming %s paused: %s; retrying in %.1fs",
                        queue_name, exc, state.backoff)
                await asyncio.sleep(state.backoff)
                state.backoff = min(state.backoff * 2, _MAX_BACKOFF)
                state.ready = False
            except PermanentError as exc:
                if exc.code != "NOGROUP":  # the stream was deleted under us: start over
                    raise
                state.ready = False

    async def _consume_step(self, stream: str, handler: Handler, batch_size: int,
                            block_ms: int, state: _ConsumeState) -> None:
        if not state.ready:
            await self._ensure_group(stream)
            await self._deliver_own_pending(stream, handler, batch_size)
            state.ready = True
        if time.monotonic() >= state.next_claim:
            await self._claim_stale(stream, handler, batch_size, state)
        with _boundary("consume"):
            reply = await self.client.xreadgroup(self.group, self.consumer, {stream: ">"},
                                                 count=batch_size, block=block_ms)
        await self._dispatch(stream, _entries(reply), handler, None)

    def _block_ms(self, wait_time_seconds: float) -> int:
        # A BLOCK longer than the socket timeout would read as a dead connection.
        timeout = self.settings.redis_socket_timeout
        limit = max(timeout - 1.0, timeout / 2)
        return max(1, int(min(wait_time_seconds, limit) * 1000))

    async def _ensure_group(self, stream: str) -> bool:
        try:
            with _boundary("create consumer group"):
                await self.client.xgroup_create(stream, self.group, id="0", mkstream=True)
        except PermanentError as exc:
            if exc.code == "BUSYGROUP":
                return False
            raise
        return True

    async def _deliver_own_pending(self, stream: str, handler: Handler, batch_size: int) -> None:
        """Entries this consumer name received before a restart and never settled."""
        start = b"0"
        while True:
            with _boundary("consume"):
                reply = await self.client.xreadgroup(self.group, self.consumer, {stream: start},
                                                     count=batch_size)
            entries = _entries(reply)
            if not entries:
                return
            await self._dispatch(stream, entries, handler, await self._deliveries(stream, entries))
            start = entries[-1][0]

    async def _claim_stale(self, stream: str, handler: Handler, batch_size: int,
                           state: _ConsumeState) -> None:
        """Take over entries another consumer (a crashed gateway) left pending too long."""
        idle_ms = max(1, int(self.settings.redis_claim_idle * 1000))
        with _boundary("consume"):
            reply = await self.client.xautoclaim(stream, self.group, self.consumer, idle_ms,
                                                 state.claim_cursor, count=batch_size)
        state.claim_cursor, entries = reply[0], list(reply[1])
        if state.claim_cursor in (b"0-0", "0-0"):
            state.next_claim = time.monotonic() + max(self.settings.redis_claim_idle / 2, 0.05)
        await self._dispatch(stream, entries, handler, await self._deliveries(stream, entries))

    async def _deliveries(self, stream: str, entries: list[Entry]) -> dict[bytes, int]:
        """How often each re-delivered entry has been delivered (XPENDING), for retry_count."""
        if not entries:
            return {}
        with _boundary("consume"):
            rows = await self.client.xpending_range(
                stream, self.group, entries[0][0], entries[-1][0],
                len(entries) + len(self._in_flight), consumername=self.consumer)
        return {_bytes(row["message_id"]): int(row["times_delivered"]) for row in rows}

    async def _dispatch(self, stream: str, entries: list[Entry], handler: Handler,
                        deliveries: dict[bytes, int] | None) -> None:
        for entry_id, fields in entries:
            if not fields:
                await self._drop_vanished(stream, entry_id)
                continue
            if (stream, entry_id) in self._in_flight:
                continue
            delivered = deliveries.get(entry_id, 1) if deliveries else 1
            record = _InFlight(stream, entry_id, fields,
                               _stored_retry_count(fields) + max(delivered - 1, 0))
            msg = _to_message(record)
            self._in_flight.track(msg.id, record)
            try:
                await handler(msg)
            except Exception as exc:  # the handler's failure is the message's outcome
                await self._settle_after_handler_error(msg.id, record, str(exc))

    async def _settle_after_handler_error(self, message_id: str, record: _InFlight,
                                          reason: str) -> None:
        if not self._in_flight.untrack(message_id, record):
            return  # the handler settled it before raising
        # On failure the entry simply stays pending and is re-delivered after reconnecting.
        await self._move_entry(record, requeue=True, reason=reason)

    async def _drop_vanished(self, stream: str, entry_id: bytes) -> None:
        """A pending entry whose data is gone (MAXLEN trimmed or deleted it): settle it."""
        log.warning("entry %s of %s was trimmed before it was acknowledged", entry_id, stream)
        with _boundary("consume"):
            await self.client.xack(stream, self.group, entry_id)

    # -- settling ---------------------------------------------------------------------

    async def acknowledge(self, message_id: str) -> bool:
        return await self._in_flight.settle(message_id, self._ack)

    async def _ack(self, record: _InFlight) -> bool:
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(record.stream, self.group, record.entry_id)
        if self.settings.redis_delete_acked:
            pipe.xdel(record.stream, record.entry_id)
        with _boundary("acknowledge"):
            replies = await pipe.execute()
        return bool(replies[0])

    async def reject(self, message_id: str, requeue: bool = True, reason: str = "") -> bool:
        return await self._in_flight.settle(
            message_id, lambda record: self._move_entry(record, requeue=requeue, reason=reason))

    async def _move_entry(self, record: _InFlight, *, requeue: bool, reason: str) -> bool:
        fields = dict(record.fields)
        if requeue:
            destination, maxlen = record.stream, self.settings.redis_maxlen
            fields[b"retry_count"] = b"%d" % (record.retry_count + 1)
        else:
            destination, maxlen = self.dlq_name, 0  # dead letters are never trimmed away
            fields[b"retry_count"] = b"%d" % record.retry_count
            fields[b"reason"] = reason.encode()
            fields[b"source_stream"] = record.stream.encode()
            fields[b"source_entry_id"] = record.entry_id
            fields[b"failed_at"] = repr(time.time()).encode()
        args: list[bytes | str | int] = [self.group, record.entry_id,
                                         "1" if self.settings.redis_delete_acked else "0", maxlen]
        for key, value in fields.items():
            args += [key, value]
        with _boundary("reject", per_message=True):
            new_id = await self._move(keys=[record.stream, destination], args=args,
                                      client=self.client)
        return new_id is not None

    def _forget_stream(self, stream: str) -> None:
        self._in_flight.forget(lambda r: r.stream == stream)

    # -- administration ---------------------------------------------------------------

    async def get_queue_depth(self, queue_name: str) -> int:
        pipe = self.client.pipeline(transaction=False)
        pipe.xinfo_groups(queue_name)
        pipe.xlen(queue_name)
        with _boundary("get_queue_depth"):
            groups, length = await pipe.execute(raise_on_error=False)
        if isinstance(length, Exception):
            raise translate(length, "get_queue_depth")
        if isinstance(groups, Exception):
            if str(groups) == "no such key":
                return 0
            raise translate(groups, "get_queue_depth")
        group = next((g for g in groups if _text(g["name"]) == self.group), None)
        if group is None:
            return int(length)
        lag = group.get("lag")
        if lag is None:  # Redis < 7, or deletions ahead of the group make it unknown
            lag = await self._count_after(queue_name, group["last-delivered-id"])
        # Trimmed entries can linger in the lag counter; the undelivered fit in the stream.
        return int(group["pending"]) + min(int(lag), int(length))

    async def _count_after(self, stream: str, last_id: bytes | str) -> int:
        count, start = 0, b"(" + _bytes(last_id)
        while True:
            with _boundary("get_queue_depth"):
                page: list[Any] = await self.client.xrange(stream, min=start, max="+",
                                                           count=_RANGE_PAGE) or []
            count += len(page)
            if len(page) < _RANGE_PAGE:
                return count
            start = b"(" + _bytes(page[-1][0])

    async def create_queue(self, queue_name: str, **kwargs: Any) -> bool:
        if kwargs:
            raise NotSupportedError(BACKEND, "create_queue options",
                                    f"a Redis stream takes none of {sorted(kwargs)}")
        return await self._ensure_group(queue_name)

    async def delete_queue(self, queue_name: str) -> bool:
        with _boundary("delete_queue"):
            kind = _text(await self.client.type(queue_name))
            if kind not in ("none", "stream"):
                raise PermanentError(f"delete_queue: {queue_name} holds a {kind}, not a stream",
                                     backend=BACKEND, code="WRONGTYPE")
            removed = await self.client.delete(queue_name)
        self._forget_stream(queue_name)
        return bool(removed)

    async def purge_queue(self, queue_name: str) -> int:
        client = self.client
        with _boundary("purge_queue"):
            try:
                groups = await client.xinfo_groups(queue_name)
            except rexc.ResponseError as exc:
                if str(exc) == "no such key":
                    return 0
                raise
            pipe = client.pipeline(transaction=True)
            pipe.xtrim(queue_name, maxlen=0, approximate=False)
            for group in groups:
                pipe.xgroup_destroy(queue_name, group["name"])
                pipe.xgroup_create(queue_name, group["name"], id="$")
            replies = await pipe.execute()
        self._forget_stream(queue_name)
        return int(replies[0])


def _entry_fields(message_id: str, body: bytes, attributes: dict[str, str], timestamp: float,
                  priority: int) -> dict[FieldT, EncodableT]:
    try:
        encoded = orjson.dumps(attributes)
    except orjson.JSONEncodeError as exc:
        raise MessageRejected(f"attributes are not a mapping of strings: {exc}",
                              backend=BACKEND) from None
    return {"id": message_id, "body": body, "attributes": encoded,
            "timestamp": repr(timestamp), "priority": str(priority)}


def _pack_commands(conn: Any, commands: list[tuple[EncodableT, ...]]) -> list[bytes]:
    """The commands in the Redis protocol: packed by hiredis in C when it is installed,
    else by the connection (redis-py's Python encoder)."""
    if _hiredis_pack is not None:
        return [b"".join(map(_hiredis_pack, commands))]
    return list(conn.pack_commands(commands))


async def _reply(conn: Any) -> Any:
    """The next reply on ``conn``; an error reply is returned, not raised (it is that one
    command's outcome). No timeout of its own: the caller bounds the whole round trip."""
    try:
        return await conn.read_response(disable_decoding=True, timeout=math.inf)
    except rexc.ResponseError as exc:
        return exc


def _entries(reply: Any) -> list[Entry]:
    """XREADGROUP's [[stream, [(id, fields), ...]]] (or nothing) as a list of entries."""
    if not reply:
        return []
    return [(entry_id, fields) for _stream, batch in reply for entry_id, fields in batch]


def _stored_retry_count(fields: Fields) -> int:
    try:
        return int(fields.get(b"retry_count", b"0"))
    except ValueError:
        return 0


def _to_message(record: _InFlight) -> QueueMessage:
    fields, entry_id = record.fields, record.entry_id.decode()
    raw = (record.stream, entry_id)
    message_id, body = fields.get(b"id"), fields.get(b"body")
    if message_id is None or body is None:
        # An entry some other producer wrote: its fields become a JSON body.
        foreign = {_text(k): _text(v) for k, v in fields.items()}
        return QueueMessage(entry_id, orjson.dumps(foreign), {}, _entry_time(entry_id),
                            record.retry_count, raw)
    try:
        timestamp = float(fields.get(b"timestamp", b""))
    except ValueError:
        timestamp = _entry_time(entry_id)
    return QueueMessage(_text(message_id), body, _attributes(fields.get(b"attributes")),
                        timestamp, record.retry_count, raw)


def _attributes(raw: bytes | None) -> dict[str, str]:
    if not raw:
        return {}
    try:
        decoded = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(decoded, dict):
        return {}
    return {str(k): v if isinstance(v, str) else str(v) for k, v in decoded.items()}


def _entry_time(entry_id: str) -> float:
    """A stream entry id starts with the milliseconds at which Redis appended it."""
    try:
        return int(entry_id.split("-", 1)[0]) / 1000
    except ValueError:
        return 0.0


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _bytes(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()
