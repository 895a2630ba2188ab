"""The contract suite runs once per backend named in CONTRACT_BACKENDS.

A backend joins by adding its name here and an async fixture ``<name>_backend`` (in
tests/contract/backends.py or its own module, imported below) that yields a ``ContractTarget``: a connected
MessageQueueInterface whose queues are unique to the test, plus the optional hooks only
the backend can provide (a message it refuses, a view of its dead letters).

The fixtures are imported rather than listed in ``pytest_plugins``: pytest refuses
``pytest_plugins`` in a conftest below the root one when the whole ``tests`` tree is
collected.
"""

from __future__ import annotations

import pytest

from tests.contract.backend_custom import custom_backend
from tests.contract.backend_eventhubs import eventhubs_backend, eventhubs_server
from tests.contract.backend_kafka import kafka_backend, kafka_broker
from tests.contract.backend_mqtt import mqtt_backend
from tests.contract.backend_pubsub import pubsub_backend, pubsub_emulator, pubsub_fake_server
from tests.contract.backend_sqs import elasticmq, moto_sqs, sqs_elasticmq_backend, sqs_moto_backend
from tests.contract.backends import ContractTarget, redis_backend, sqlite_backend

__all__ = ["ContractTarget", "backend", "kafka_backend", "kafka_broker", "redis_backend",
           "sqlite_backend"]
__all__ += ["pubsub_backend", "pubsub_emulator", "pubsub_fake_server"]
__all__ += ["custom_backend"]
__all__ += ["eventhubs_backend", "eventhubs_server"]
__all__ += ["mqtt_backend"]
__all__ += ["elasticmq", "moto_sqs", "sqs_elasticmq_backend", "sqs_moto_backend"]

CONTRACT_BACKENDS = ["sqlite", "redis", "kafka"]
CONTRACT_BACKENDS += ["pubsub"]
CONTRACT_BACKENDS += ["custom"]
CONTRACT_BACKENDS += ["eventhubs"]
CONTRACT_BACKENDS += ["mqtt"]
CONTRACT_BACKENDS += ["sqs_moto", "sqs_elasticmq"]


@pytest.fixture(params=CONTRACT_BACKENDS)
def backend(request: pytest.FixtureRequest) -> ContractTarget:
    target: ContractTarget = request.getfixturevalue(f"{request.param}_backend")
    return target
