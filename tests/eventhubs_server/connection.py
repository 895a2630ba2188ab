"""One AMQP 1.0 connection of the test Event Hubs server: SASL, sessions, links, flow control.

Nodes a client can attach to: ``$cbs`` (put-token, always granted), ``$management`` (READ of
hub and partition properties), ``<hub>`` / ``<hub>/Partitions/<id>`` (send) and
``<hub>/ConsumerGroups/<cg>/Partitions/<id>`` (receive, with a selector filter). Anything
else fails loudly: an unknown node is detached with ``amqp:not-found``, an unimplemented
feature closes the connection with ``amqp:not-implemented`` and is logged.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tests.eventhubs_server.codec import Array, Symbol, UByte, UInt, ULong, UShort
from tests.eventhubs_server.frames import (
    ACCEPTED,
    AMQP_HEADER,
    FRAME_SASL,
    REJECTED,
    SASL_HEADER,
    SOURCE,
    SOURCE_FIELDS,
    TARGET,
    TARGET_FIELDS,
    Frame,
    FrameError,
    described_list,
    empty_frame,
    encode_frame,
    error,
    fields,
    outcome,
    parse_frame,
    transfer_overhead,
    uint,
)
from tests.eventhubs_server.nodes import (
    Delivery,
    IncomingNode,
    OutgoingNode,
    PartitionReceiveNode,
    resolve_node,
    text,
)

if TYPE_CHECKING:
    from tests.eventhubs_server.server import ServerState

log = logging.getLogger("tests.eventhubs_server")

MAX_FRAME_SIZE = 64 * 1024
SESSION_WINDOW = 1024
LINK_CREDIT = 256


@dataclass
class IncomingLink:
    """The client sends on it; the server receives."""

    name: str
    handle: int
    node: IncomingNode
    credit: int = LINK_CREDIT
    delivery_count: int = 0
    partial: bytearray | None = None
    partial_id: int = 0
    partial_format: int = 0
    partial_settled: bool = False
    oversize: bool = False


@dataclass
class OutgoingLink:
    """The client receives on it; the server sends."""

    name: str
    handle: int
    node: OutgoingNode
    settled: bool
    credit: int = 0
    delivery_count: int = 0
    drain: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


@dataclass
class Session:
    channel: int
    next_incoming_id: int
    incoming_window: int = SESSION_WINDOW
    next_outgoing_id: int = 0
    remote_incoming_window: int = 0
    incoming: dict[int, IncomingLink] = field(default_factory=dict)
    outgoing: dict[int, OutgoingLink] = field(default_factory=dict)
    # handles we refused (attach + detach with error), until the client's detach arrives
    refused: dict[int, tuple[str, str]] = field(default_factory=dict)
    refused_delivery: dict[int, tuple[int, bool]] = field(default_factory=dict)  # id, settled


class Connection:
    def __init__(self, state: ServerState, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.state = state
        self.reader = reader
        self.writer = writer
        self.sessions: dict[int, Session] = {}
        self.ended: set[int] = set()
        self.remote_max_frame = 512
        self.closed = False
        self._heartbeat: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        try:
            await self._handshake()
            while not self.closed:
                frame = await self._read_frame()
                await self._dispatch(frame)
                await self.writer.drain()
        except FrameError as exc:
            log.warning("closing connection: %s", exc)
            self._write(encode_frame(0, "close", [error(exc.condition, exc.description)]))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception as exc:  # a server bug: say so on the wire and in the log
            log.exception("closing connection after an internal error")
            self._write(encode_frame(0, "close", [error("amqp:internal-error", repr(exc))]))
        finally:
            await self._teardown()

    def abort(self) -> None:
        self.closed = True
        self.writer.transport.abort()

    async def _teardown(self) -> None:
        self.closed = True
        tasks = [link.task for s in self.sessions.values() for link in s.outgoing.values()
                 if link.task is not None]
        if self._heartbeat is not None:
            tasks.append(self._heartbeat)
        for session in self.sessions.values():
            for link in session.outgoing.values():
                link.node.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.writer.close()

    async def _handshake(self) -> None:
        header = await self.reader.readexactly(8)
        if header == SASL_HEADER:
            self._write(SASL_HEADER)
            self._write(encode_frame(0, "sasl-mechanisms", [Array([Symbol("ANONYMOUS")])],
                                     frame_type=FRAME_SASL))
            init = await self._read_frame()
            if init.name != "sasl-init" or str(init.fields[0]) != "ANONYMOUS":
                # no AMQP close exists before open: refuse with sasl-outcome sys-perm
                log.warning("closing connection: only SASL ANONYMOUS is implemented, got %r",
                            init.fields[:1] if init.name == "sasl-init" else init.name)
                self._write(encode_frame(0, "sasl-outcome", [UByte(3), None],
                                         frame_type=FRAME_SASL))
                raise ConnectionError("unsupported SASL mechanism")
            self._write(encode_frame(0, "sasl-outcome", [UByte(0), None], frame_type=FRAME_SASL))
            header = await self.reader.readexactly(8)
        if header != AMQP_HEADER:
            self._write(AMQP_HEADER)
            raise ConnectionError(f"unsupported protocol header {header!r}")
        self._write(AMQP_HEADER)

    async def _read_frame(self) -> Frame:
        header = await self.reader.readexactly(8)
        size = struct.unpack(">I", header[:4])[0]
        if size < 8 or size > MAX_FRAME_SIZE:
            raise FrameError("amqp:connection:framing-error", f"frame size {size}")
        return parse_frame(header, await self.reader.readexactly(size - 8))

    def _write(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    # ------------------------------------------------------------ dispatch

    async def _dispatch(self, frame: Frame) -> None:
        if frame.name is None:
            return  # heartbeat
        if frame.name == "open":
            self._on_open(frame.fields)
        elif frame.name == "close":
            self._write(encode_frame(0, "close", [None]))
            self.closed = True
        elif frame.name == "begin":
            self._on_begin(frame.channel, frame.fields)
        else:
            session = self.sessions.get(frame.channel)
            if session is None and frame.channel in self.ended and frame.name != "transfer":
                return  # the SDK detaches its links after ending their session; harmless
            if session is None:
                raise FrameError("amqp:connection:framing-error",
                                 f"{frame.name} on unknown channel {frame.channel}")
            await self._on_session_frame(session, frame)

    async def _on_session_frame(self, session: Session, frame: Frame) -> None:
        if frame.name == "end":
            self._end_session(session)
        elif frame.name == "attach":
            self._on_attach(session, frame.fields)
        elif frame.name == "detach":
            self._on_detach(session, frame.fields)
        elif frame.name == "flow":
            self._on_flow(session, frame.fields)
        elif frame.name == "transfer":
            await self._on_transfer(session, frame.fields, frame.payload)
        elif frame.name == "disposition":
            pass  # our deliveries are sent settled or need no outcome (no redelivery)
        else:
            raise FrameError("amqp:not-implemented", f"{frame.name} is not implemented")

    def _on_open(self, values: list[Any]) -> None:
        self.remote_max_frame = min(int(values[2] or 0xFFFFFFFF), MAX_FRAME_SIZE * 16)
        self._write(encode_frame(0, "open", [
            "eventhubs-test-server", None, UInt(MAX_FRAME_SIZE), UShort(255), None,
            None, None, None, None, None]))
        if values[4]:
            self._heartbeat = asyncio.create_task(self._beat(int(values[4]) / 2000))

    async def _beat(self, interval: float) -> None:
        while not self.closed:
            await asyncio.sleep(interval)
            self._write(empty_frame())

    def _on_begin(self, channel: int, values: list[Any]) -> None:
        if channel in self.sessions:
            raise FrameError("amqp:connection:framing-error", f"channel {channel} in use")
        self.ended.discard(channel)
        session = Session(channel, next_incoming_id=int(values[1]))
        session.remote_incoming_window = int(values[2])
        self.sessions[channel] = session
        self._write(encode_frame(channel, "begin", [
            UShort(channel), UInt(0), UInt(SESSION_WINDOW), UInt(SESSION_WINDOW),
            UInt(0xFFFF), None, None, None]))

    def _end_session(self, session: Session) -> None:
        for link in session.outgoing.values():
            link.node.close()
            if link.task:
                link.task.cancel()
        del self.sessions[session.channel]
        self.ended.add(session.channel)
        self._write(encode_frame(session.channel, "end", [None]))

    # ------------------------------------------------------------ links

    def _on_attach(self, session: Session, values: list[Any]) -> None:
        name, handle, role = values[0], int(values[1]), bool(values[2])
        source = fields(values[5], SOURCE_FIELDS) if values[5] is not None else None
        target = fields(values[6], TARGET_FIELDS) if values[6] is not None else None
        endpoint = source if role else target
        address = text(endpoint[0]) if endpoint else None
        node, problem = resolve_node(self.state, self, address or "", client_receives=role,
                                     source=source, target=target,
                                     properties=values[13] or {}, desired=values[12])
        if isinstance(node, PartitionReceiveNode) and not node.claim(
                lambda: self._steal(session, handle)):
            problem = ("amqp:link:stolen", "a receiver with a higher owner level (epoch) "
                       f"holds {node.address}")
        offered = node.offered_capabilities() if node is not None else None
        reply = [name, UInt(handle), not role, values[3] if values[3] is not None else UByte(2),
                 UByte(0),
                 described_list(SOURCE, source, SOURCE_FIELDS) if source else None,
                 described_list(TARGET, target, TARGET_FIELDS) if target else None,
                 None, False, UInt(0) if role else None,
                 ULong(self.state.max_message_size), offered, None, None]
        if node is None or problem is not None:
            # Reply, then refuse: the SDK needs the non-null source and target to see the error.
            self._write(encode_frame(session.channel, "attach", reply))
            condition, description = problem or ("amqp:not-found", f"no node {address!r}")
            log.info("refusing link %r: %s %s", address, condition, description)
            session.refused[handle] = (condition, description)
            self._write(encode_frame(session.channel, "detach",
                                     [UInt(handle), True, error(condition, description)]))
            return
        self._write(encode_frame(session.channel, "attach", reply))
        if role and isinstance(node, OutgoingNode):  # the client receives
            settled = values[3] is None or int(values[3]) != 0
            link = OutgoingLink(str(name), handle, node, settled)
            session.outgoing[handle] = link
            node.bind(link.wake.set)
            link.task = asyncio.create_task(self._pump(session, link))
        elif not role and isinstance(node, IncomingNode):
            session.incoming[handle] = IncomingLink(str(name), handle, node)
            self._send_flow(session, handle, LINK_CREDIT, 0)
        else:
            raise FrameError("amqp:internal-error", f"node {node!r} for role {role}")

    def _on_detach(self, session: Session, values: list[Any]) -> None:
        handle = int(values[0])
        out = session.outgoing.pop(handle, None)
        if out is not None:
            out.node.close()
            if out.task:
                out.task.cancel()
        known = out is not None or session.incoming.pop(handle, None) is not None
        session.refused.pop(handle, None)
        session.refused_delivery.pop(handle, None)
        if known:  # else it answers a detach of ours
            self._write(encode_frame(session.channel, "detach", [UInt(handle), True, None]))

    def _steal(self, session: Session, handle: int) -> None:
        """Another receiver took this link's partition (owner level): detach it."""
        link = session.outgoing.pop(handle, None)
        if link is None:
            return
        link.node.close()
        if link.task:
            link.task.cancel()
        log.info("receiver %s lost %s to a higher owner level", link.name, link.node.address)
        self.detach_with_error(session, handle, "amqp:link:stolen",
                               "a receiver with a higher or equal owner level (epoch) took "
                               f"{link.node.address}")

    def detach_with_error(self, session: Session, handle: int, condition: str,
                          description: str) -> None:
        self._write(encode_frame(session.channel, "detach",
                                 [UInt(handle), True, error(condition, description)]))

    def _send_flow(self, session: Session, handle: int | None, credit: int | None,
                   delivery_count: int | None, drain: bool = False) -> None:
        self._write(encode_frame(session.channel, "flow", [
            uint(session.next_incoming_id), UInt(session.incoming_window),
            uint(session.next_outgoing_id), UInt(SESSION_WINDOW),
            None if handle is None else UInt(handle),
            None if delivery_count is None else uint(delivery_count),
            None if credit is None else UInt(credit), None, drain, False, None]))

    def _on_flow(self, session: Session, values: list[Any]) -> None:
        remote_next_incoming = session.next_outgoing_id if values[0] is None else int(values[0])
        session.remote_incoming_window = remote_next_incoming + int(values[1]) \
            - session.next_outgoing_id
        for waiting in session.outgoing.values():  # the session window may have opened
            waiting.wake.set()
        handle = values[4]
        if handle is None:
            return
        out = session.outgoing.get(int(handle))
        if out is not None:
            their_count = out.delivery_count if values[5] is None else int(values[5])
            out.credit = max(0, their_count + int(values[6] or 0) - out.delivery_count)
            out.drain = bool(values[8])
            if values[9]:  # echo
                self._send_flow(session, out.handle, out.credit, out.delivery_count)
        elif int(handle) in session.incoming and values[9]:
            incoming = session.incoming[int(handle)]
            self._send_flow(session, incoming.handle, incoming.credit, incoming.delivery_count)

    # ------------------------------------------------------------ receiving from the client

    async def _on_transfer(self, session: Session, values: list[Any], payload: bytes) -> None:
        session.next_incoming_id += 1
        session.incoming_window -= 1
        link = session.incoming.get(int(values[0]))
        if link is None and int(values[0]) in session.refused:
            # sent before the client saw our refusal: reject it with the refusal's error
            handle = int(values[0])
            if values[1] is not None:  # first frame of a delivery
                session.refused_delivery[handle] = (int(values[1]), bool(values[4]))
            delivery_id, settled = session.refused_delivery.get(handle, (0, True))
            if not values[5] and not settled:
                self._write(encode_frame(session.channel, "disposition", [
                    True, uint(delivery_id), uint(delivery_id), True,
                    outcome(REJECTED, error(*session.refused[handle])), False]))
            return
        if link is None:
            raise FrameError("amqp:session:unattached-handle", f"transfer on handle {values[0]}")
        if values[8]:
            raise FrameError("amqp:not-implemented", "resuming deliveries is not implemented")
        if link.partial is None:
            if values[1] is None:
                raise FrameError("amqp:decode-error", "first transfer frame without delivery-id")
            link.partial = bytearray()
            link.partial_id, link.partial_format = int(values[1]), int(values[3] or 0)
            link.partial_settled, link.oversize = bool(values[4]), False
        if not link.oversize:
            link.partial += payload
            link.oversize = len(link.partial) > self.state.max_message_size
            if link.oversize:
                link.partial = bytearray()  # keep memory bounded; the delivery will be rejected
        if values[9]:  # aborted
            link.partial = None
        elif not values[5]:  # last frame of the delivery
            await self._complete_delivery(session, link)
        if session.incoming_window < SESSION_WINDOW // 2:
            session.incoming_window = SESSION_WINDOW
            self._send_flow(session, None, None, None)

    async def _complete_delivery(self, session: Session, link: IncomingLink) -> None:
        assert link.partial is not None
        delivery = Delivery(bytes(link.partial), link.partial_format, link.oversize)
        delivery_id, settled = link.partial_id, link.partial_settled
        link.partial = None
        link.credit -= 1
        link.delivery_count += 1
        rejection = await link.node.deliver(delivery)
        if not settled:
            state = (outcome(REJECTED, error(*rejection)) if rejection
                     else outcome(ACCEPTED))
            self._write(encode_frame(session.channel, "disposition", [
                True, uint(delivery_id), uint(delivery_id), True, state, False]))
        if link.credit < LINK_CREDIT // 2:
            link.credit = LINK_CREDIT
            self._send_flow(session, link.handle, link.credit, link.delivery_count)

    # ------------------------------------------------------------ sending to the client

    def find_reply_link(self, node_address: str, reply_to: str | None) -> OutgoingLink | None:
        candidates = [(s, link) for s in self.sessions.values() for link in s.outgoing.values()
                      if link.node.address == node_address]
        for _, link in candidates:
            if reply_to is not None and link.node.reply_address == reply_to:
                return link
        return candidates[0][1] if candidates else None

    async def _pump(self, session: Session, link: OutgoingLink) -> None:
        """Send what the node has, within link credit and the session window; then wait."""
        try:
            while not self.closed:
                await link.wake.wait()
                link.wake.clear()
                sent = 0
                while link.credit > 0 and session.remote_incoming_window > 0:
                    payload = link.node.next_payload()
                    if payload is None:
                        break
                    self._send_transfer(session, link, payload)
                    sent += 1
                    if sent % 32 == 0:
                        await self.writer.drain()
                if link.drain and link.credit > 0 and link.node.next_payload(peek=True) is None:
                    link.delivery_count += link.credit
                    link.credit = 0
                    link.drain = False
                    self._send_flow(session, link.handle, 0, link.delivery_count, drain=True)
                await self.writer.drain()
        except ConnectionError:
            self.abort()
        except FrameError as exc:
            log.warning("closing connection: %s", exc)
            self._write(encode_frame(0, "close", [error(exc.condition, exc.description)]))
            self.abort()

    def _send_transfer(self, session: Session, link: OutgoingLink, payload: bytes) -> None:
        tag = struct.pack(">Q", link.delivery_count)
        values: list[Any] = [UInt(link.handle), uint(session.next_outgoing_id), tag, UInt(0),
                             link.settled, False, None, None, False, False, False]
        room = self.remote_max_frame - transfer_overhead(session.channel, values) - 16
        chunks = [payload[i:i + room] for i in range(0, len(payload), room)] or [b""]
        for index, chunk in enumerate(chunks):
            values[5] = index < len(chunks) - 1
            self._write(encode_frame(session.channel, "transfer", values, chunk))
        session.next_outgoing_id += 1
        session.remote_incoming_window -= 1
        link.delivery_count += 1
        link.credit -= 1
