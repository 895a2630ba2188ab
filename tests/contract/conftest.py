"""The contract suite runs once per backend named in CONTRACT_BACKENDS.

A backend joins by adding its name here and an async fixture ``<name>_backend`` (in
tests/contract/backends.py or a module listed in ``pytest_plugins``) that yields a
``ContractTarget``: a connected MessageQueueInterface whose queues are unique to the test,
plus the optional hooks that only the backend knows how to provide (a message it refuses,
a view of its dead letters).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # imported by pytest_plugins; importing it here would defeat assert rewriting
    from tests.contract.backends import ContractTarget

pytest_plugins = ["tests.contract.backends", "tests.contract.backend_kafka"]

CONTRACT_BACKENDS = ["sqlite", "redis", "kafka"]


@pytest.fixture(params=CONTRACT_BACKENDS)
def backend(request: pytest.FixtureRequest) -> ContractTarget:
    target: ContractTarget = request.getfixturevalue(f"{request.param}_backend")
    return target
