"""Settings of ``type: kafka`` (keys as in the seed)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    #: "host:port,host:port" or a list
    kafka_bootstrap_servers: str | list[str] = "localhost:9092"
    kafka_consumer_group: str = "openhqm-workers"
    kafka_topics: list[str] = field(default_factory=list)
