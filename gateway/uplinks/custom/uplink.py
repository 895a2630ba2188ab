"""``type: custom`` and entry-point plugins: the registry's way to your own uplink class.

Neither class here is a backend. Their ``from_config`` loads, checks and instantiates the
user's MessageQueueInterface subclass (see gateway/uplinks/custom/loader.py) and returns
that instance, so the forwarder talks to the plugin directly:

- ``CustomQueue``: ``queue.custom_module`` + ``queue.custom_class``, options from
  ``queue.custom_config`` (YAML mapping, or JSON in ``OPENHQM_QUEUE__CUSTOM_CONFIG``).
- ``EntryPointQueue``: ``queue.type`` is the name of an entry point in the group
  ``openhqm_gateway.queues``; the options were already parsed with the config (they are the
  plugin's own flat keys under ``queue:``).

Errors are ConfigErrors naming the key: a missing module or class, a class that is not a
complete MessageQueueInterface, an unknown or missing option, a constructor that refused
its options. The plugin itself must translate its library's exceptions into
gateway.errors (see gateway/queue/custom.py and docs/writing-an-uplink.md).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from gateway.errors import ConfigError
from gateway.queue.interface import MessageQueueInterface
from gateway.uplinks.custom.loader import (
    instantiate,
    load_entry_point,
    load_module_class,
    parse_options,
)
from gateway.uplinks.custom.settings import CustomSettings

if TYPE_CHECKING:
    from gateway.config import Config


class CustomQueue:
    """The registry entry of ``type: custom``."""

    @classmethod
    def from_config(cls, config: Config) -> MessageQueueInterface:
        settings = config.queue.settings
        if not isinstance(settings, CustomSettings):
            raise ConfigError("queue.type", config.queue.type,
                              "type: custom needs the custom settings", config.source)
        queue_class = load_module_class(settings.custom_module, settings.custom_class,
                                        config.source)
        options = parse_options(queue_class, settings.custom_config, "queue.custom_config",
                                config.source)
        return instantiate(queue_class, options, "queue.custom_config", config.source)


class EntryPointQueue:
    """The registry entry of every ``queue.type`` an installed plugin declares."""

    @classmethod
    def from_config(cls, config: Config) -> MessageQueueInterface:
        queue_class = load_entry_point(config.queue.type, config.source)
        options = config.queue.settings
        if getattr(options, "queue_class", None) is not queue_class:
            # parsed by another route (a Config built by hand): check the keys now
            options = parse_options(queue_class, _as_mapping(options), "queue", config.source)
        return instantiate(queue_class, options, "queue", config.source)


def _as_mapping(options: object) -> dict[str, object]:
    if options is None:
        return {}
    if isinstance(options, dict):
        return options
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    raise ConfigError("queue", options, "expected the plugin's options as a mapping")
