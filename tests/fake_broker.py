"""A scriptable MQTT 5 broker for unit tests of publishing clients (the downlink's): it takes
CONNECT, PUBLISH QoS 0/1, PINGREQ and DISCONNECT on 127.0.0.1, records every PUBLISH, and
answers each with the PUBACK reason its ``reason_for`` gives — or holds the PUBACK until
``release()``, or drops the connection. It does not route messages to subscribers: real
brokers (mosquitto) do that in the integration tests; this one plays refusals and failures a
real broker will not produce on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.ingress.codec import (
    Properties,
    Publish,
    decode_packet,
    encode_connack,
    encode_properties,
)

HOST = "127.0.0.1"


@dataclass
class Received:
    publish: Publish
    client_id: str
    #: how many PUBLISHes arrived before this one (all connections)
    index: int


@dataclass
class FakeBroker:
    port: int = 0
    #: topic -> PUBACK reason code (0 = accepted)
    reason_for: Callable[[str], int] = lambda topic: 0
    #: topic -> True to close the connection instead of answering
    drop_on: Callable[[str], bool] = lambda topic: False
    received: list[Received] = field(default_factory=list)
    #: PUBACKs go out only while this is set
    acking: asyncio.Event = field(default_factory=asyncio.Event)
    connects: int = 0
    max_packet_size: int | None = None
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    #: (time PUBACK written, packet id) per answered PUBLISH, in order
    acks_sent: list[tuple[float, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.acking.set()

    async def start(self) -> FakeBroker:
        self._server = await asyncio.start_server(self._client, HOST, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Close the listener and reset every connection (a broker that died)."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()
            self._server = None

    def hold(self) -> None:
        self.acking.clear()

    def release(self) -> None:
        self.acking.set()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        client_id = ""
        try:
            while True:
                packet = await _read_packet(reader)
                kind = packet[0] >> 4
                if kind == 1:  # CONNECT
                    self.connects += 1
                    client_id = _connect_client_id(packet)
                    props = Properties(maximum_packet_size=self.max_packet_size)
                    writer.write(encode_connack(False, 0, properties=props))
                elif kind == 3:
                    if not await self._publish(packet, client_id, writer):
                        return
                elif kind == 12:  # PINGREQ
                    writer.write(b"\xd0\x00")
                elif kind == 14:  # DISCONNECT
                    return
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _publish(self, packet: bytes, client_id: str, writer: asyncio.StreamWriter) -> bool:
        publish = decode_packet(packet)
        assert isinstance(publish, Publish)
        self.received.append(Received(publish, client_id, len(self.received)))
        if self.drop_on(publish.topic):
            return False
        if publish.qos:
            await self.acking.wait()
            reason = self.reason_for(publish.topic)
            body = publish.packet_id.to_bytes(2, "big")
            if reason:
                body += bytes((reason,)) + encode_properties(None)
            writer.write(bytes((0x40, len(body))) + body)
            self.acks_sent.append((asyncio.get_running_loop().time(), publish.packet_id))
        return True


async def _read_packet(reader: asyncio.StreamReader) -> bytes:
    first = await reader.readexactly(1)
    length = shift = 0
    header = bytearray(first)
    while True:
        byte = (await reader.readexactly(1))[0]
        header.append(byte)
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return bytes(header) + await reader.readexactly(length)


def _connect_client_id(packet: bytes) -> str:
    """The client id of a CONNECT (MQTT 5 or 3.1.1), for the record."""
    pos = 1
    while packet[pos] & 0x80:
        pos += 1
    pos += 1  # past the remaining length
    pos += 2 + 4 + 1 + 1 + 2  # "MQTT", version, flags, keepalive
    if packet[pos - 4] == 5:  # version 5: skip the properties
        length = shift = 0
        while True:
            byte = packet[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        pos += length
    size = int.from_bytes(packet[pos:pos + 2], "big")
    with contextlib.suppress(UnicodeDecodeError):
        return packet[pos + 2:pos + 2 + size].decode()
    return ""
