"""The ``downlink:`` section of an uplink: commands and configuration from the cloud to devices.

It sits inside the uplink's own section (``queue.downlink`` today; ``uplinks.<name>.downlink``
once there are several uplinks) and is parsed by ``parse_downlink``, which any uplink section
calls with its own key prefix and its backend's settings class. Off by default. Environment
overrides reach it like any nested key: ``OPENHQM_QUEUE__DOWNLINK__ENABLED=true``.

``downlink_problems`` is the cross-field check (run by ``config.validate``): the topic
template, the loop guard against the ingress subscriptions (a downlink topic the ingress would
take back up is an error naming both keys, unless ``ingress.exclude`` covers it), and a source
that would consume the gateway's own uplink. Imports no SDK.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from gateway.downlink.topics import TopicTemplate, filter_covers
from gateway.errors import ConfigError
from gateway.settings import DURATION, parse_dataclass, parse_fields
from gateway.topics import topic_matches
from gateway.uplinks.mqtt.template import filters_overlap


@dataclass(frozen=True, slots=True)
class DownlinkConfig:
    #: consume commands at this uplink's backend and publish them to the local broker
    enabled: bool = False
    #: what to consume: the stream / topic / queue / hub (Pub/Sub: the topic whose
    #: subscription is read; MQTT: the {queue} of the topic template). '' =
    #: queue.response_queue_name. {gateway_id} is replaced by gateway.id
    source: str = ""
    #: backend keys that differ for the consuming client, e.g. kafka_consumer_group,
    #: redis_consumer_group, gcp_subscription, azure_eventhubs_consumer_group,
    #: mqtt_topic_template. String values may use {gateway_id}
    overrides: dict[str, Any] = field(default_factory=dict)
    #: the local topic, from the command's attributes: "devices/{device}/commands" takes the
    #: attribute "device" (one topic level, no / + #). '' = topic_attribute carries the topic
    topic_template: str = ""
    #: with no topic_template: the attribute carrying the whole local topic
    topic_attribute: str = "mqtt_topic"
    #: topic filters commands may be published to; [] = any topic the loop guard allows
    allowed_topics: list[str] = field(default_factory=list)
    #: deliveries the local broker may refuse (PUBACK reason >= 0x80) before the command
    #: goes to the backend's dead-letter destination with the reason
    max_attempts: int = 5
    #: wait before handing a refused command back to the backend, doubling per attempt
    retry_delay: Annotated[float, DURATION] = 1.0
    retry_max_delay: Annotated[float, DURATION] = 30.0
    #: commands fetched per request to the backend (consume's batch_size)
    batch_size: int = 10
    #: how long one fetch waits for commands (consume's wait_time_seconds)
    poll_wait: Annotated[float, DURATION] = 1.0


def parse_downlink(raw: Any, key: str, source: str, settings_cls: type[Any] | None) -> DownlinkConfig:
    """The section at ``key`` (e.g. "queue.downlink"); ``overrides`` are checked against the
    uplink's settings class and converted to its field types."""
    dl = parse_dataclass(DownlinkConfig, raw, key, source)
    if not dl.overrides:
        return dl
    if settings_cls is None or not dataclasses.is_dataclass(settings_cls):
        raise ConfigError(f"{key}.overrides", dl.overrides,
                          "this uplink has no settings to override", source)
    parsed = parse_fields(settings_cls, dl.overrides, f"{key}.overrides", source,
                          unknown="not a key of this uplink; known keys")
    return dataclasses.replace(dl, overrides=parsed)


def render_source(dl: DownlinkConfig, response_queue_name: str, gateway_id: str) -> str:
    return (dl.source or response_queue_name).replace("{gateway_id}", gateway_id)


def consumer_settings(dl: DownlinkConfig, settings: Any, gateway_id: str) -> Any:
    """The uplink's settings with the downlink's overrides applied ({gateway_id} filled in)."""
    if not dl.overrides:
        return settings
    values = {k: v.replace("{gateway_id}", gateway_id) if isinstance(v, str) else v
              for k, v in dl.overrides.items()}
    return dataclasses.replace(settings, **values)


@dataclass(frozen=True, slots=True)
class IngressView:
    """What the loop guard needs to know about the ingress."""

    subscriptions: list[str]
    exclude: list[str]

    def takes_back(self, topic: str) -> str | None:
        """The subscription that would ingest ``topic`` (None: none, or it is excluded)."""
        if any(topic_matches(ex, topic) for ex in self.exclude):
            return None
        return next((s for s in self.subscriptions if topic_matches(s, topic)), None)


