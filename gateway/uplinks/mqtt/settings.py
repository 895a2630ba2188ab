"""Settings of ``type: mqtt``: the seed's six keys verbatim, plus TLS, the topic template and
delivery tuning. Every key sits flat under ``queue:`` with the ``mqtt_`` prefix, so each has
an override ``OPENHQM_QUEUE__MQTT_<KEY>``. Imports no SDK. docs/uplinks/mqtt.md explains them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from gateway.settings import DURATION, secret


@dataclass(frozen=True, slots=True)
class MqttUplinkSettings:
    mqtt_broker_host: str = "localhost"
    mqtt_broker_port: int = 1883
    mqtt_username: str | None = None
    mqtt_password: str | None = secret(None)
    #: 1 or 2: the cloud broker's PUBACK / PUBCOMP is the uplink's acknowledgement.
    #: 0: fire and forget (accepted once written to the socket; a lost link loses it)
    mqtt_qos: Literal[0, 1, 2] = 1
    #: '' = "openhqm-gateway-<gateway.id>-uplink"
    mqtt_client_id: str = ""
    mqtt_protocol: Literal["5", "3.1.1"] = "5"

    #: TLS on; implied by any of the files below. No CA file = the system's trusted CAs
    mqtt_tls: bool = False
    mqtt_ca_file: str | None = None
    #: client certificate and key (PEM), as AWS IoT Core and Azure IoT Hub (X.509) require
    mqtt_cert_file: str | None = None
    mqtt_key_file: str | None = None
    mqtt_key_password: str | None = secret(None)
    #: skip certificate and host name verification (testing only)
    mqtt_tls_insecure: bool = False

    #: the cloud topic of each message. {queue}: the destination (queue.request_queue_name
    #: or a forwarder route), {topic}: the sensor's MQTT topic (the queue name when the
    #: message did not come from MQTT), {gateway_id}: gateway.id
    mqtt_topic_template: str = "{queue}/{topic}"
    #: publish with the retain flag (the cloud broker keeps the last message per topic)
    mqtt_retain: bool = False
    #: QoS 1/2 messages on the wire without their PUBACK/PUBCOMP yet
    mqtt_max_inflight: int = 200
    mqtt_keepalive: Annotated[float, DURATION] = 30.0
    #: CONNECT to CONNACK, and the longest wait for one acknowledgement
    mqtt_timeout: Annotated[float, DURATION] = 15.0
    #: how long the broker keeps consume()'s session (and the messages queued for it)
    mqtt_session_expiry: Annotated[float, DURATION] = 7 * 86400.0
