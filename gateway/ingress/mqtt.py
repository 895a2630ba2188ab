"""The MQTT ingress: a small subscriber-only MQTT client on asyncio that acknowledges a
message only after the store committed it.

Invariants:

- **Ack after commit.** A QoS 1 PUBLISH is PUBACKed, a QoS 2 PUBLISH PUBRECed, only after
  the sink (``Store.append``) resolved for it, i.e. after its transaction is durable. A
  crash before that makes the broker redeliver from the persistent session: at-least-once.
- **Batching.** Every wakeup (``data_received``) decodes all complete packets in the buffer
  and hands all of its PUBLISHes to the sink in one call; when that call resolves, all of
  their acks go out in one ``transport.write``.
- **Pipelining and ack order.** Reading continues while commits are in flight; several
  sink calls may be outstanding. Acks are written strictly in the order the PUBLISHes
  arrived (MQTT requires it): a batch is acknowledged only when every batch before it was.
- **Store failure.** If the sink raises, nothing of that batch (nor of any later batch) is
  acknowledged: the connection is dropped and re-established after a backoff, and the
  broker redelivers the unacknowledged messages from the persistent session.
- **Refusals.** A DROPPED outcome (store full under ``when_full: reject_new``) is acked
  with reason 0x97 Quota exceeded on MQTT 5 (a plain ack on 3.1.1, which has no reason
  codes) and counted in ``dropped``: the message is refused, not retried forever.
  A payload over ``ingress.max_message_bytes`` is dead-lettered with its reason and acked
  like any durable message.
- **Memory bound.** When more than ``4 x receive_maximum`` messages or ``MAX_PENDING_BYTES``
  of payload await commit, reading is paused (TCP backpressure reaches the broker) and
  resumed once commits bring it under the bound.
- **Excluded topics.** A PUBLISH whose topic matches ``ingress.exclude`` (the downlink's
  command topics, typically) is acknowledged without being stored and counted in
  ``excluded``.
- **Request/response.** MQTT 5 response topic and correlation data become the attributes
  ``response_topic`` and ``correlation_id`` (``correlation_data_base64`` when not UTF-8 text),
  so a device's reply reaches the cloud with the id the request carried.
- **QoS 2.** PUBLISH -> store -> PUBREC; PUBREL -> PUBCOMP. A redelivered QoS 2 packet id
  that is still awaiting its commit or its PUBREL is acknowledged again without storing it
  a second time.
- **Session.** Clean start is never set; the broker keeps the session for
  ``ingress.session_expiry`` (MQTT 5) and queues messages while the gateway is away. We
  subscribe on the first connect of the process and whenever the broker lost the session;
  on MQTT 5 with retain handling 1, so re-subscribing does not re-send retained messages.

Window: with MQTT 5 the broker should send at most ``ingress.receive_maximum``
unacknowledged messages. With MQTT 3.1.1 the broker's own ``max_inflight_messages`` limits
the window (mosquitto's default is 20): acknowledging after a commit then caps throughput at
roughly 20 messages per commit, so set ``max_inflight_messages`` much higher (or 0) on the
broker. (mosquitto 2.0.11 was measured exceeding both limits while replaying a session
backlog right after a reconnect; we tolerate that and the memory bound above still holds.)

Keepalive: a PINGREQ goes out when nothing was sent for the keepalive interval (the
broker's Server Keep Alive wins when it sends one); no PINGRESP within another interval
drops the connection. Timers only, no polling.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import random
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gateway.aio import wait_event
from gateway.config import IngressConfig, TlsConfig
from gateway.errors import ConfigError, GatewayError
from gateway.ingress.codec import (
    MQTT_5,
    MQTT_311,
    PINGREQ_PACKET,
    PUBREL,
    QUOTA_EXCEEDED,
    Ack,
    Connack,
    Decoder,
    Disconnect,
    Pingresp,
    ProtocolError,
    Publish,
    Suback,
    SubscribeRequest,
    Version,
    encode_ack,
    encode_connect,
    encode_disconnect,
    encode_pubcomp,
    encode_subscribe,
)
from gateway.message import (
    ATTR_CONTENT_TYPE,
    ATTR_GATEWAY_ID,
    ATTR_MESSAGE_ID,
    ATTR_MQTT_QOS,
    ATTR_MQTT_RETAIN,
    ATTR_MQTT_TOPIC,
    ATTR_RESPONSE_TOPIC,
    correlation_attributes,
)
from gateway.store.frames import FROM_MQTT, RETAIN
from gateway.store.records import AppendOutcome, AppendStatus, NewMessage
from gateway.topics import topic_matches

log = logging.getLogger("gateway.ingress")

Sink = Callable[[list[NewMessage]], Awaitable[list[AppendOutcome]]]

#: attribute names only the gateway sets; a user property cannot override them
RESERVED_ATTRIBUTES = frozenset(
    {ATTR_MESSAGE_ID, ATTR_GATEWAY_ID, ATTR_MQTT_TOPIC, ATTR_MQTT_QOS, ATTR_MQTT_RETAIN,
     ATTR_CONTENT_TYPE})
MAX_PENDING_BYTES = 64 * 1024**2
HANDSHAKE_TIMEOUT = 10.0

_QOS_TEXT = ("0", "1", "2")
_DROPPED = AppendStatus.DROPPED
_DEAD = AppendStatus.DEAD_LETTERED
_ACK = struct.Struct(">BBH").pack


class ConnectFailed(GatewayError):
    """The broker refused the connection or every subscription."""


@dataclass(slots=True)
class _Batch:
    future: asyncio.Future[list[AppendOutcome]]
    #: per PUBLISH in arrival order: (qos, packet id, index in the sink call or -1 = duplicate)
    acks: list[tuple[int, int, int]]
    nbytes: int


class _Connection(asyncio.Protocol):
    """One network connection: decoding, batching, ordered acks, keepalive, flow control."""

    def __init__(self, ingress: MqttIngress, version: Version) -> None:
        self._in = ingress
        self.version = version
        self._decoder = Decoder(version)
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self.connack: asyncio.Future[Connack] = self._loop.create_future()
        self.suback: asyncio.Future[Suback] = self._loop.create_future()
        self.closed: asyncio.Future[str] = self._loop.create_future()
        self._close_reason = ""
        self._inflight: collections.deque[_Batch] = collections.deque()
        self._pending_msgs = 0
        self._pending_bytes = 0
        self._paused = False
        self._held = False  # reading stopped for good (graceful stop)
        self._qos2_pending: set[int] = set()
        self._drained = asyncio.Event()  # set while no commit is in flight
        self._drained.set()
        self._keepalive = 0.0
        self._last_write = time.monotonic()
        self._ka_timer: asyncio.TimerHandle | None = None
        self._ping_timer: asyncio.TimerHandle | None = None

    # -- transport callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        reason = self._close_reason or (f"connection lost: {exc}" if exc
                                        else "the broker closed the connection")
        self._close_reason = reason
        self._transport = None
        for timer in (self._ka_timer, self._ping_timer):
            if timer is not None:
                timer.cancel()
        error = ConnectionError(reason)
        for fut in (self.connack, self.suback):
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # retrieved here; the handshake re-raises its own copy
        if not self.closed.done():
            self.closed.set_result(reason)
        self._drained.set()

    def data_received(self, data: bytes) -> None:
        if self._transport is None:
            return
        try:
            packets = self._decoder.feed(data)
        except ProtocolError as exc:
            self.abort(f"protocol error: {exc}")
            return
        ingress = self._in
        messages: list[NewMessage] = []
        acks: list[tuple[int, int, int]] = []
        nbytes = 0
        now = time.time()
        excluded = ingress.excluded_topic
        for packet in packets:
            if type(packet) is not Publish:
                self._control(packet)
                continue
            qos, pid = packet.qos, packet.packet_id
            if qos == 2 and (pid in self._qos2_pending or pid in ingress.qos2_awaiting_release):
                ingress.duplicates += 1
                acks.append((2, pid, -1))
                continue
            if excluded is not None and excluded(packet.topic):
                ingress.excluded += 1
                acks.append((qos, pid, -1))  # acknowledged, never stored
                continue
            if qos == 2:
                self._qos2_pending.add(pid)
            acks.append((qos, pid, len(messages)))
            messages.append(ingress.to_message(packet, now))
            nbytes += len(packet.payload)
        ingress.received += len(acks)
        if acks:
            self._submit(messages, acks, nbytes)

    def eof_received(self) -> bool | None:
        return False

    # -- publishes ---------------------------------------------------------------------

    def _submit(self, messages: list[NewMessage], acks: list[tuple[int, int, int]],
                nbytes: int) -> None:
        future: asyncio.Future[list[AppendOutcome]]
        if messages:
            future = asyncio.ensure_future(self._in.sink(messages))
        else:  # only duplicates: nothing to store, but their acks keep their place in line
            future = self._loop.create_future()
            future.set_result([])
        self._inflight.append(_Batch(future, acks, nbytes))
        self._drained.clear()
        self._pending_msgs += len(acks)
        self._pending_bytes += nbytes
        if not self._paused and (self._pending_msgs > self._in.max_pending_messages
                                 or self._pending_bytes > MAX_PENDING_BYTES):
            self._paused = True
            self._transport.pause_reading()  # type: ignore[union-attr]
        future.add_done_callback(self._on_commit)

    def _on_commit(self, future: asyncio.Future[list[AppendOutcome]]) -> None:
        if self._transport is None:
            if not future.cancelled():
                future.exception()  # the connection is gone; the broker will redeliver
            return
        chunks: list[bytes] = []
        while self._inflight and self._inflight[0].future.done():
            batch = self._inflight.popleft()
            self._pending_msgs -= len(batch.acks)
            self._pending_bytes -= batch.nbytes
            try:
                outcomes = batch.future.result()
                if len(outcomes) != sum(1 for _, _, i in batch.acks if i >= 0):
                    raise GatewayError(f"the sink returned {len(outcomes)} outcomes")
            except Exception as exc:  # any sink failure means: acknowledge nothing
                if not isinstance(exc, GatewayError):
                    log.error("the ingress sink raised unexpectedly", exc_info=exc)
                if chunks:
                    self.write(b"".join(chunks))
                self.abort(f"store commit failed, nothing of the batch acknowledged: {exc}")
                return
            self._ack_batch(batch, outcomes, chunks)
        if chunks:
            self.write(b"".join(chunks))
        if self._paused and not self._held and (
                self._pending_msgs <= self._in.max_pending_messages // 2
                and self._pending_bytes <= MAX_PENDING_BYTES // 2):
            self._paused = False
            self._transport.resume_reading()
        if not self._inflight:
            self._drained.set()

    def _ack_batch(self, batch: _Batch, outcomes: list[AppendOutcome], chunks: list[bytes]) -> None:
        ingress = self._in
        v5 = self.version == MQTT_5
        acked = 0
        for qos, pid, index in batch.acks:
            reason = 0
            if index >= 0:
                status = outcomes[index].status
                if status is _DROPPED:
                    ingress.dropped += 1
                    reason = QUOTA_EXCEEDED if v5 else 0
                elif status is _DEAD:
                    ingress.dead_lettered += 1
            if qos == 1:
                chunks.append(_ACK(0x40, 2, pid) if not reason else encode_ack(4, pid, reason))
                acked += 1
            elif qos == 2:
                self._qos2_pending.discard(pid)
                if not reason:  # a failure reason code ends the QoS 2 flow: no PUBREL follows
                    ingress.qos2_awaiting_release.add(pid)
                chunks.append(_ACK(0x50, 2, pid) if not reason else encode_ack(5, pid, reason))
                acked += 1
        ingress.acked += acked

    # -- control packets ---------------------------------------------------------------

    def _control(self, packet: object) -> None:
        if isinstance(packet, Ack):
            if packet.packet_type == PUBREL:
                self._in.qos2_awaiting_release.discard(packet.packet_id)
                self.write(encode_pubcomp(packet.packet_id, version=self.version))
            else:
                self.abort(f"unexpected acknowledgement type {packet.packet_type}")
        elif isinstance(packet, Pingresp):
            if self._ping_timer is not None:
                self._ping_timer.cancel()
                self._ping_timer = None
        elif isinstance(packet, Connack):
            if self.connack.done():
                self.abort("a second CONNACK")
            else:
                self.connack.set_result(packet)
        elif isinstance(packet, Suback):
            if not self.suback.done():
                self.suback.set_result(packet)
        elif isinstance(packet, Disconnect):
            self.abort(packet.describe())

    # -- writing, keepalive, closing ----------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)
            self._last_write = time.monotonic()

    def start_keepalive(self, seconds: float) -> None:
        self._keepalive = seconds
        if seconds > 0 and self._transport is not None:
            self._ka_timer = self._loop.call_later(seconds, self._keepalive_due)

    def _keepalive_due(self) -> None:
        if self._transport is None:
            return
        idle = time.monotonic() - self._last_write
        if idle >= self._keepalive * 0.999:
            if self._ping_timer is None:
                self._ping_timer = self._loop.call_later(self._keepalive, self._ping_timeout)
            self.write(PINGREQ_PACKET)
            idle = 0.0
        self._ka_timer = self._loop.call_later(self._keepalive - idle, self._keepalive_due)

    def _ping_timeout(self) -> None:
        self._ping_timer = None
        self.abort(f"no PINGRESP within the keepalive of {self._keepalive:g}s")

    def abort(self, reason: str) -> None:
        """Drop the connection now; nothing more is written or acknowledged on it."""
        transport = self._transport
        if transport is not None:
            self._close_reason = self._close_reason or reason
            # forget the transport at once: a commit resolving before connection_lost runs
            # must not send its acks
            self._transport = None
            transport.abort()

    async def drain_and_disconnect(self, timeout: float) -> None:
        """Stop reading, wait for in-flight commits and send their acks, then DISCONNECT."""
        if self._transport is None:
            return
        self._held = True
        if not self._paused:
            self._paused = True
            self._transport.pause_reading()
        if not await wait_event(self._drained, timeout):
            log.warning("stopping with %d messages still awaiting commit; the broker will "
                        "redeliver them", self._pending_msgs)
        if self._transport is not None:
            self._close_reason = "the gateway is stopping"
            # reason 0 and no session expiry property: the session is kept
            self.write(encode_disconnect(0, version=self.version))
            self._transport.close()

    @property
    def is_open(self) -> bool:
        return self._transport is not None


class MqttIngress:
    """Subscribe to the local broker and feed every message to ``sink`` (the store)."""

    def __init__(self, cfg: IngressConfig, client_id: str, sink: Sink) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.sink = sink
        self.version: Version = MQTT_5 if cfg.protocol == "5" else MQTT_311
        self.max_pending_messages = 4 * cfg.receive_maximum
        self.connected = False
        self.ready = asyncio.Event()
        self.received = 0
        self.acked = 0
        self.dropped = 0
        self.dead_lettered = 0
        self.too_large = 0
        self.duplicates = 0
        self.excluded = 0
        #: None when ingress.exclude is empty (the hot path then checks nothing)
        self.excluded_topic = _ExcludeMatcher(cfg.exclude) if cfg.exclude else None
        #: QoS 2 packet ids PUBRECed and not yet released (session state)
        self.qos2_awaiting_release: set[int] = set()
        self._conn: _Connection | None = None
        self._stopping = False
        self._stop_event = asyncio.Event()
        self._run_task: asyncio.Task[None] | None = None
        self._subscribed_once = False

    # -- the message shape ----------------------------------------------------------------

    def to_message(self, packet: Publish, now: float, message_id: str = "") -> NewMessage:
        """The store's form of a PUBLISH. Without ``message_id`` the store derives the id from
        the received time and the message's seq (docs/architecture.md)."""
        topic = packet.topic
        # the MQTT topic, QoS and retain travel as record flags; attributes hold the rest
        flags = FROM_MQTT | packet.qos | (RETAIN if packet.retain else 0)
        attrs: dict[str, str] = {}
        props = packet.properties
        if props is not None:
            if props.content_type is not None:
                attrs[ATTR_CONTENT_TYPE] = props.content_type
            for key, value in props.user_properties:
                if key not in RESERVED_ATTRIBUTES:
                    attrs[key] = value
            if props.response_topic is not None:
                attrs[ATTR_RESPONSE_TOPIC] = props.response_topic
            if props.correlation_data is not None:
                attrs.update(correlation_attributes(props.correlation_data))
        message = NewMessage(message_id, topic, packet.payload, attrs, now, mqtt_flags=flags)
        size = len(packet.payload)
        if size > self.cfg.max_message_bytes:
            self.too_large += 1
            message.dead_letter_reason = (f"payload of {size} bytes exceeds "
                                          f"ingress.max_message_bytes ({self.cfg.max_message_bytes})")
        return message

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, subscribe and receive until cancelled or stopped; reconnect forever."""
        self._run_task = asyncio.current_task()
        ssl_context = _ssl_context(self.cfg.tls) if self.cfg.tls is not None else None
        failures = 0
        try:
            while not self._stopping:
                conn = await self._connect_logged(ssl_context, failures)
                if conn is not None:
                    failures = 0
                    reason = await conn.closed
                    self.connected = False
                    self._conn = None
                    if self._stopping:
                        log.info("disconnected from the broker: %s", reason)
                        break
                    log.warning("disconnected from the broker: %s", reason)
                else:
                    failures += 1
                if self._stopping:
                    break
                await wait_event(self._stop_event, reconnect_delay(self.cfg, failures))
        finally:
            self.connected = False
            if self._conn is not None:
                self._conn.abort("the ingress was cancelled")
                self._conn = None

    async def stop(self, timeout: float = 10.0) -> None:
        """Graceful: stop reading, ack what is committed, DISCONNECT, close."""
        deadline = time.monotonic() + timeout
        self._stopping = True
        self._stop_event.set()
        conn = self._conn
        if conn is not None and conn.is_open:
            await conn.drain_and_disconnect(timeout)
        task = self._run_task
        if task is not None and task is not asyncio.current_task() and not task.done():
            await asyncio.wait({task}, timeout=max(0.0, deadline - time.monotonic()))
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # -- connecting --------------------------------------------------------------------

    async def _connect_logged(self, ssl_context: ssl.SSLContext | None,
                              failures: int) -> _Connection | None:
        where = f"{self.cfg.host}:{self.cfg.port}"
        try:
            conn = await self._connect(ssl_context)
        except (OSError, TimeoutError, ConnectionError, GatewayError) as exc:
            text = str(exc) or type(exc).__name__
            if failures == 0:
                log.warning("cannot connect to the broker at %s: %s (retrying with backoff)",
                            where, text)
            else:
                log.debug("connect attempt %d to %s failed: %s", failures + 1, where, text)
            return None
        if self._stopping:
            await conn.drain_and_disconnect(0)
            return None
        self.connected = True
        self.ready.set()
        log.info("connected to the broker at %s as %s (MQTT %s)%s", where, self.client_id,
                 self.cfg.protocol, f" after {failures} failed attempts" if failures else "")
        return conn

    async def _connect(self, ssl_context: ssl.SSLContext | None) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = _Connection(self, self.version)
        await asyncio.wait_for(loop.create_connection(
            lambda: conn, self.cfg.host, self.cfg.port, ssl=ssl_context,
            server_hostname=self.cfg.host if ssl_context is not None else None),
            HANDSHAKE_TIMEOUT)
        self._conn = conn
        try:
            await self._handshake(conn)
        except BaseException:
            conn.abort("handshake failed")
            self._conn = None
            raise
        return conn

    async def _handshake(self, conn: _Connection) -> None:
        cfg = self.cfg
        conn.write(encode_connect(
            self.client_id, version=self.version, keepalive=math.ceil(cfg.keepalive),
            clean_start=False, username=cfg.username, password=cfg.password,
            session_expiry=int(min(cfg.session_expiry, 0xFFFFFFFF)),
            receive_maximum=cfg.receive_maximum))
        connack = await asyncio.wait_for(asyncio.shield(conn.connack), HANDSHAKE_TIMEOUT)
        if connack.reason_code:
            raise ConnectFailed(f"the broker refused the connection with code "
                                f"0x{connack.reason_code:02x}")
        keepalive = cfg.keepalive
        if connack.properties is not None and connack.properties.server_keep_alive is not None:
            keepalive = float(connack.properties.server_keep_alive)
        conn.start_keepalive(keepalive)
        if not connack.session_present:
            self.qos2_awaiting_release.clear()
        if connack.session_present and self._subscribed_once:
            return
        await self._subscribe(conn)
        self._subscribed_once = True

    async def _subscribe(self, conn: _Connection) -> None:
        subs = self.cfg.subscriptions
        requests = [SubscribeRequest(s.topic, s.qos, retain_handling=1) for s in subs]
        conn.write(encode_subscribe(1, requests, version=self.version))
        suback = await asyncio.wait_for(asyncio.shield(conn.suback), HANDSHAKE_TIMEOUT)
        if len(suback.reason_codes) != len(subs):
            raise ProtocolError(f"SUBACK has {len(suback.reason_codes)} codes for "
                                f"{len(subs)} subscriptions")
        failed = 0
        for sub, code in zip(subs, suback.reason_codes, strict=True):
            if code >= 0x80:
                failed += 1
                log.error("the broker refused the subscription to %r (code 0x%02x)",
                          sub.topic, code)
            elif code < sub.qos:
                log.info("subscription to %r granted with QoS %d instead of %d",
                         sub.topic, code, sub.qos)
        if failed == len(subs):
            raise ConnectFailed("the broker refused every subscription")


class _ExcludeMatcher:
    """Whether a topic matches ``ingress.exclude``; answers cached per topic (bounded)."""

    MAX_CACHED = 4096

    def __init__(self, filters: list[str]) -> None:
        self.filters = list(filters)
        self._known: dict[str, bool] = {}

    def __call__(self, topic: str) -> bool:
        known = self._known.get(topic)
        if known is None:
            if len(self._known) >= self.MAX_CACHED:
                self._known.clear()
            known = self._known[topic] = any(topic_matches(f, topic) for f in self.filters)
        return known


def reconnect_delay(cfg: IngressConfig, failures: int) -> float:
    """Before the next attempt to reach the local broker: full jitter between the min and an
    exponentially growing cap (the ingress and the downlink's publisher)."""
    low, high = cfg.reconnect_min_delay, cfg.reconnect_max_delay
    return random.uniform(low, max(low, min(high, low * 2 ** min(failures, 30))))


def _ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=tls.ca_file)
        if tls.cert_file:
            ctx.load_cert_chain(tls.cert_file, tls.key_file, password=tls.key_password)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("ingress.tls", tls.ca_file or tls.cert_file,
                          f"cannot load the TLS files: {exc}") from None
    if tls.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
