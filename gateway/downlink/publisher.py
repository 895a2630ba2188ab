"""The downlink's publishing client for the local broker: QoS 1, one PUBACK per command.

A small MQTT client on the ingress's codec (no client library), connecting with the ingress
settings (host, port, TLS, credentials, protocol) under its own client id
(``<ingress client id>-downlink``) and a clean session: what matters is the PUBACK of each
command, and the backend keeps every command until the downlink acknowledges it there.

Promises:

- ``publish`` resolves with the PUBACK's reason code (0 or 0x10 = the broker took it; 0x80 and
  above = it refused it) and never earlier. A connection lost before the PUBACK, or no PUBACK
  within ``PUBACK_TIMEOUT`` (the connection is then dropped), raises LocalBrokerUnavailable:
  the broker may or may not have the message, so the caller publishes it again after the
  reconnect (a possible duplicate, never a loss).
- ``connected`` is set while a connection is up; ``run`` reconnects forever with full-jitter
  backoff (``ingress.reconnect_min_delay``..``reconnect_max_delay``).
- One log line per change: a WARNING when the broker cannot be reached (once per outage),
  one when it is back ("after 30.2s").
- Keepalive: a PINGREQ when nothing was written for the keepalive interval; no PINGRESP within
  another interval drops the connection. Timers only, no polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
import time
from collections.abc import Callable

from gateway.aio import wait_event
from gateway.config import IngressConfig
from gateway.errors import GatewayError
from gateway.ingress.codec import (
    MQTT_5,
    MQTT_311,
    PINGREQ_PACKET,
    PUBACK,
    Ack,
    Connack,
    Decoder,
    Disconnect,
    Pingresp,
    Properties,
    ProtocolError,
    Version,
    encode_connect,
    encode_disconnect,
    encode_publish,
)
from gateway.ingress.mqtt import _ssl_context, reconnect_delay  # the ingress's rules, shared on purpose

log = logging.getLogger("gateway.downlink")

#: a PUBACK that takes longer than this means the connection is not working
PUBACK_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0
MAX_PACKET = 268_435_455


class LocalBrokerUnavailable(GatewayError):
    """The local broker cannot take a command now (not connected, connection lost).
    ``sent``: the PUBLISH had been written (the broker may have it: a republish may be a
    duplicate); False when it never left."""

    def __init__(self, reason: str, *, sent: bool = False) -> None:
        super().__init__(reason)
        self.sent = sent


class CommandTooLarge(GatewayError):
    """The command's PUBLISH exceeds what the local broker accepts (its maximum packet size)."""


