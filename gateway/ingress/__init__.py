"""MQTT ingress: subscribe to the local broker, acknowledge only after the store committed."""

from gateway.ingress.codec import ProtocolError
from gateway.ingress.mqtt import MqttIngress

__all__ = ["MqttIngress", "ProtocolError"]
