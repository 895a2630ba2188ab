"""Pub/Sub fixtures: one Google Pub/Sub fake per session (see tests/pubsub_server.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pubsub_server import PubSubFake, shared_fake


@pytest.fixture(scope="session")
def pubsub_fake_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PubSubFake]:
    """pstest on a free loopback port, shared by the whole session. Skips locally (fails
    with CI=true) when scripts/provision/pubsub.sh has not built it."""
    with shared_fake(tmp_path_factory) as fake:
        yield fake


@pytest.fixture
def pubsub_emulator(pubsub_fake_server: PubSubFake,
                    monkeypatch: pytest.MonkeyPatch) -> PubSubFake:
    """The session's fake, named to this test's clients by PUBSUB_EMULATOR_HOST (the way
    Google's client libraries find an emulator)."""
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub_fake_server.host)
    return pubsub_fake_server
