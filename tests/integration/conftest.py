"""Fixtures of the integration tests.

Imported rather than listed in ``pytest_plugins``: pytest refuses ``pytest_plugins`` in a
conftest below the root one when the whole ``tests`` tree is collected.
"""

from tests.integration.kafka_fixtures import kafka_broker
from tests.integration.pubsub_fixtures import pubsub_emulator, pubsub_fake_server

__all__ = ["kafka_broker", "pubsub_emulator", "pubsub_fake_server"]
