"""Fixtures of the integration tests.

Imported rather than listed in ``pytest_plugins``: pytest refuses ``pytest_plugins`` in a
conftest below the root one when the whole ``tests`` tree is collected.
"""

from tests.integration.eventhubs_fixtures import eventhubs_server  # noqa: F401 (fixture)
from tests.integration.kafka_fixtures import kafka_broker
from tests.integration.pubsub_fixtures import pubsub_emulator, pubsub_fake_server
from tests.integration.sqs_fixtures import elasticmq, moto_sqs, sqs_env

__all__ = ["kafka_broker", "pubsub_emulator", "pubsub_fake_server"]
__all__ += ["elasticmq", "moto_sqs", "sqs_env"]