class _Connection:
    """One network connection: CONNECT, PUBLISH/PUBACK by packet id, keepalive."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 version: Version, on_close: Callable[[], None]) -> None:
        self.on_close = on_close
        self.reader = reader
        self.writer = writer
        self.version = version
        self.decoder = Decoder(version)
        self.connack: asyncio.Future[Connack] = asyncio.get_running_loop().create_future()
        self.closed = asyncio.Event()
        self.reason = ""
        self.max_packet = MAX_PACKET
        self.window = asyncio.Semaphore(65535)
        self._pending: dict[int, asyncio.Future[int]] = {}
        self._next_id = 0
        self._last_write = time.monotonic()
        self._ping_sent: float | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def start_reading(self) -> None:
        self._tasks.append(asyncio.create_task(self._read(), name="downlink-read"))

    def start_keepalive(self, seconds: float) -> None:
        if seconds > 0:
            self._tasks.append(asyncio.create_task(self._keepalive(seconds),
                                                   name="downlink-keepalive"))

    def write(self, data: bytes) -> None:
        if self.closed.is_set():
            raise LocalBrokerUnavailable(self.reason)
        self.writer.write(data)
        self._last_write = time.monotonic()

    async def _read(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    self.close("the broker closed the connection")
                    return
                for packet in self.decoder.feed(data):
                    self._dispatch(packet)
        except ProtocolError as exc:
            self.close(f"protocol error: {exc}")
        except (OSError, ConnectionError) as exc:
            self.close(f"connection lost: {exc}")

    def _dispatch(self, packet: object) -> None:
        if isinstance(packet, Ack) and packet.packet_type == PUBACK:
            future = self._pending.pop(packet.packet_id, None)
            if future is not None and not future.done():
                future.set_result(packet.reason_code)
        elif isinstance(packet, Pingresp):
            self._ping_sent = None
        elif isinstance(packet, Connack) and not self.connack.done():
            self.connack.set_result(packet)
        elif isinstance(packet, Disconnect):
            self.close(packet.describe())
        else:  # we never subscribe: nothing else may come
            self.close(f"unexpected packet from the broker: {type(packet).__name__}")

    async def _keepalive(self, seconds: float) -> None:
        while not self.closed.is_set():
            idle = time.monotonic() - self._last_write
            if self._ping_sent is not None and time.monotonic() - self._ping_sent >= seconds:
                self.close(f"no PINGRESP within the keepalive of {seconds:g}s")
                return
            if idle >= seconds * 0.999:
                self._ping_sent = self._ping_sent or time.monotonic()
                self.write(PINGREQ_PACKET)
                idle = 0.0
            await asyncio.sleep(seconds - idle)

    async def publish(self, topic: str, payload: bytes, retain: bool,
                      properties: Properties | None) -> int:
        async with self.window:
            packet_id = self._allocate()
            packet = encode_publish(topic, payload, qos=1, packet_id=packet_id, retain=retain,
                                    version=self.version, properties=properties)
            if len(packet) > self.max_packet:
                raise CommandTooLarge(f"the PUBLISH would be {len(packet)} bytes; the local broker "
                                      f"takes at most {self.max_packet}")
            future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self.write(packet)  # raises (sent=False) when the connection is already closed
            self._pending[packet_id] = future
            try:
                async with asyncio.timeout(PUBACK_TIMEOUT):
                    return await asyncio.shield(future)
            except TimeoutError:
                self.close(f"no PUBACK within {PUBACK_TIMEOUT:g}s")
                raise LocalBrokerUnavailable(self.reason, sent=True) from None
            finally:
                self._pending.pop(packet_id, None)

    def _allocate(self) -> int:
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._pending:
                return self._next_id
        raise LocalBrokerUnavailable("no free packet id")  # the window makes this unreachable

    def close(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.reason = reason
        self.closed.set()
        self.on_close()
        error = LocalBrokerUnavailable(reason, sent=True)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: the publisher raises its own
        self._pending.clear()
        if not self.connack.done():
            self.connack.set_exception(error)
            self.connack.exception()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self.writer.transport.abort()

    async def disconnect(self) -> None:
        """A clean DISCONNECT (the broker then drops no will and logs no error)."""
        if not self.closed.is_set():
            with contextlib.suppress(LocalBrokerUnavailable, OSError, ConnectionError):
                self.write(encode_disconnect(0, version=self.version))
                async with asyncio.timeout(1.0):
                    await self.writer.drain()
        self.close("the gateway is stopping")


class LocalPublisher:
    """Publishes downlink commands to the local broker (the ingress's), reconnecting forever."""

    def __init__(self, cfg: IngressConfig, client_id: str) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.version: Version = MQTT_5 if cfg.protocol == "5" else MQTT_311
        self.connected = asyncio.Event()
        self.last_error = ""
        self._conn: _Connection | None = None
        self._stop = asyncio.Event()
        self._ever_connected = False
        self._down_since: float | None = None

    @property
    def where(self) -> str:
        return f"{self.cfg.host}:{self.cfg.port}"

    async def run(self) -> None:
        ssl_context = _ssl_context(self.cfg.tls) if self.cfg.tls is not None else None
        failures = 0
        try:
            while not self._stop.is_set():
                try:
                    conn = await self._connect(ssl_context)
                except (OSError, TimeoutError, ConnectionError, GatewayError) as exc:
                    failures += 1
                    self._note_down(str(exc) or type(exc).__name__)
                    await wait_event(self._stop, reconnect_delay(self.cfg, failures))
                    continue
                failures = 0
                self._note_up()
                self._conn = conn
                if not conn.closed.is_set():  # it may have closed while we logged
                    self.connected.set()
                await self._until_closed_or_stopped(conn)
                self.connected.clear()
                self._conn = None
                if self._stop.is_set():
                    await conn.disconnect()
                    break
                self._note_down(conn.reason)
                await wait_event(self._stop, reconnect_delay(self.cfg, 1))
        finally:
            self.connected.clear()
            if self._conn is not None:
                self._conn.close("the downlink was cancelled")
                self._conn = None

    def stop(self) -> None:
        self._stop.set()

    async def _until_closed_or_stopped(self, conn: _Connection) -> None:
        closed = asyncio.ensure_future(conn.closed.wait())
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({closed, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            stopped.cancel()

    async def _connect(self, ssl_context: ssl.SSLContext | None) -> _Connection:
        cfg = self.cfg
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            cfg.host, cfg.port, ssl=ssl_context,
            server_hostname=cfg.host if ssl_context is not None else None), HANDSHAKE_TIMEOUT)
        conn = _Connection(reader, writer, self.version, self.connected.clear)
        conn.start_reading()
        try:
            conn.write(encode_connect(self.client_id, version=self.version,
                                      keepalive=math.ceil(cfg.keepalive), clean_start=True,
                                      username=cfg.username, password=cfg.password))
            connack = await asyncio.wait_for(asyncio.shield(conn.connack), HANDSHAKE_TIMEOUT)
        except BaseException:
            conn.close("handshake failed")
            raise
        if connack.reason_code:
            conn.close("refused")
            raise LocalBrokerUnavailable(f"the broker refused the connection with code "
                                         f"0x{connack.reason_code:02x}")
        keepalive = cfg.keepalive
        props = connack.properties
        if props is not None:
            if props.server_keep_alive is not None:
                keepalive = float(props.server_keep_alive)
            if props.maximum_packet_size is not None:
                conn.max_packet = props.maximum_packet_size
            if props.receive_maximum is not None:
                conn.window = asyncio.Semaphore(props.receive_maximum)
        conn.start_keepalive(keepalive)
        return conn

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                      properties: Properties | None = None) -> int:
        """QoS 1; the PUBACK's reason code. LocalBrokerUnavailable when not connected or the
        connection was lost before the PUBACK; CommandTooLarge over the broker's limit."""
        conn = self._conn
        if conn is None or conn.closed.is_set():
            raise LocalBrokerUnavailable(self.last_error or "not connected to the local broker")
        return await conn.publish(topic, payload, retain,
                                  properties if self.version == MQTT_5 else None)

    def _note_up(self) -> None:
        if self._down_since is not None:
            log.warning("downlink: local broker at %s back after %.1fs", self.where,
                        time.monotonic() - self._down_since)
        elif not self._ever_connected:
            log.info("downlink: connected to the local broker at %s as %s", self.where,
                     self.client_id)
        self._ever_connected = True
        self._down_since = None
        self.last_error = ""

    def _note_down(self, reason: str) -> None:
        self.last_error = reason
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("downlink: cannot reach the local broker at %s: %s; commands wait at "
                        "the backend", self.where, reason)
        else:
            log.debug("downlink: local broker still unreachable: %s", reason)
