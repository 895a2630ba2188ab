"""The contract suite runs once per backend named in CONTRACT_BACKENDS.

A backend joins by adding its name here and an async fixture ``<name>_backend`` (in
tests/contract/backends.py or a module listed in ``pytest_plugins``) that yields a
connected MessageQueueInterface whose queues are unique to the test.
"""

from __future__ import annotations

import pytest

from gateway.queue.interface import MessageQueueInterface

pytest_plugins = ["tests.contract.backends"]

CONTRACT_BACKENDS = ["sqlite", "redis"]


@pytest.fixture(params=CONTRACT_BACKENDS)
def backend(request: pytest.FixtureRequest) -> MessageQueueInterface:
    instance: MessageQueueInterface = request.getfixturevalue(f"{request.param}_backend")
    return instance
