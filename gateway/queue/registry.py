"""``queue.type`` -> backend. An explicit table, not plugin discovery by file scanning; a name
not in the table may be an installed plugin's entry point (group ``openhqm_gateway.queues``).

Each entry names a settings dataclass (imports no SDK) and an implementation class (imports
its SDK when loaded). Config parsing needs only the settings class, so a config for a backend
whose extra is not installed still validates; creating the backend then fails with
BackendNotInstalled naming the extra to install.

Every implementation has ``from_config(config: Config) -> Self``.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.errors import BackendNotInstalled, ConfigError, NotSupportedError

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.queue.interface import MessageQueueInterface


@dataclass(frozen=True, slots=True)
class BackendSpec:
    type_name: str
    settings: str  # "module:Class"
    implementation: str  # "module:Class"
    extra: str | None  # pip extra that brings the SDK
    #: top-level modules (comma-separated) whose absence means "not installed"
    sdk_module: str | None


BACKENDS: dict[str, BackendSpec] = {
    spec.type_name: spec
    for spec in (
        BackendSpec("sqlite", "gateway.store.settings:SqliteQueueSettings",
                    "gateway.store.backend:SqliteQueue", None, None),
        BackendSpec("redis", "gateway.uplinks.redis.settings:RedisSettings",
                    "gateway.uplinks.redis.uplink:RedisStreamsQueue", "redis", "redis"),
        BackendSpec("kafka", "gateway.uplinks.kafka.settings:KafkaSettings",
                    "gateway.uplinks.kafka.uplink:KafkaQueue", "kafka",
                    "confluent_kafka"),
        BackendSpec("sqs", "gateway.uplinks.sqs.settings:SqsSettings",
                    "gateway.uplinks.sqs.uplink:SqsQueue", "sqs", "aioboto3"),
        BackendSpec("azure_eventhubs", "gateway.uplinks.eventhubs.settings:EventHubsSettings",
                    "gateway.uplinks.eventhubs.uplink:EventHubsQueue", "eventhubs", "azure.eventhub"),
        BackendSpec("gcp_pubsub", "gateway.uplinks.pubsub.settings:PubSubSettings",
                    "gateway.uplinks.pubsub.uplink:PubSubQueue", "pubsub", "google.cloud.pubsub_v1"),
        BackendSpec("mqtt", "gateway.uplinks.mqtt.settings:MqttUplinkSettings",
                    "gateway.uplinks.mqtt.uplink:MqttQueue", "mqtt", "aiomqtt"),
        BackendSpec("custom", "gateway.uplinks.custom.settings:CustomSettings",
                    "gateway.uplinks.custom.uplink:CustomQueue", None, None),
    )
}


def _load(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


#: the implementation of every type an installed plugin declares (entry point group
#: ``openhqm_gateway.queues``); built-in names above take precedence over plugins
PLUGIN_IMPLEMENTATION = "gateway.uplinks.custom.uplink:EntryPointQueue"


def spec_for(type_name: str, source: str = "", key: str = "queue") -> BackendSpec:
    spec = BACKENDS.get(type_name)
    if spec is not None:
        return spec
    from gateway.uplinks.custom.loader import plugin_entry_points

    plugins = plugin_entry_points()
    if type_name in plugins:
        return BackendSpec(type_name, "", PLUGIN_IMPLEMENTATION, None, None)
    known = ", ".join(sorted(BACKENDS))
    installed = f"; installed plugins: {', '.join(sorted(plugins))}" if plugins else ""
    raise ConfigError(f"{key}.type", type_name,
                      f"unknown queue type; known types: {known}{installed}", source)


def settings_class(type_name: str, source: str = "", key: str = "queue") -> type[Any]:
    """The settings dataclass of ``type_name``; ``key`` names its section in errors."""
    spec = spec_for(type_name, source, key)
    if not spec.settings:  # a plugin: its constructor's parameters are its keys
        from gateway.uplinks.custom.loader import load_entry_point, options_class

        return options_class(load_entry_point(type_name, source), key, source)
    cls: type[Any] = _load(spec.settings)
    return cls


def create_backend(config: Config) -> MessageQueueInterface:
    """Instantiate the configured uplink. Does no I/O: call ``connect()`` next."""
    spec = spec_for(config.queue.type, config.source)
    for module in (spec.sdk_module or "").split(","):
        if module and importlib.util.find_spec(module.split(".")[0]) is None:
            raise BackendNotInstalled(spec.type_name, spec.extra or spec.type_name, module)
    try:
        cls = _load(spec.implementation)
    except ModuleNotFoundError as exc:
        if exc.name and spec.implementation.startswith(exc.name):
            raise NotSupportedError(spec.type_name, "uplink",
                                    "not implemented in this version of the gateway") from None
        missing = exc.name or "?"
        raise BackendNotInstalled(spec.type_name, spec.extra or spec.type_name, missing) from exc
    backend: MessageQueueInterface = cls.from_config(config)
    return backend
