"""One paho-mqtt 2.x connection, driven by the asyncio event loop.

No network thread: paho's socket callbacks put its socket into the event loop (add_reader
-> loop_read, add_writer -> loop_write while paho has something to send, a task for
loop_misc keepalives), so every paho call and callback runs on the loop thread. (With
paho's own thread, ``loop_start``, publishing from the loop while the thread read the TLS
socket dropped connections under load.) Only ``connect`` — DNS, TCP and the TLS
handshake, which block — runs in a worker thread.

paho never reconnects by itself (``reconnect_on_failure=False``): a lost connection fails
everything waiting on it with UplinkUnavailable, and the owner opens a new Link.

Why paho and not aiomqtt: aiomqtt 2.x discards the PUBACK's reason code (a broker's
"not authorized" would look like success) and has no manual acknowledgement of received
messages. paho has both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.errors import ConfigError, UplinkUnavailable
from gateway.uplinks.mqtt.settings import MqttUplinkSettings

log = logging.getLogger(__name__)

BACKEND = "mqtt"

#: (reason code value, its name) of a PUBACK/PUBREC/PUBCOMP; 0 = accepted
Outcome = tuple[int, str]
MessageSink = Callable[[mqtt.MQTTMessage], None]


@dataclass(frozen=True, slots=True)
class LinkOptions:
    client_id: str
    clean_start: bool
    session_expiry: float = 0.0
    manual_ack: bool = False


class _TrackingContext(ssl.SSLContext):
    """Remembers the socket it wrapped: paho drops it unclosed when the handshake fails."""

    wrapped: ssl.SSLSocket | None = None

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        self.wrapped = super().wrap_socket(*args, **kwargs)
        return self.wrapped


def tls_context(s: MqttUplinkSettings) -> _TrackingContext | None:
    """An SSLContext from the settings, or None for plain TCP. Reads the PEM files."""
    if not (s.mqtt_tls or s.mqtt_ca_file or s.mqtt_cert_file or s.mqtt_key_file):
        return None
    try:
        context = _TrackingContext(ssl.PROTOCOL_TLS_CLIENT)
        if s.mqtt_ca_file:
            context.load_verify_locations(cafile=s.mqtt_ca_file)
        else:
            context.load_default_certs()
        if s.mqtt_cert_file:
            context.load_cert_chain(s.mqtt_cert_file, s.mqtt_key_file, s.mqtt_key_password)
    except FileNotFoundError as exc:
        raise ConfigError("queue.mqtt_ca_file" if exc.filename == s.mqtt_ca_file
                          else "queue.mqtt_cert_file", exc.filename, "no such file") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError("queue.mqtt_cert_file", s.mqtt_cert_file,
                          f"cannot load the TLS files: {exc}") from None
    if s.mqtt_tls_insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class Link:
    def __init__(self, settings: MqttUplinkSettings, options: LinkOptions,
                 on_message: MessageSink | None = None) -> None:
        self.settings = settings
        self.options = options
        self._on_message_sink = on_message
        self._loop = asyncio.get_running_loop()
        self._connected: asyncio.Future[None] = self._loop.create_future()
        self._pending: dict[int, asyncio.Future[Outcome]] = {}
        self._subscribed: dict[int, asyncio.Future[list[ReasonCode]]] = {}
        self.lost: UplinkUnavailable | None = None
        protocol = mqtt.MQTTv5 if settings.mqtt_protocol == "5" else mqtt.MQTTv311
        self.v5 = protocol == mqtt.MQTTv5
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=options.client_id, protocol=protocol,
            clean_session=None if self.v5 else options.clean_start,
            reconnect_on_failure=False, manual_ack=options.manual_ack)
        self.client.max_inflight_messages_set(max(1, settings.mqtt_max_inflight))
        self.client.max_queued_messages_set(0)
        self.client.enable_logger(logging.getLogger("gateway.uplinks.mqtt.paho"))
        if settings.mqtt_username is not None:
            self.client.username_pw_set(settings.mqtt_username, settings.mqtt_password)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_socket_open = self._on_socket_open
        self.client.on_socket_close = self._on_socket_close
        self.client.on_socket_register_write = self._on_register_write
        self.client.on_socket_unregister_write = self._on_unregister_write
        self._fd: int | None = None
        self._writing = False
        self._misc: asyncio.Task[None] | None = None
        self._loop_thread = threading.get_ident()

    # -- lifecycle (event loop side) --------------------------------------------------------

    async def open(self) -> None:
        s = self.settings
        where = f"{s.mqtt_broker_host}:{s.mqtt_broker_port}"
        context = await asyncio.to_thread(tls_context, s)
        if context is not None:
            self.client.tls_set_context(context)
            self.client.tls_insecure_set(s.mqtt_tls_insecure)
        properties = None
        if self.v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = int(self.options.session_expiry)
        try:
            await asyncio.wait_for(asyncio.to_thread(
                self.client.connect, s.mqtt_broker_host, s.mqtt_broker_port,
                max(1, int(s.mqtt_keepalive)), clean_start=self.options.clean_start,
                properties=properties), s.mqtt_timeout)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            if context is not None and context.wrapped is not None:
                context.wrapped.close()
            raise UplinkUnavailable(f"cannot connect to {where}: {exc or type(exc).__name__}",
                                    backend=BACKEND) from None
        self._misc = asyncio.create_task(self._keepalive(), name="mqtt-uplink-misc")
        try:
            await asyncio.wait_for(asyncio.shield(self._connected), s.mqtt_timeout)
        except TimeoutError:
            await self.close()
            raise UplinkUnavailable(f"no CONNACK from {where} within {s.mqtt_timeout}s",
                                    backend=BACKEND) from None
        except UplinkUnavailable:
            await self.close()
            raise

    async def close(self) -> None:
        self._fail_all(UplinkUnavailable("disconnected", backend=BACKEND))
        with contextlib.suppress(Exception):
            if self.client.disconnect() == mqtt.MQTT_ERR_SUCCESS:
                self.client.loop_write()  # sends DISCONNECT, then paho closes the socket
        self._unwatch()
        with contextlib.suppress(Exception):
            sock = self.client.socket()
            if sock is not None:
                sock.close()
        if self._misc is not None:
            self._misc.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._misc

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self.client.loop_misc() != mqtt.MQTT_ERR_SUCCESS:
                self._disconnected("keepalive failed")

    # -- the socket in the event loop ------------------------------------------------------

    def _on_loop(self, func: Callable[..., None], *args: Any) -> None:
        if threading.get_ident() == self._loop_thread:
            func(*args)
        else:
            self._call(func, *args)

    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        self._on_loop(self._watch, sock.fileno())

    def _on_socket_close(self, client: Any, userdata: Any, sock: Any) -> None:
        self._on_loop(self._unwatch)

    def _on_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        self._on_loop(self._set_writing, True)

    def _on_unregister_write(self, client: Any, userdata: Any, sock: Any) -> None:
        self._on_loop(self._set_writing, False)

    def _watch(self, fd: int) -> None:
        self._fd = fd
        self._loop.add_reader(fd, self._readable)
        if self._writing:
            self._loop.add_writer(fd, self._writable)

    def _unwatch(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            self._loop.remove_reader(fd)
            self._loop.remove_writer(fd)

    def _set_writing(self, on: bool) -> None:
        self._writing = on
        if self._fd is None:
            return
        if on:
            self._loop.add_writer(self._fd, self._writable)
        else:
            self._loop.remove_writer(self._fd)

    def _readable(self) -> None:
        self.client.loop_read()
        sock = self.client.socket()
        # TLS may hold decrypted bytes the selector cannot see
        while sock is not None and self._fd is not None and hasattr(sock, "pending") \
                and sock.pending() > 0:
            self.client.loop_read()
            sock = self.client.socket()

    def _writable(self) -> None:
        self.client.loop_write()

    @property
    def up(self) -> bool:
        return self.lost is None and self._connected.done() and not self._connected.exception()

    # -- requests (event loop side) -----------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool,
                properties: Properties | None) -> asyncio.Future[Outcome]:
        """Hand one message to paho; the future resolves with the broker's outcome (for QoS 0:
        when it was written to the socket). Raises UplinkUnavailable / ValueError at once."""
        if self.lost is not None:
            raise self.lost
        info = self.client.publish(topic, payload, qos, retain, properties)
        if info.rc == mqtt.MQTT_ERR_NO_CONN:
            raise UplinkUnavailable("not connected", backend=BACKEND)
        future = self._loop.create_future()
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            future.set_result((-int(info.rc), mqtt.error_string(info.rc)))
            return future
        self._pending[info.mid] = future
        # paho may have sent it and run on_publish already: that call is queued behind us
        return future

    async def subscribe(self, topic_filter: str, qos: int) -> list[ReasonCode]:
        if self.lost is not None:
            raise self.lost
        result, mid = self.client.subscribe(topic_filter, qos)
        if result != mqtt.MQTT_ERR_SUCCESS:
            raise UplinkUnavailable(f"subscribe failed: {mqtt.error_string(result)}",
                                    backend=BACKEND)
        future: asyncio.Future[list[ReasonCode]] = self._loop.create_future()
        assert mid is not None  # paho returns a mid with MQTT_ERR_SUCCESS
        self._subscribed[mid] = future
        return await asyncio.wait_for(future, self.settings.mqtt_timeout)

    def ack(self, mid: int, qos: int) -> None:
        if self.lost is not None:
            raise self.lost
        result = self.client.ack(mid, qos)
        if result != mqtt.MQTT_ERR_SUCCESS:
            raise UplinkUnavailable(f"acknowledge failed: {mqtt.error_string(result)}",
                                    backend=BACKEND)

    # -- paho callbacks (network thread): hand over to the loop, nothing else -------------------

    def _call(self, func: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            self._loop.call_soon_threadsafe(func, *args)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Any) -> None:
        self._call(self._connect_result, int(reason.value), str(reason))

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Any) -> None:
        self._call(self._disconnected, str(reason))

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Any) -> None:
        self._call(self._published, mid, int(reason.value), str(reason))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: list[ReasonCode],
                      properties: Any) -> None:
        self._call(self._subscribe_result, mid, reasons)

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self._on_message_sink is not None:
            self._call(self._on_message_sink, message)

    # -- results (event loop side) --------------------------------------------------------------

    def _connect_result(self, code: int, text: str) -> None:
        if self._connected.done():
            return
        if code == 0:
            self._connected.set_result(None)
        else:  # bad credentials, not authorized, server unavailable: keep buffering
            self._connected.set_exception(UplinkUnavailable(
                f"the broker refused the connection: {text}", backend=BACKEND, code=str(code)))

    def _disconnected(self, text: str) -> None:
        error = UplinkUnavailable(f"connection lost: {text}", backend=BACKEND)
        if not self._connected.done():
            self._connected.set_exception(error)
        self._fail_all(error)

    def _fail_all(self, error: UplinkUnavailable) -> None:
        self.lost = self.lost or error
        futures: list[asyncio.Future[Any]] = [*self._pending.values(), *self._subscribed.values()]
        for future in futures:
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        self._subscribed.clear()

    def _published(self, mid: int, code: int, text: str) -> None:
        future = self._pending.pop(mid, None)
        if future is not None and not future.done():
            future.set_result((code, text))

    def _subscribe_result(self, mid: int, reasons: list[ReasonCode]) -> None:
        future = self._subscribed.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(reasons)
