"""Google's Pub/Sub fake (``cloud.google.com/go/pubsub/v2/pstest``) as a test server.

``scripts/provision/pubsub.sh`` builds the small Go program in ``tests/pstest/`` into
``.cache/pstest/pstest`` (or set ``$PSTEST_BINARY``). It listens on 127.0.0.1 on the port it
is given and prints ``ADDR 127.0.0.1:<port>`` once it accepts connections; ready means that
line appeared *in this run* and the port answers. Its state is in memory: ``restart()``
keeps the port but starts empty, so topics and subscriptions must be created again.

``FakeAdmin`` is the test side's own client of the fake (blocking; call it through
``asyncio.to_thread``): create topics and subscriptions, pull what arrived.
A missing binary skips the test locally and fails it when CI=true, like require_binary.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.servers import IN_CI, ServerProcess, SharedServer, free_port, wait_until

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BINARY = REPO / ".cache" / "pstest" / "pstest"


def pstest_binary() -> str:
    path = Path(os.environ.get("PSTEST_BINARY") or DEFAULT_BINARY)
    if not os.access(path, os.X_OK):
        message = f"no Pub/Sub fake at {path} (run: bash scripts/provision/pubsub.sh)"
        if IN_CI:
            pytest.fail(f"CI must run the Pub/Sub integration tests: {message}")
        pytest.skip(message)
    return str(path)


@dataclass
class PubSubFake(ServerProcess):
    """A ServerProcess whose readiness looks only at the log written since this start."""

    _log_offset: int = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        try:
            self._log_offset = self.log_path.stat().st_size
        except FileNotFoundError:
            self._log_offset = 0
        super().start(timeout)

    def announced(self) -> bool:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self._log_offset)
                return f"ADDR {self.host}".encode() in fh.read()
        except OSError:
            return False


def _ready(server: ServerProcess) -> bool:
    assert isinstance(server, PubSubFake)
    if not server.announced():
        return False
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", server.port)) == 0


def pubsub_fake(workdir: Path, port: int | None = None) -> PubSubFake:
    binary = pstest_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    return PubSubFake("pstest", [binary, "-port", str(port)], workdir, port, _ready)


_SHARED: SharedServer[PubSubFake] = SharedServer(pubsub_fake, "pstest")


def shared_fake(tmp_path_factory: pytest.TempPathFactory) -> contextlib.AbstractContextManager[PubSubFake]:
    """One fake per test session for the integration and contract tests; tests keep apart
    by using their own project id. The last user to leave stops it."""
    return _SHARED.use(tmp_path_factory)


class FakeAdmin:
    """The test's own view of the fake, through the plain client library (blocking)."""

    def __init__(self, host: str, project: str) -> None:
        import grpc
        from google.cloud import pubsub_v1
        from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
        from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

        self.project = project
        self._channels = [grpc.insecure_channel(host), grpc.insecure_channel(host)]
        self.publisher = pubsub_v1.PublisherClient(
            transport=PublisherGrpcTransport(channel=self._channels[0]))
        self.subscriber = pubsub_v1.SubscriberClient(
            transport=SubscriberGrpcTransport(channel=self._channels[1]))

    def topic(self, name: str) -> str:
        return f"projects/{self.project}/topics/{name}"

    def subscription(self, name: str) -> str:
        return f"projects/{self.project}/subscriptions/{name}"

    def create(self, topic: str, subscription: str, **options: Any) -> None:
        self.publisher.create_topic(request={"name": self.topic(topic)}, timeout=5)
        self.subscriber.create_subscription(
            request={"name": self.subscription(subscription), "topic": self.topic(topic),
                     "ack_deadline_seconds": 60, **options}, timeout=5)

    def pull(self, subscription: str, *, at_least: int = 1, timeout: float = 10.0,
             ack: bool = True) -> list[Any]:
        """Received messages until ``at_least`` arrived and one more pull brings nothing."""
        out: list[Any] = []

        def more() -> bool:
            response = self.subscriber.pull(
                request={"subscription": self.subscription(subscription), "max_messages": 100},
                timeout=2)
            batch = list(response.received_messages)
            if batch and ack:
                self.subscriber.acknowledge(request={
                    "subscription": self.subscription(subscription),
                    "ack_ids": [m.ack_id for m in batch]}, timeout=5)
            out.extend(batch)
            return not batch and len(out) >= at_least

        wait_until(more, timeout, f"{at_least} messages on {subscription}")
        return out

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

