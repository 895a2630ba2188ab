"""Settings of ``type: mqtt`` (keys as in the seed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gateway.settings import secret


@dataclass(frozen=True, slots=True)
class MqttUplinkSettings:
    mqtt_broker_host: str = "localhost"
    mqtt_broker_port: int = 1883
    mqtt_username: str | None = None
    mqtt_password: str | None = secret(None)
    mqtt_qos: Literal[0, 1, 2] = 1
    mqtt_client_id: str = ""
