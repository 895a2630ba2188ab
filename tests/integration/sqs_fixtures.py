"""SQS fixtures: one moto server and one ElasticMQ server per session (tests/sqs_servers.py),
and ``sqs_env``, which puts dummy AWS credentials into this test's environment."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers import ServerProcess
from tests.sqs_servers import elasticmq_server, moto_sqs_server, started, use_dummy_aws_credentials


@pytest.fixture(scope="session")
def moto_sqs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """moto in server mode on a free loopback port, shared by the session (in-memory)."""
    with started(moto_sqs_server(tmp_path_factory.mktemp("moto-sqs"))) as server:
        yield server


@pytest.fixture(scope="session")
def elasticmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """ElasticMQ with strict SQS limits on a free loopback port, shared by the session.
    Skips locally (fails with CI=true) when java or the jars are missing."""
    with started(elasticmq_server(tmp_path_factory.mktemp("elasticmq"))) as server:
        yield server


@pytest.fixture
def sqs_env(monkeypatch: pytest.MonkeyPatch) -> None:
    use_dummy_aws_credentials(monkeypatch)
