"""Shared fixtures: real servers on free loopback ports, a clean environment per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import ServerProcess, mosquitto_server, redis_server, running

#: files that take minutes alone (a debootstrapped arm64 root, images built under qemu): run
#: first, so that with two workers (scripts/test.sh) one of them starts on them while the other
#: takes everything else, instead of the longest file starting last
LONG_FILES = ("test_package.py",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in LONG_FILES)  # stable: order kept otherwise


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OPENHQM_ variable from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("OPENHQM_"):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _reap_gateways() -> Iterator[None]:
    """A test that fails before stopping its daemon does not leave it running."""
    yield
    from tests.gateway_process import reap

    reap()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[ServerProcess]:
    """A mosquitto broker of this test's own (persistence on, unlimited queues)."""
    with running(mosquitto_server(tmp_path / "mosquitto")) as server:
        yield server


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[ServerProcess]:
    """A redis-server of this test's own (AOF on, so restarts keep streams)."""
    with running(redis_server(tmp_path / "redis")) as server:
        yield server
