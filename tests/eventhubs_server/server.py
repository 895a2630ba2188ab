"""The test Event Hubs server: an asyncio AMQP 1.0 listener in its own daemon thread.

``stop()`` is an outage: the listener and every open connection are closed abruptly (no AMQP
close), while the stored events survive; ``start()`` again listens on the same port.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.eventhubs_server.connection import Connection
from tests.eventhubs_server.store import Store, StoredEvent

log = logging.getLogger("tests.eventhubs_server")


@dataclass
class ServerState:
    """What every connection shares (the loop thread writes, tests read under the lock)."""

    store: Store
    max_message_size: int
    consumer_groups: tuple[str, ...]
    cbs_tokens: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # (hub, consumer group, partition) -> (epoch, evict, node) of its attached receivers
    receivers: dict[tuple[str, str, str], list[tuple[int | None, Callable[[], None], object]]] = \
        field(default_factory=dict)
    receivers_changed: threading.Condition = field(default_factory=threading.Condition)

    def record_token(self, audience: str) -> None:
        with self.lock:
            self.cbs_tokens.append(audience)
            del self.cbs_tokens[:-1000]  # bounded: the newest are what tests look at


class EventHubsServer:
    def __init__(self, hubs: dict[str, int], *, port: int = 0,
                 max_message_size: int = 1024 * 1024,
                 consumer_groups: tuple[str, ...] = ("$Default",)) -> None:
        self.host = "127.0.0.1"
        self.port = port
        self._state = ServerState(Store(), max_message_size, tuple(consumer_groups))
        for name, partitions in hubs.items():
            self._state.store.add_hub(name, partitions)
        self.connections_accepted = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._connections: set[Connection] = set()

    @property
    def cbs_tokens(self) -> list[str]:
        with self._state.lock:
            return list(self._state.cbs_tokens)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the Event Hubs test server is already running")
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(ready, failure), daemon=True,
                                        name=f"eventhubs-server-{self.port}")
        self._thread.start()
        if not ready.wait(10) or failure:
            self._thread.join(1)
            self._thread = None
            raise RuntimeError(f"Event Hubs test server did not start: {failure}")

    def stop(self) -> None:
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None or loop is None or stopping is None:
            return
        loop.call_soon_threadsafe(stopping.set)
        thread.join(10)
        if thread.is_alive():
            raise RuntimeError("the Event Hubs test server did not stop within 10 s")
        self._thread = self._loop = self._stopping = None

    def _run(self, ready: threading.Event, failure: list[BaseException]) -> None:
        try:
            asyncio.run(self._serve(ready))
        except BaseException as exc:  # reported to start(), which raises it
            failure.append(exc)
            ready.set()

    async def _serve(self, ready: threading.Event) -> None:
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._on_client, self.host, self.port)
        self.port = int(server.sockets[0].getsockname()[1])
        self._loop = asyncio.get_running_loop()
        ready.set()
        log.info("Event Hubs test server listening on %s:%s", self.host, self.port)
        await self._stopping.wait()
        server.close()
        for connection in list(self._connections):
            connection.abort()
        await server.wait_closed()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _on_client(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        self.connections_accepted += 1
        connection = Connection(self._state, reader, writer)
        self._connections.add(connection)
        try:
            await connection.run()
        finally:
            self._connections.discard(connection)

    # ------------------------------------------------------------ for tests

    def connection_string(self, hub: str | None = None) -> str:
        text = (f"Endpoint=sb://{self.host}:{self.port};"
                "SharedAccessKeyName=RootManageSharedAccessKey;"
                "SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true")
        return text + (f";EntityPath={hub}" if hub else "")

    def add_hub(self, name: str, partitions: int) -> None:
        self._state.store.add_hub(name, partitions)

    def events(self, hub: str, partition_id: str | None = None) -> list[StoredEvent]:
        return self._state.store.events(hub, partition_id)

    def wait_for_events(self, hub: str, count: int, timeout: float = 10.0) -> list[StoredEvent]:
        return self._state.store.wait_for_events(hub, count, timeout)

    def wait_for_receivers(self, hub: str, partition_id: str, count: int = 1, *,
                           consumer_group: str = "$Default",
                           timeout: float = 10.0) -> list[int | None]:
        """Block until ``count`` receivers are attached to the partition; return their owner
        levels (None: no epoch). Raises TimeoutError naming count/have."""
        changed, key = self._state.receivers_changed, (hub, consumer_group, partition_id)
        with changed:
            if not changed.wait_for(lambda: len(self._state.receivers.get(key, [])) >= count,
                                    timeout):
                have = len(self._state.receivers.get(key, []))
                raise TimeoutError(f"{hub}/{consumer_group}/{partition_id}: waited {timeout}s "
                                   f"for {count} receivers, have {have}")
            return [epoch for epoch, _, _ in self._state.receivers[key]]

    def reject_next_sends(self, hub: str, count: int,
                          condition: str = "com.microsoft:server-busy",
                          description: str = "rejected by the test (reject_next_sends)") -> None:
        self._state.store.reject_next_sends(hub, count, condition, description)