def downlink_problems(dl: DownlinkConfig, key: str, *, ingress: IngressView,
                      uplink_destinations: Iterable[str], source_name: str,
                      source: str) -> list[ConfigError]:
    """Every cross-field problem of an enabled downlink (none when it is off)."""
    if not dl.enabled:
        return []
    found: list[ConfigError] = []

    def problem(sub: str, value: object, reason: str) -> None:
        found.append(ConfigError(f"{key}.{sub}", value, reason, source))

    if dl.max_attempts < 1:
        problem("max_attempts", dl.max_attempts, "must be at least 1")
    if not 1 <= dl.batch_size <= 1000:
        problem("batch_size", dl.batch_size, "must be 1..1000")
    if dl.poll_wait <= 0:
        problem("poll_wait", dl.poll_wait, "must be positive")
    if dl.retry_max_delay < dl.retry_delay:
        problem("retry_max_delay", dl.retry_max_delay, f"must be at least {key}.retry_delay")
    for i, allowed in enumerate(dl.allowed_topics):
        if not _valid_filter(allowed):
            problem(f"allowed_topics[{i}]", allowed, "not a valid MQTT topic filter")
    if source_name in set(uplink_destinations):
        problem("source", dl.source or source_name,
                f"{source_name!r} is where this gateway uplinks to: the downlink would consume "
                "the gateway's own messages. Use the response queue or a queue of commands")
    filters = _command_filters(dl, key, source, problem)
    for sub, command_filter in filters:
        for i, subscription in enumerate(ingress.subscriptions):
            if not filters_overlap(command_filter, subscription):
                continue
            if any(filter_covers(ex, command_filter) for ex in ingress.exclude):
                continue
            problem(sub, dl.topic_template if sub == "topic_template" else command_filter,
                    f"local topics like {command_filter!r} match ingress.subscriptions[{i}].topic "
                    f"{subscription!r}: the ingress would take every command back up and uplink "
                    "it. Publish commands where the ingress does not subscribe, or exclude them "
                    f"from the ingress: ingress.exclude: [{command_filter!r}]")
    return found


def _command_filters(dl: DownlinkConfig, key: str, source: str,
                     problem: Callable[[str, object, str], None]) -> list[tuple[str, str]]:
    """(key, filter) pairs covering every local topic the downlink can publish to."""
    if dl.allowed_topics:
        return [(f"allowed_topics[{i}]", f) for i, f in enumerate(dl.allowed_topics)
                if _valid_filter(f)]
    if dl.topic_template:
        try:
            template = TopicTemplate.parse(dl.topic_template, f"{key}.topic_template", source)
        except ConfigError as exc:
            problem("topic_template", dl.topic_template, exc.reason)
            return []
        return [("topic_template", template.as_filter())]
    if not dl.topic_attribute:
        problem("topic_template", "", f"set {key}.topic_template or {key}.topic_attribute: "
                "commands need a local topic")
    return []  # an attribute carries any topic: each one is checked as it arrives


def _valid_filter(topic: str) -> bool:
    if not topic or "\0" in topic:
        return False
    levels = topic.split("/")
    return all(("#" not in lv or (lv == "#" and i == len(levels) - 1)) and ("+" not in lv or lv == "+")
               for i, lv in enumerate(levels))


def overrides_masked(dl: Mapping[str, Any], settings_cls: type[Any] | None) -> dict[str, Any]:
    """The overrides as ``config check`` prints them: secret fields of the settings as ***."""
    if settings_cls is None or not dataclasses.is_dataclass(settings_cls):
        return dict(dl)
    secret = {f.name for f in dataclasses.fields(settings_cls) if f.metadata.get("secret")}
    return {k: "***" if k in secret and v not in (None, "") else v for k, v in dl.items()}


def mqtt_source_problem(dl: DownlinkConfig, settings: Any, key: str, *, source_name: str,
                        destinations: Iterable[str], gateway_id: str,
                        source: str) -> list[ConfigError]:
    """``type: mqtt``: the cloud topics the downlink subscribes to (the topic template
    rendered for the source) must not include the cloud topics the gateway uplinks to."""
    from gateway.uplinks.mqtt.template import subscription_filter

    template = consumer_settings(dl, settings, gateway_id).mqtt_topic_template
    try:
        commands = subscription_filter(template, source_name, gateway_id)
        uplinked = {d: subscription_filter(template, d, gateway_id) for d in destinations}
    except (ValueError, KeyError, IndexError) as exc:
        return [ConfigError(f"{key}.overrides.mqtt_topic_template", template,
                            f"cannot subscribe to what it renders: {exc}", source)]
    for destination, pattern in uplinked.items():
        if filters_overlap(commands, pattern):
            return [ConfigError(f"{key}.source", source_name,
                                f"the downlink would subscribe to {commands!r} on the cloud "
                                f"broker, which holds what the gateway uplinks to {destination!r} "
                                f"({pattern!r}): it would consume its own messages. Use a "
                                "template with {queue} (queue.mqtt_topic_template, or "
                                f"{key}.overrides.mqtt_topic_template) and a source of its own",
                                source)]
    return []
