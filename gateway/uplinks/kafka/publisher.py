"""publish_batch for Kafka on librdkafka (confluent-kafka): per-message outcomes, kept order.

How a batch travels:

- One long-lived ``confluent_kafka.Producer`` per connection. Each message gets its key
  from the key template and the gateway message id, MQTT topic and attributes as headers
  and is handed to ``produce()``; librdkafka
  batches per partition (``batch.size``, ``linger.ms``), compresses, retries and keeps
  order per partition (idempotent producer, acks=all by default). The partitioner is
  ``murmur2_random``: keyed records land where the Java client puts them.
- Every record has a delivery report. The reports arrive on a dedicated thread that blocks
  in ``poll()`` (no busy polling); each one fills its slot of the batch, and the batch's
  asyncio future is resolved once, with one ``call_soon_threadsafe``, when the last report
  came in. The event loop never waits on librdkafka.
- A message larger than ``kafka_max_request_size`` is refused by ``produce()`` itself
  (MessageRejected). When the broker refuses a record batch for a record-level reason
  (too large for the topic's ``max.message.bytes``, invalid), every record of that batch
  gets the error; those records are then sent again one at a time, in order, so only the
  guilty one is rejected (MessageRejected with the broker's reason) and the rest flow.
- Unreachable broker: librdkafka reports "all brokers are down" (``_ALL_BROKERS_DOWN``,
  once per reconnect round, about every second while they stay down) to the error
  callback. A batch waiting for its reports then ends at once: what was not reported
  delivered is UplinkUnavailable, and the forwarder keeps those messages and sends them
  again later, instead of waiting out ``message.timeout.ms`` (``kafka_delivery_timeout``,
  which still bounds a broker that stops answering without refusing connections).
  librdkafka may still deliver records of an ended batch when a broker returns: the
  consumer may see a record twice after an outage; the message id header tells.
  ``until_reachable`` ends a connect's round trip the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from gateway.errors import MessageRejected, QueueError, UplinkUnavailable
from gateway.message import ATTR_MESSAGE_ID, QueueMessage
from gateway.queue.interface import PublishResult
from gateway.queue.keys import KeyTemplate
from gateway.uplinks.kafka.errors import BACKEND, RECORD_REJECTED_CODES, translate_rd

log = logging.getLogger("gateway.uplinks.kafka")

Headers = list[tuple[str, bytes]]

#: how long a publish_batch waits past kafka_delivery_timeout for the last reports
REPORT_GRACE = 5.0


#: (name, value) attribute pairs whose encoded header is kept: MQTT topics, QoS, content
#: types repeat from message to message, so each is encoded once, not once per message
_HEADER_CACHE: dict[tuple[str, str], tuple[str, bytes]] = {}
_HEADER_CACHE_MAX = 8192
_CACHED_VALUE_MAX = 256


def record_headers(msg: QueueMessage) -> Headers:
    """The gateway message id first, then every attribute (the MQTT topic among them)."""
    headers: Headers = [(ATTR_MESSAGE_ID, msg.id.encode())]
    cache = _HEADER_CACHE
    for item in msg.attributes.items():
        if item[0] == ATTR_MESSAGE_ID:
            continue
        header = cache.get(item)
        if header is None:
            header = (item[0], item[1].encode())
            if len(item[1]) <= _CACHED_VALUE_MAX:
                if len(cache) >= _HEADER_CACHE_MAX:
                    cache.clear()
                cache[item] = header
        headers.append(header)
    return headers


class _Batch:
    """Delivery reports of one publish_batch call. Reports arrive on the poll thread (and on
    the event loop's thread during ``flush(0)``); the future is resolved once, when the
    last one is in. ``pending`` starts at the batch size, so it cannot reach 0 while
    records are still being handed to produce()."""

    __slots__ = ("_done", "aborted", "errors", "future", "last", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int) -> None:
        self.loop = loop
        #: per message: None = not (yet) reported, True = delivered, else the error
        self.errors: list[Any] = [None] * size
        #: counts reports; next() on it is atomic, so the one that returns ``last`` is last
        self._done = itertools.count()
        self.last = size - 1
        self.future: asyncio.Future[None] = loop.create_future()
        #: every broker went down before all reports came in: the error for the rest
        self.aborted: QueueError | None = None

    def report(self, index: int, err: KafkaError | None, _msg: Any) -> None:
        self.errors[index] = True if err is None else err
        if next(self._done) == self.last:
            self.loop.call_soon_threadsafe(self._resolve)

    def failed_locally(self, index: int, error: QueueError) -> None:
        """produce() refused the record itself (event loop thread): no report will come."""
        self.errors[index] = error
        if next(self._done) == self.last:
            self._resolve()

    def abort(self, error: QueueError) -> None:
        """Stop waiting (event loop thread): unreported records get ``error``."""
        self.aborted = error
        self._resolve()

    def _resolve(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


class Publisher:
    def __init__(self, config: dict[str, Any], key: KeyTemplate, *, max_request_size: int,
                 delivery_timeout: float, metadata_timeout: float,
                 create_topic: Callable[[str], Awaitable[object]] | None = None) -> None:
        self.config = config
        self.key = key
        self.max_request_size = max_request_size
        self.delivery_timeout = delivery_timeout
        self.metadata_timeout = metadata_timeout
        self.create_topic = create_topic
        #: topics this producer has published to (created when create_topic is set)
        self.topics: set[str] = set()
        #: topics whose metadata this producer has seen
        self._known: set[str] = set()
        #: the producer hit a fatal error (idempotence state lost) and must be replaced
        self.broken = False
        self._fatal: str = ""
        self.loop = asyncio.get_running_loop()
        #: batches waiting for delivery reports, and connects waiting for a round trip:
        #: both end when every broker is down
        self._waiting: set[_Batch] = set()
        self._reachability: set[asyncio.Future[str]] = set()
        #: librdkafka's last connection error ("Connect to ipv4#... failed: ...")
        self._last_transport = ""
        self.producer = Producer({**config, "error_cb": self._on_error})
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="kafka-delivery-reports",
                                        daemon=True)
        self._poller.start()

    # -- the delivery report thread --------------------------------------------------------

    def _poll(self) -> None:
        producer, stop = self.producer, self._stop
        while not stop.is_set():
            producer.poll(0.2)  # blocks until a report (or error) arrives, or 200 ms

    def _on_error(self, err: KafkaError) -> None:
        """librdkafka's error callback (the poll thread, or the loop's during flush(0))."""
        if err.fatal():
            self.broken = True
            self._fatal = err.str()
            log.error("kafka: fatal producer error: %s", err.str())
            return
        log.debug("kafka: producer: %s", err.str())
        if err.code() == KafkaError._TRANSPORT:
            self._last_transport = err.str()
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            reason = err.str() + (f" ({self._last_transport})" if self._last_transport else "")
            self.loop.call_soon_threadsafe(self._all_brokers_down, reason)

    def _all_brokers_down(self, reason: str) -> None:
        error = UplinkUnavailable(f"no broker reachable: {reason}", backend=BACKEND,
                                  code="_ALL_BROKERS_DOWN")
        if self._waiting:
            # The records of an ended batch are sent again by the forwarder: those still
            # queued here (none was sent with every broker down) would only be duplicates.
            self.producer.purge(in_queue=True, in_flight=False, blocking=False)
        for batch in list(self._waiting):
            batch.abort(error)
        for waiter in list(self._reachability):
            if not waiter.done():
                waiter.set_result(reason)

    async def until_reachable(self, round_trip: Awaitable[None]) -> None:
        """Await ``round_trip`` (a request to the cluster); when librdkafka says every broker
        is down first, raise UplinkUnavailable with its reason instead of waiting out the
        request's timeout."""
        down: asyncio.Future[str] = self.loop.create_future()
        self._reachability.add(down)
        task = asyncio.ensure_future(round_trip)
        either: list[asyncio.Future[Any]] = [task, down]
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        finally:
            self._reachability.discard(down)
        if task.done():
            task.result()
            return
        task.cancel()
        raise UplinkUnavailable(f"no broker reachable: {down.result()}", backend=BACKEND,
                                code="_ALL_BROKERS_DOWN")

    async def close(self, timeout: float) -> None:
        """Send what the producer holds (up to ``timeout``), drop the rest, stop the thread.
        Dropped records are still in the gateway's store and are sent again later."""
        producer = self.producer
        try:
            left = await asyncio.to_thread(producer.flush, max(timeout, 0.0))
            if left:
                log.info("kafka: closing the producer with %d unacknowledged messages; "
                            "they stay buffered and are sent again", left)
        finally:  # also when cancelled: nothing may keep the producer or its thread alive
            producer.purge()
            self._stop.set()
        await asyncio.to_thread(producer.flush, 1.0)
        await asyncio.to_thread(self._poller.join, 2.0)

    # -- topics ---------------------------------------------------------------------------

    async def ensure_topic(self, topic: str) -> None:
        """Create ``topic`` once per connection when allowed; a refusal is not fatal here
        (no CREATE permission is common): the metadata check that follows decides."""
        if topic in self.topics:
            return
        if self.create_topic is not None:
            try:
                await self.create_topic(topic)
            except UplinkUnavailable:
                raise
            except QueueError as exc:
                log.info("kafka: could not create topic %r (%s); assuming it exists", topic, exc)
        self.topics.add(topic)

    def forget_topic(self, topic: str) -> None:
        self.topics.discard(topic)
        self._known.discard(topic)

    async def _check_topic(self, topic: str) -> None:
        """The topic must exist before records go out (asks for all topics, so an
        auto-creating broker does not create it as a side effect)."""
        await self.ensure_topic(topic)
        if topic in self._known:
            return
        deadline = time.monotonic() + self.metadata_timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                # short slices: a thread blocked here would hold up the daemon's exit
                meta = await asyncio.to_thread(self.producer.list_topics,
                                               None, max(min(remaining, 1.0), 0.1))
            except KafkaException as exc:
                if time.monotonic() >= deadline:
                    raise translate_rd(exc.args[0], f"metadata for {topic!r}") from None
                meta = None
            if meta is not None:
                entry = meta.topics.get(topic)
                if entry is not None and entry.error is None and entry.partitions:
                    self._known.add(topic)
                    return
            if time.monotonic() + 0.2 >= deadline:
                raise UplinkUnavailable(f"no metadata for topic {topic!r} within "
                                        f"{self.metadata_timeout:g}s (does it exist?)",
                                        backend=BACKEND, code="UNKNOWN_TOPIC_OR_PARTITION")
            await asyncio.sleep(0.2)

    # -- publishing -----------------------------------------------------------------------

    async def publish_batch(self, topic: str, messages: Sequence[QueueMessage]) -> list[PublishResult]:
        try:
            await self.until_reachable(self._check_topic(topic))
        except QueueError as exc:
            return [PublishResult(m.id, exc) for m in messages]
        records = self._records(messages)
        errors = await self._send(topic, messages, records, range(len(messages)))
        again = [i for i, e in enumerate(errors)
                 if isinstance(e, KafkaError) and e.code() in RECORD_REJECTED_CODES]
        if len(again) > 1:
            # the broker refused whole record batches: find the guilty records, in order
            log.info("broker refused %d records of %s; re-sending them one by one",
                     len(again), topic)
            for i in again:
                (errors[i],) = await self._send(topic, messages, records, [i])
                if not _is_ok(errors[i]) and not _is_record_error(errors[i]):
                    for j in again[again.index(i) + 1:]:
                        errors[j] = errors[i]  # keep order: nothing behind it goes now
                    break
        return [PublishResult(m.id) if e is True else self._result(m, e, topic)
                for m, e in zip(messages, errors, strict=True)]

    def _records(self, messages: Sequence[QueueMessage]) -> list[tuple[bytes | None, Headers]]:
        """(key, headers) per message; messages of one shape (same attributes but the id)
        share their key and the headers after the id, built once per batch."""
        render = self.key.render
        by_shape: dict[int, tuple[bytes | None, Headers]] = {}
        cache_keys = not self.key.uses_id
        records: list[tuple[bytes | None, Headers]] = []
        append = records.append
        for m in messages:
            shape = m.shape
            if shape is None:
                append((render(m), record_headers(m)))
                continue
            known = by_shape.get(id(shape))
            if known is None:
                headers = record_headers(m)
                known = by_shape[id(shape)] = (render(m) if cache_keys else None, headers[1:])
            key, tail = known
            append((key if cache_keys else render(m),
                    [(ATTR_MESSAGE_ID, m.id.encode()), *tail]))
        return records

    async def send_one(self, topic: str, key: bytes | None, body: bytes,
                       headers: Headers) -> None:
        """Publish one record and wait for the broker; raises the gateway error."""
        await self._check_topic(topic)
        msg = QueueMessage("", body)
        (error,) = await self._send(topic, [msg], [(key, headers)], [0])
        result = self._result(msg, error, topic)
        if result.error is not None:
            raise result.error

    async def _send(self, topic: str, messages: Sequence[QueueMessage],
                    records: list[tuple[bytes | None, Headers]], indexes: Sequence[int],
                    ) -> list[Any]:
        """produce() the records at ``indexes`` and wait for their reports. Returns, per
        index, True (delivered), a KafkaError, or a QueueError raised locally."""
        batch = _Batch(self.loop, len(indexes))
        self._waiting.add(batch)
        try:
            return await self._produce_and_wait(batch, topic, messages, records, indexes)
        finally:
            self._waiting.discard(batch)

    async def _produce_and_wait(self, batch: _Batch, topic: str,
                                messages: Sequence[QueueMessage],
                                records: list[tuple[bytes | None, Headers]],
                                indexes: Sequence[int]) -> list[Any]:
        produce: Any = self.producer.produce
        report = batch.report
        deadline = time.monotonic() + self.delivery_timeout + REPORT_GRACE
        for slot, i in enumerate(indexes):
            key, headers = records[i]
            msg = messages[i]
            while True:
                try:
                    produce(topic, msg.body, key, headers=headers,
                            on_delivery=partial(report, slot))
                    break
                except BufferError:  # librdkafka's queue is full: let it drain
                    if time.monotonic() > deadline:
                        batch.failed_locally(slot, UplinkUnavailable(
                            "the producer's queue stayed full", backend=BACKEND))
                        break
                    self.producer.flush(0)
                    await asyncio.sleep(0.005)
                except KafkaException as exc:
                    batch.failed_locally(slot, self._refused_locally(exc.args[0], msg))
                    break
        # The batch is complete and publish_batch waits for all of it: lingering for more
        # records only adds latency. flush(0) makes librdkafka send what it holds now,
        # ignoring linger.ms, and returns at once (7.9 -> 2.7 ms per 1000 records here).
        self.producer.flush(0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(batch.future),
                                   max(deadline - time.monotonic(), 0.001))
        missing = batch.aborted or UplinkUnavailable(
            f"no delivery report from the producer within {self.delivery_timeout:g}s",
            backend=BACKEND)
        return [missing if e is None else e for e in batch.errors]

    def _refused_locally(self, err: KafkaError, msg: QueueMessage) -> QueueError:
        if err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
            return MessageRejected(f"message is {len(msg.body)} bytes (with key and headers "
                                   f"more than kafka_max_request_size, "
                                   f"{self.max_request_size})", backend=BACKEND,
                                   code="MESSAGE_TOO_LARGE")
        return translate_rd(err, "produce")

    def _result(self, msg: QueueMessage, error: Any, topic: str) -> PublishResult:
        if error is True:
            return PublishResult(msg.id)
        if isinstance(error, QueueError):
            return PublishResult(msg.id, error)
        if isinstance(error, KafkaError) and error.fatal():
            self.broken = True
        return PublishResult(msg.id, translate_rd(error, f"produce to {topic}"))


def _is_ok(error: Any) -> bool:
    return error is True


def _is_record_error(error: Any) -> bool:
    return isinstance(error, MessageRejected) or (
        isinstance(error, KafkaError) and error.code() in RECORD_REJECTED_CODES)
