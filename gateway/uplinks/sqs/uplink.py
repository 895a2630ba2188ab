"""``type: sqs``: an Amazon SQS uplink (aioboto3 / aiobotocore), also for SQS-compatible servers.

One aiobotocore client, opened in ``connect`` and closed in ``disconnect``, serves every
call; nothing blocks the event loop (the SDK's model files are loaded in a thread first).
Message layout, body encoding and the 10-attribute limit: gateway/uplinks/sqs/codec.py.

Queues. A queue name may be a full queue URL or a name resolved once with GetQueueUrl and
cached; ``sqs_queue_url`` is the URL of ``queue.request_queue_name``. A name ending in
``.fifo`` (or such a URL) is a FIFO queue. A missing queue is UplinkUnavailable (the
gateway keeps buffering) unless ``sqs_auto_create_queues`` creates it.

Publishing (at least once):
- ``publish_batch`` packs messages into SendMessageBatch calls of at most 10 entries and
  ``sqs_max_message_size`` bytes; standard queues send up to ``sqs_max_concurrent_batches``
  calls at once, FIFO queues one after the other. A message larger than the limit is
  MessageRejected before anything is sent. A failed entry is MessageRejected when SQS says
  the sender is at fault (``SenderFault``, except throttling), else RetryableError. A call
  refused as a whole for its content (a server that validates the whole batch first) is
  repeated entry by entry, so only the culprit fails. A call that cannot reach SQS fails
  its entries and every later one with UplinkUnavailable; nothing more is sent.
- FIFO: ``MessageGroupId`` from ``sqs_message_group_id`` (default the MQTT topic),
  ``MessageDeduplicationId`` = the gateway message id, so a retry within SQS's 5-minute
  window is dropped by SQS itself.
- ``publish(delay_seconds=...)`` uses SQS's native per-message delay (whole seconds,
  rounded up, at most 900); FIFO queues have no per-message delay: NotSupportedError.
  ``priority`` travels as the attribute ``openhqm_priority``; SQS does not order by it.

Consuming (at least once): long polls of ReceiveMessage (``wait_time_seconds``, 1..20 s)
with ``sqs_visibility_timeout``. A received message is in flight under its gateway id
with its latest receipt handle; when its visibility runs out while we still hold it, SQS
hands it to us again and only the handle is updated (it is not given to the handler twice).
- acknowledge = DeleteMessage; a receipt handle SQS no longer accepts answers False.
- reject(requeue=True) = ChangeMessageVisibility 0: redelivered at once, and
  ``retry_count`` (ApproximateReceiveCount - 1) grows.
- reject(requeue=False) sends a copy with ``openhqm_dlq_reason``, ``openhqm_dlq_source``
  and ``openhqm_dlq_failed_at`` to ``queue.dlq_name`` and then deletes the original; a
  failed send leaves the message in flight. SQS's own redrive policy (maxReceiveCount)
  works as well: create the queue with ``dead_letter_queue=`` and ``max_receive_count=``.
- get_queue_depth = ApproximateNumberOfMessages + ...NotVisible + ...Delayed (0 for a
  queue that does not exist). On AWS these counts are approximate by nature.
- purge_queue: PurgeQueue returns no count; the answer is the depth measured just before
  the purge (0 without calling PurgeQueue when the queue is empty, which also avoids SQS's
  one-purge-per-60-seconds rule). Messages arriving between the two calls are removed
  without being counted; on AWS the purge itself completes within 60 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import aioboto3
from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
from botocore import exceptions as bexc  # type: ignore[import-untyped]

from gateway.errors import (
    ConfigError,
    MessageRejected,
    NotSupportedError,
    QueueError,
    RetryableError,
    UplinkUnavailable,
)
from gateway.message import Body, QueueMessage, encode_body, new_message_id
from gateway.queue.inflight import InFlight
from gateway.queue.interface import Handler, MessageQueueInterface, PublishResult
from gateway.queue.keys import KeyTemplate
from gateway.uplinks.sqs import codec
from gateway.uplinks.sqs.errors import (
    BACKEND,
    MISSING_QUEUE,
    STALE_RECEIPT,
    boundary,
    entry_error,
    translate,
)
from gateway.uplinks.sqs.settings import SqsSettings

if TYPE_CHECKING:
    from gateway.config import Config

log = logging.getLogger(__name__)

MAX_BATCH_ENTRIES = 10
MAX_DELAY_SECONDS = 900
MAX_WAIT_SECONDS = 20
_MIN_BACKOFF = 0.1
_MAX_BACKOFF = 5.0
_DEPTH_ATTRIBUTES = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
                     "ApproximateNumberOfMessagesDelayed"]
_REASON_LIMIT = 4096


@dataclass(slots=True)
class _InFlight:
    queue_name: str
    url: str
    sqs_id: str
    receipt: str
    message: QueueMessage


@dataclass(slots=True)
class _Entry:
    """One message of a publish_batch, ready to send; ``index`` is its place in the input."""

    index: int
    message: QueueMessage
    fields: dict[str, Any]
    size: int


class SqsQueue(MessageQueueInterface):
    backend_name = BACKEND
    #: the service acknowledges a message once it stored it
    durable_acks = True

    def __init__(self, settings: SqsSettings | None = None, *,
                 request_queue_name: str = "openhqm-requests",
                 dlq_name: str = "openhqm-dlq") -> None:
        self.settings = settings or SqsSettings()
        self.request_queue_name = request_queue_name
        self.dlq_name = dlq_name
        self._group_template = KeyTemplate.parse(self.settings.sqs_message_group_id,
                                                 key="queue.sqs_message_group_id")
        self._urls: dict[str, str] = {}
        if self.settings.sqs_queue_url:
            self._urls[request_queue_name] = self.settings.sqs_queue_url
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self._in_flight: InFlight[_InFlight] = InFlight(lambda r: r.sqs_id)

    @classmethod
    def from_config(cls, config: Config) -> Self:
        settings = config.queue.settings
        if not isinstance(settings, SqsSettings):
            raise ConfigError("queue.type", config.queue.type,
                              "the sqs uplink needs the sqs settings", config.source)
        return cls(settings, request_queue_name=config.queue.request_queue_name,
                   dlq_name=config.queue.dlq_name)

    # -- connection -------------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            raise UplinkUnavailable("not connected", backend=BACKEND)
        return self._client

    @property
    def target(self) -> str:
        s = self.settings
        return (s.endpoint_url or s.sqs_queue_url
                or f"https://sqs.{s.sqs_region}.amazonaws.com")

    async def connect(self) -> None:
        """Build the client and make one round trip (``_round_trip``): a wrong endpoint or
        credentials SQS refuses fail here, as UplinkUnavailable naming the reason, and not at
        the first message."""
        if self._client is not None:
            return
        s = self.settings
        try:
            session = await asyncio.to_thread(_new_session, s)
        except bexc.ProfileNotFound as exc:
            raise ConfigError("queue.sqs_profile", s.sqs_profile, str(exc)) from None
        config = AioConfig(connect_timeout=s.sqs_connect_timeout,
                           read_timeout=s.sqs_read_timeout,
                           retries={"total_max_attempts": max(s.sqs_max_attempts, 1),
                                    "mode": "standard"},
                           max_pool_connections=max(10, s.sqs_max_concurrent_batches + 4))
        stack = contextlib.AsyncExitStack()
        try:
            self._client = await stack.enter_async_context(session.client(
                "sqs", region_name=s.sqs_region, endpoint_url=s.endpoint_url or None,
                config=config))
        except bexc.InvalidRegionError as exc:
            await stack.aclose()
            raise ConfigError("queue.sqs_region", s.sqs_region, str(exc)) from None
        except (bexc.BotoCoreError, OSError) as exc:
            await stack.aclose()
            raise translate(exc, "connect") from exc
        except ValueError as exc:  # a malformed endpoint_url
            await stack.aclose()
            raise ConfigError("queue.endpoint_url", s.endpoint_url, str(exc)) from None
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        try:
            await self._round_trip("connect")
        except UplinkUnavailable as exc:
            # An answer proves the endpoint and the credentials, "no such queue" (it may be
            # created on first use) and "not allowed to look it up" (a send-only role) too.
            if exc.code in MISSING_QUEUE or exc.code in ("AccessDenied", "AccessDeniedException"):
                return
            await self.disconnect()
            raise
        except QueueError:
            return  # SQS answered (a request it did not like): it is there
        except BaseException:
            await self.disconnect()
            raise

    async def disconnect(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        # What is still in flight becomes visible again when its visibility timeout ends.
        self._in_flight.clear()
        if stack is not None:
            with contextlib.suppress(bexc.BotoCoreError, OSError):
                await stack.aclose()

    async def health_check(self) -> bool:
        """True after SQS answered about the request queue (also "it does not exist")."""
        if self._client is None:
            return False
        try:
            await self._round_trip("health_check")
        except QueueError as exc:
            return exc.code in MISSING_QUEUE
        return True

    async def _round_trip(self, operation: str) -> None:
        """Ask SQS about the request queue (its attributes when its URL is known, else its
        URL); what SQS answers, or why it did not, as the gateway's error."""
        timeout = self.settings.sqs_connect_timeout + self.settings.sqs_read_timeout
        with boundary(operation):
            name = self.request_queue_name
            url = self._urls.get(name) or (name if _is_url(name) else "")
            if url:
                call = self.client.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
            else:
                call = self.client.get_queue_url(QueueName=self.request_queue_name)
            await asyncio.wait_for(call, timeout)

    # -- queue names and URLs ---------------------------------------------------------

    async def queue_url(self, queue_name: str, *, create: bool | None = None) -> str:
        """The URL of ``queue_name``; a missing queue is created when ``create`` (default
        ``sqs_auto_create_queues``), else UplinkUnavailable."""
        if _is_url(queue_name):
            return queue_name
        url = self._urls.get(queue_name) or await self._lookup(queue_name)
        if url is not None:
            return url
        if create if create is not None else self.settings.sqs_auto_create_queues:
            url, _created = await self._create(queue_name, {})
            return url
        raise UplinkUnavailable(f"queue {queue_name} does not exist (sqs_auto_create_queues "
                                "is off)", backend=BACKEND, code="NonExistentQueue")

    async def _lookup(self, queue_name: str) -> str | None:
        if _is_url(queue_name):
            return queue_name
        cached = self._urls.get(queue_name)
        if cached:
            return cached
        try:
            with boundary("GetQueueUrl"):
                reply = await self.client.get_queue_url(QueueName=queue_name)
        except QueueError as exc:
            if exc.code in MISSING_QUEUE:
                return None
            raise
        url = str(reply["QueueUrl"])
        self._urls[queue_name] = url
        return url

    async def _create(self, queue_name: str, attributes: dict[str, str]) -> tuple[str, bool]:
        attrs = {**self.settings.sqs_queue_attributes, **attributes}
        if queue_name.endswith(".fifo"):
            attrs.setdefault("FifoQueue", "true")
        with boundary("CreateQueue"):
            reply = await self.client.create_queue(QueueName=queue_name, Attributes=attrs)
        url = str(reply["QueueUrl"])
        self._urls[queue_name] = url
        return url, True

    def _missing(self, queue_name: str, exc: QueueError) -> None:
        """Forget a cached URL SQS no longer knows (the queue was deleted)."""
        if exc.code in MISSING_QUEUE and self._urls.get(queue_name) != self.settings.sqs_queue_url:
            self._urls.pop(queue_name, None)

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
        if delay_seconds > MAX_DELAY_SECONDS:
            raise NotSupportedError(BACKEND, "delay_seconds",
                                    f"SQS delays a message by at most {MAX_DELAY_SECONDS} s")
        msg = QueueMessage(message_id or new_message_id(), encode_body(message),
                           dict(attributes or {}), time.time())
        extra = {codec.ATTR_PRIORITY: str(priority)} if priority else {}
        self.client  # noqa: B018 - raises UplinkUnavailable once disconnected
        for attempt in (1, 2):
            try:
                await self._send_one(queue_name, msg, delay_seconds, extra)
                break
            except QueueError as exc:
                self._missing(queue_name, exc)
                if attempt == 2 or exc.code not in MISSING_QUEUE \
                        or not self.settings.sqs_auto_create_queues or _is_url(queue_name):
                    raise
        return msg.id

    async def _send_one(self, queue_name: str, msg: QueueMessage, delay_seconds: float,
                        extra: dict[str, str]) -> None:
        url = await self.queue_url(queue_name)
        fifo = _is_fifo(url)
        if fifo and delay_seconds > 0:
            raise NotSupportedError(BACKEND, "delay_seconds",
                                    "FIFO queues have only a queue-wide delay")
        fields = dict(self._entry(0, msg, fifo, extra).fields)
        del fields["Id"]
        if delay_seconds > 0:
            fields["DelaySeconds"] = math.ceil(delay_seconds)
        with boundary("SendMessage", per_message=True):
            await self.client.send_message(QueueUrl=url, **fields)

    async def publish_batch(
        self, queue_name: str, messages: Sequence[QueueMessage]
    ) -> list[PublishResult]:
        if not messages:
            return []
        try:
            self.client  # noqa: B018 - raises UplinkUnavailable once disconnected
            url = await self.queue_url(queue_name)
        except QueueError as exc:
            self._missing(queue_name, exc)
            return [PublishResult(m.id, exc) for m in messages]
        fifo = _is_fifo(url)
        errors: list[QueueError | None] = [None] * len(messages)
        entries: list[_Entry] = []
        for index, msg in enumerate(messages):
            try:
                entries.append(self._entry(index, msg, fifo))
            except MessageRejected as exc:
                errors[index] = exc
        missing = await self._send_entries(queue_name, url, fifo, entries, errors)
        if missing is not None and self.settings.sqs_auto_create_queues and not _is_url(queue_name):
            # The queue vanished under us (deleted, or a test server restarted): create it
            # once more and send what it refused again.
            again = [e for e in entries if isinstance(errors[e.index], UplinkUnavailable)
                     and getattr(errors[e.index], "code", None) in MISSING_QUEUE]
            try:
                url = await self.queue_url(queue_name)
            except QueueError as exc:
                for entry in again:
                    errors[entry.index] = exc
            else:
                for entry in again:
                    errors[entry.index] = None
                await self._send_entries(queue_name, url, fifo, again, errors)
        return [PublishResult(m.id, errors[i]) for i, m in enumerate(messages)]

    async def _send_entries(self, queue_name: str, url: str, fifo: bool, entries: list[_Entry],
                            errors: list[QueueError | None]) -> UplinkUnavailable | None:
        """Send ``entries`` in chunks; returns the error when the queue turned out missing."""
        chunks = self._chunks(entries)
        sender = _BatchSender(self, queue_name, url, errors)
        if fifo or len(chunks) == 1:
            for chunk in chunks:
                await sender.send(chunk)
        else:
            limit = asyncio.Semaphore(max(1, self.settings.sqs_max_concurrent_batches))

            async def bounded(chunk: list[_Entry]) -> None:
                async with limit:
                    await sender.send(chunk)

            await asyncio.gather(*(bounded(chunk) for chunk in chunks))
        unavailable = sender.unavailable
        return unavailable if unavailable is not None and unavailable.code in MISSING_QUEUE \
            else None

    def _entry(self, index: int, msg: QueueMessage, fifo: bool,
               extra: dict[str, str] | None = None) -> _Entry:
        try:
            encoded = codec.encode(msg, extra)
        except (TypeError, ValueError, AttributeError) as exc:
            raise MessageRejected(f"cannot encode the message: {exc}", backend=BACKEND) from None
        limit = self.settings.sqs_max_message_size
        if encoded.size > limit:
            raise MessageRejected(f"message of {encoded.size} bytes (body and attributes, as "
                                  f"sent) exceeds the SQS limit of {limit} bytes",
                                  backend=BACKEND, code="MessageTooLong")
        fields: dict[str, Any] = {"Id": str(index), "MessageBody": encoded.body,
                                  "MessageAttributes": encoded.attributes}
        if fifo:
            fields["MessageGroupId"] = codec.group_id(self._group_template.render(msg))
            fields["MessageDeduplicationId"] = msg.id[:128]
        return _Entry(index, msg, fields, encoded.size)

    def _chunks(self, entries: list[_Entry]) -> list[list[_Entry]]:
        limit = self.settings.sqs_max_message_size
        chunks: list[list[_Entry]] = []
        current: list[_Entry] = []
        size = 0
        for entry in entries:
            if current and (len(current) == MAX_BATCH_ENTRIES or size + entry.size > limit):
                chunks.append(current)
                current, size = [], 0
            current.append(entry)
            size += entry.size
        if current:
            chunks.append(current)
        return chunks

    # -- consuming --------------------------------------------------------------------

    async def consume(
        self,
        queue_name: str,
        handler: Handler,
        batch_size: int = 10,
        wait_time_seconds: float = 1.0,
    ) -> None:
        """Long polls of ``wait_time_seconds`` (whole seconds, at most 20); below one second,
        short polls with that pause after an empty answer."""
        long_poll = wait_time_seconds >= 1
        wait = min(MAX_WAIT_SECONDS, math.ceil(wait_time_seconds)) if long_poll else 0
        count = min(MAX_BATCH_ENTRIES, max(1, batch_size))
        backoff = _MIN_BACKOFF
        while True:
            self.client  # noqa: B018 - raises UplinkUnavailable once disconnected
            try:
                url = await self.queue_url(queue_name)
                messages = await self._receive(url, count, wait)
            except UplinkUnavailable as exc:
                self._missing(queue_name, exc)
                level = logging.WARNING if backoff == _MIN_BACKOFF else logging.DEBUG
                log.log(level, "consuming %s paused: %s; retrying in %.1fs",
                        queue_name, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
                continue
            backoff = _MIN_BACKOFF
            if not messages and not long_poll:
                await asyncio.sleep(max(wait_time_seconds, 0.01))
            for raw in messages:
                await self._dispatch(queue_name, url, raw, handler)

    async def _receive(self, url: str, count: int, wait: int) -> list[dict[str, Any]]:
        """One ReceiveMessage. A cancellation does not abandon the request: SQS would still
        hand its messages to nobody (invisible for the visibility timeout), so the request
        is finished and what it received is made visible again before cancelling."""
        request = asyncio.ensure_future(self._receive_once(url, count, wait))
        try:
            return await asyncio.shield(request)
        except asyncio.CancelledError:
            await self._release_orphans(url, request, wait)
            raise

    async def _receive_once(self, url: str, count: int, wait: int) -> list[dict[str, Any]]:
        with boundary("ReceiveMessage"):
            reply = await self.client.receive_message(
                QueueUrl=url, MaxNumberOfMessages=count, WaitTimeSeconds=wait,
                VisibilityTimeout=math.ceil(self.settings.sqs_visibility_timeout),
                MessageAttributeNames=["All"],
                MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"])
        return list(reply.get("Messages") or [])

    async def _release_orphans(self, url: str, request: asyncio.Future[list[dict[str, Any]]],
                               wait: int) -> None:
        try:
            messages = await asyncio.wait_for(request, wait + self.settings.sqs_read_timeout)
            if messages:
                with boundary("ChangeMessageVisibilityBatch"):
                    await self.client.change_message_visibility_batch(QueueUrl=url, Entries=[
                        {"Id": str(i), "ReceiptHandle": raw["ReceiptHandle"],
                         "VisibilityTimeout": 0} for i, raw in enumerate(messages)])
        except (QueueError, TimeoutError, KeyError) as exc:
            log.warning("a receive cancelled mid-flight could not return its messages (%s); "
                        "they reappear after the visibility timeout", exc)

    async def _dispatch(self, queue_name: str, url: str, raw: dict[str, Any],
                        handler: Handler) -> None:
        sqs_id, receipt = str(raw.get("MessageId", "")), str(raw.get("ReceiptHandle", ""))
        held = self._in_flight.get(sqs_id)
        if held is not None:  # its visibility ran out while we hold it: it stays ours
            held.receipt = receipt
            return
        msg = codec.decode(raw)
        record = _InFlight(queue_name, url, sqs_id, receipt, msg)
        self._in_flight.track(msg.id, record)
        try:
            await handler(msg)
        except Exception as exc:  # the handler's failure is the message's outcome
            if not self._in_flight.untrack(msg.id, record):
                return  # the handler settled it before raising
            try:
                await self._change_visibility(record, 0)
            except QueueError as settle_error:
                log.warning("message %s could not be requeued (%s); it returns after its "
                            "visibility timeout", msg.id, settle_error)
            log.debug("handler failed on %s: %s", msg.id, exc)

    # -- settling ---------------------------------------------------------------------

    async def acknowledge(self, message_id: str) -> bool:
        return await self._in_flight.settle(message_id, self._delete)

    async def _delete(self, record: _InFlight) -> bool:
        try:
            with boundary("DeleteMessage"):
                await self.client.delete_message(QueueUrl=record.url,
                                                  ReceiptHandle=record.receipt)
        except QueueError as exc:
            if exc.code in STALE_RECEIPT:
                return False  # gone from us: nothing to hand back
            raise
        return True

    async def reject(self, message_id: str, requeue: bool = True, reason: str = "") -> bool:
        async def move(record: _InFlight) -> bool:
            try:
                if requeue:
                    await self._change_visibility(record, 0)
                else:
                    await self._dead_letter(record, reason)
            except QueueError as exc:
                if exc.code in STALE_RECEIPT:
                    return False
                raise
            return True

        return await self._in_flight.settle(message_id, move)

    async def _change_visibility(self, record: _InFlight, seconds: int) -> None:
        with boundary("ChangeMessageVisibility"):
            await self.client.change_message_visibility(
                QueueUrl=record.url, ReceiptHandle=record.receipt, VisibilityTimeout=seconds)

    async def _dead_letter(self, record: _InFlight, reason: str) -> None:
        text = codec.clean_text(reason)[:_REASON_LIMIT] or "rejected"
        extra = {codec.ATTR_DLQ_REASON: text, codec.ATTR_DLQ_SOURCE: record.queue_name,
                 codec.ATTR_DLQ_FAILED_AT: f"{time.time():.3f}"}
        try:
            url = await self.queue_url(self.dlq_name)
        except QueueError as exc:
            self._missing(self.dlq_name, exc)
            raise
        entry = self._entry(0, record.message, _is_fifo(url), extra)
        fields = dict(entry.fields)
        del fields["Id"]
        with boundary("SendMessage"):
            await self.client.send_message(QueueUrl=url, **fields)
        with boundary("DeleteMessage"):
            await self.client.delete_message(QueueUrl=record.url, ReceiptHandle=record.receipt)

    def _forget_queue(self, url: str) -> None:
        self._in_flight.forget(lambda r: r.url == url)

    # -- administration ---------------------------------------------------------------

    async def get_queue_depth(self, queue_name: str) -> int:
        url = await self._lookup(queue_name)
        if url is None:
            return 0
        try:
            return await self._depth(url)
        except QueueError as exc:
            if exc.code in MISSING_QUEUE:
                self._missing(queue_name, exc)
                return 0
            raise

    async def _depth(self, url: str) -> int:
        with boundary("GetQueueAttributes"):
            reply = await self.client.get_queue_attributes(QueueUrl=url,
                                                           AttributeNames=_DEPTH_ATTRIBUTES)
        values = reply.get("Attributes") or {}
        return sum(int(values.get(name, 0)) for name in _DEPTH_ATTRIBUTES)

    async def create_queue(self, queue_name: str, **kwargs: Any) -> bool:
        """Create ``queue_name``; False when it exists. Options: SQS attribute names
        (``VisibilityTimeout=60``, ``MaximumMessageSize=1024``...), ``attributes={...}``,
        and ``dead_letter_queue=NAME`` with ``max_receive_count=N`` for a redrive policy."""
        attributes = await self._create_attributes(kwargs)
        if await self._lookup(queue_name) is not None:
            return False
        _url, created = await self._create(queue_name, attributes)
        return created

    async def _create_attributes(self, options: dict[str, Any]) -> dict[str, str]:
        options = dict(options)
        attributes = {str(k): _attribute_text(v) for k, v in
                      (options.pop("attributes", None) or {}).items()}
        dlq = options.pop("dead_letter_queue", None)
        max_receive = options.pop("max_receive_count", None)
        for key in list(options):
            if key[:1].isupper():
                attributes[key] = _attribute_text(options.pop(key))
        if options:
            raise NotSupportedError(BACKEND, "create_queue options",
                                    f"unknown options {sorted(options)}; pass SQS attribute "
                                    "names, attributes=, dead_letter_queue=, max_receive_count=")
        if dlq is not None:
            dlq_url = await self.queue_url(str(dlq), create=True)
            with boundary("GetQueueAttributes"):
                reply = await self.client.get_queue_attributes(QueueUrl=dlq_url,
                                                               AttributeNames=["QueueArn"])
            attributes["RedrivePolicy"] = _attribute_text({
                "deadLetterTargetArn": reply["Attributes"]["QueueArn"],
                "maxReceiveCount": str(max_receive or 5)})
        return attributes

    async def delete_queue(self, queue_name: str) -> bool:
        url = await self._lookup(queue_name)
        if url is None:
            return False
        try:
            with boundary("DeleteQueue"):
                await self.client.delete_queue(QueueUrl=url)
        except QueueError as exc:
            if exc.code not in MISSING_QUEUE:
                raise
            return False
        finally:
            if not _is_url(queue_name):
                self._urls.pop(queue_name, None)
            self._forget_queue(url)
        return True

    async def purge_queue(self, queue_name: str) -> int:
        url = await self._lookup(queue_name)
        if url is None:
            return 0
        depth = await self._depth(url)
        if depth == 0:
            return 0
        with boundary("PurgeQueue"):
            await self.client.purge_queue(QueueUrl=url)
        self._forget_queue(url)
        return depth


class _BatchSender:
    """Sends the chunks of one publish_batch and writes each entry's outcome into ``errors``.
    After an UplinkUnavailable nothing more is sent: later chunks get that error."""

    def __init__(self, queue: SqsQueue, queue_name: str, url: str,
                 errors: list[QueueError | None]) -> None:
        self.queue = queue
        self.queue_name = queue_name
        self.url = url
        self.errors = errors
        self.unavailable: UplinkUnavailable | None = None

    async def send(self, chunk: list[_Entry]) -> None:
        if self.unavailable is not None:
            self._fail(chunk, self.unavailable)
            return
        try:
            reply = await self._call(chunk, per_message=len(chunk) == 1)
        except UplinkUnavailable as exc:
            self.queue._missing(self.queue_name, exc)
            self.unavailable = exc
            self._fail(chunk, exc)
            return
        except QueueError as exc:
            if len(chunk) > 1 and not isinstance(exc, RetryableError | NotSupportedError):
                # Refused as a whole for what it carries: find the culprit entry by entry.
                for entry in chunk:
                    await self.send([entry])
                return
            self._fail(chunk, exc)
            return
        self._settle(chunk, reply)

    async def _call(self, chunk: list[_Entry], *, per_message: bool) -> dict[str, Any]:
        with boundary("SendMessageBatch", per_message=per_message):
            reply: dict[str, Any] = await self.queue.client.send_message_batch(
                QueueUrl=self.url, Entries=[entry.fields for entry in chunk])
        return reply

    def _settle(self, chunk: list[_Entry], reply: dict[str, Any]) -> None:
        accepted = {str(item.get("Id")) for item in reply.get("Successful") or []}
        failed = {str(item.get("Id")): item for item in reply.get("Failed") or []}
        for entry in chunk:
            key = str(entry.index)
            if key in accepted:
                continue
            item = failed.get(key)
            if item is None:
                self.errors[entry.index] = RetryableError(
                    "SendMessageBatch answered nothing for this entry", backend=BACKEND)
            else:
                self.errors[entry.index] = entry_error(str(item.get("Code", "")),
                                                       str(item.get("Message", "")),
                                                       bool(item.get("SenderFault")))

    def _fail(self, chunk: list[_Entry], error: QueueError) -> None:
        for entry in chunk:
            self.errors[entry.index] = error


def _new_session(settings: SqsSettings) -> aioboto3.Session:
    """A session with the SDK's SQS model files loaded (they are read from disk once and
    cached); called in a thread so the event loop never waits for that disk read."""
    session = aioboto3.Session(profile_name=settings.sqs_profile or None,
                               region_name=settings.sqs_region)
    loader = session._session.get_component("data_loader")
    loader.load_service_model("sqs", "service-2")
    loader.load_service_model("sqs", "endpoint-rule-set-1")
    loader.load_data("partitions")
    loader.load_data("endpoints")
    loader.load_data("sdk-default-configuration")
    return session


def _is_url(queue_name: str) -> bool:
    return queue_name.startswith(("https://", "http://"))


def _is_fifo(url: str) -> bool:
    return url.rstrip("/").endswith(".fifo")


def _attribute_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)
