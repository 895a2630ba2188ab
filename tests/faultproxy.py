"""A fault-injecting TCP proxy for tests: 127.0.0.1 only, bounded, self-stopping.

Put it between the gateway and a server (the uplink's Redis, or the MQTT broker on the
ingress side) and switch its mode while the test runs:

- ``up``: forward both directions unchanged.
- ``cut``: reset every open connection (SO_LINGER 0, then close: the peer sees ECONNRESET)
  and reset new ones right after accepting them.
- ``blackhole``: connections stay open and nothing is forwarded either way; no reset, no
  FIN. Bytes already received are held, as a network partition holds them, and flow again
  when the mode returns to ``up`` (by then the peers have usually given up on them).
  New connections are accepted and held the same way.
- ``slow``: every chunk waits ``delay`` seconds and the throughput is capped at ``rate``
  bytes per second per direction.
- ``flapping``: ``up`` for ``up_seconds``, then ``cut`` for ``down_seconds``, repeated.
- ``hold_replies``: client -> server flows, server -> client is held (and flows again when
  the mode changes): the server gets a request, the client does not get the answer yet
  (an MQTT PUBLISH reaches the broker, its PUBACK waits).

It runs an asyncio loop on its own daemon thread. It stops itself after ``lifetime``
seconds (resetting everything), and refuses more than ``max_connections`` at once, so a
failed test cannot leave it running or growing.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

Mode = Literal["up", "cut", "blackhole", "slow", "flapping", "hold_replies"]

HOST = "127.0.0.1"
CHUNK = 65536
_LINGER_RST = struct.pack("ii", 1, 0)


@dataclass
class ProxyStats:
    accepted: int = 0
    resets: int = 0  # connections ended with an RST by the proxy
    bytes_up: int = 0  # client -> server
    bytes_down: int = 0  # server -> client
    flaps: int = 0  # up -> cut transitions in flapping mode


class _Link:
    """One proxied connection: the client side and (once connected) the server side."""

    def __init__(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.client_r = client_r
        self.client_w = client_w
        self.server_r: asyncio.StreamReader | None = None
        self.server_w: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.closed = False

    def reset(self) -> None:
        """End both sides with an RST."""
        if self.closed:
            return
        self.closed = True
        for writer in (self.client_w, self.server_w):
            if writer is None:
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            writer.transport.abort()
        for task in self.tasks:
            task.cancel()

    def close(self) -> None:
        """End both sides with a FIN (a peer closed its side)."""
        if self.closed:
            return
        self.closed = True
        for writer in (self.client_w, self.server_w):
            if writer is not None:
                writer.close()
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()


class FaultProxy:
    """``with FaultProxy(target_port) as proxy: ... proxy.port ... proxy.set_mode("cut")``"""

    def __init__(self, target_port: int, *, lifetime: float = 300.0,
                 max_connections: int = 64) -> None:
        self.target_port = target_port
        self.lifetime = lifetime
        self.max_connections = max_connections
        self.port = 0
        self.stats = ProxyStats()
        self._mode: Mode = "up"
        self._delay = 0.0
        self._rate = 0.0
        self._up_seconds = 1.0
        self._down_seconds = 1.0
        self._cut_now = False  # in flapping mode: currently in the down phase
        self._links: set[_Link] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flowing: asyncio.Event | None = None
        self._replies: asyncio.Event | None = None  # clear in hold_replies
        self._stop: asyncio.Event | None = None
        self._flapper: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    # -- control, from the test's thread ------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._thread_main, name="faultproxy", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("fault proxy did not start")
        if self._error is not None:
            raise RuntimeError(f"fault proxy failed to start: {self._error}")
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop may have stopped itself
                loop.call_soon_threadsafe(self._request_stop)
            thread.join(10)
        self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def link_down(self) -> bool:
        """True while nothing gets through (cut, blackhole, or a flapping down phase)."""
        return self._mode in ("cut", "blackhole") or (self._mode == "flapping" and self._cut_now)

    def set_mode(self, mode: Mode, *, delay: float = 0.0, rate: float = 0.0,
                 up_seconds: float = 1.0, down_seconds: float = 1.0) -> None:
        """Switch the mode; applied on the proxy's loop before this returns."""
        if self._loop is None:
            raise RuntimeError("the proxy is not running")
        done = threading.Event()

        def apply() -> None:
            self._apply(mode, delay, rate, up_seconds, down_seconds)
            done.set()

        self._loop.call_soon_threadsafe(apply)
        if not done.wait(5):
            raise RuntimeError("fault proxy did not apply the mode change")

    # -- the proxy's own thread -----------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by start(); the thread must not die silently
            self._error = exc
            self._started.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._replies = asyncio.Event()
        self._replies.set()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._accept, HOST, 0, reuse_address=True)
        self.port = server.sockets[0].getsockname()[1]
        self._started.set()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.lifetime)
        finally:
            server.close()
            if self._flapper is not None:
                self._flapper.cancel()
            for link in list(self._links):
                self._reset(link)
            await asyncio.sleep(0)

    def _request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def _apply(self, mode: Mode, delay: float, rate: float, up_seconds: float,
               down_seconds: float) -> None:
        assert self._flowing is not None
        if self._flapper is not None:
            self._flapper.cancel()
            self._flapper = None
        self._mode, self._delay, self._rate = mode, delay, rate
        self._up_seconds, self._down_seconds = up_seconds, down_seconds
        self._cut_now = False
        if mode == "cut":
            self._reset_all()
        if mode == "blackhole":
            self._flowing.clear()
        else:
            self._flowing.set()
        assert self._replies is not None
        if mode == "hold_replies":
            self._replies.clear()
        else:
            self._replies.set()
        if mode == "flapping":
            self._flapper = asyncio.get_running_loop().create_task(self._flap())

    async def _flap(self) -> None:
        while True:
            await asyncio.sleep(self._up_seconds)
            self._cut_now = True
            self.stats.flaps += 1
            self._reset_all()
            await asyncio.sleep(self._down_seconds)
            self._cut_now = False

    def _refusing(self) -> bool:
        return self._mode == "cut" or (self._mode == "flapping" and self._cut_now)

    def _reset_all(self) -> None:
        for link in list(self._links):
            self._reset(link)

    def _reset(self, link: _Link) -> None:
        if not link.closed:
            self.stats.resets += 1
        link.reset()
        self._links.discard(link)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.accepted += 1
        link = _Link(reader, writer)
        self._links.add(link)
        if self._refusing() or len(self._links) > self.max_connections:
            self._reset(link)
            return
        assert self._flowing is not None
        await self._flowing.wait()  # blackhole: hold the new connection open, unanswered
        try:
            link.server_r, link.server_w = await asyncio.open_connection(HOST, self.target_port)
        except OSError:
            self._reset(link)  # the server is down: the client sees a reset, like a refusal
            return
        if link.closed:
            link.server_w.transport.abort()
            return
        up = asyncio.ensure_future(self._pump(link, link.client_r, link.server_w, True))
        down = asyncio.ensure_future(self._pump(link, link.server_r, link.client_w, False))
        link.tasks += [up, down]
        await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        link.close()
        self._links.discard(link)

    async def _pump(self, link: _Link, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, upstream: bool) -> None:
        assert self._flowing is not None
        try:
            while not link.closed:
                await self._flowing.wait()
                data = await reader.read(CHUNK)
                if not data:
                    return
                await self._flowing.wait()  # blackholed after reading: hold the bytes
                if not upstream:
                    assert self._replies is not None
                    await self._replies.wait()
                if self._delay > 0:
                    await asyncio.sleep(self._delay)
                await self._write(writer, data, upstream)
        except (ConnectionError, OSError):
            return

    async def _write(self, writer: asyncio.StreamWriter, data: bytes, upstream: bool) -> None:
        """Write ``data``; in slow mode in pieces of 1/20 s worth of ``rate`` each."""
        step = len(data) if self._rate <= 0 else max(1, int(self._rate / 20))
        for i in range(0, len(data), step):
            piece = data[i:i + step]
            if self._rate > 0:
                await asyncio.sleep(len(piece) / self._rate)
            writer.write(piece)
            await writer.drain()
            if upstream:
                self.stats.bytes_up += len(piece)
            else:
                self.stats.bytes_down += len(piece)
