"""Kafka fixtures: one real broker per session (see tests/kafka_server.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.kafka_server import KafkaBroker, shared_broker


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """A single-node KRaft broker on a free loopback port, shared by the whole session.
    Skips locally (fails with CI=true) when java or the broker jars are missing."""
    with shared_broker(tmp_path_factory) as broker:
        yield broker
