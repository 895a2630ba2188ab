"""The cloud topic template, and the guard against the gateway ingesting its own uplink.

``mqtt_topic_template`` renders each message's cloud topic from {queue}, {topic} and
{gateway_id}. When the uplink broker is the ingress broker, a rendered topic that an
ingress subscription matches would come straight back in, be stored and uplinked again,
forever. The uplink refuses to start in that case (ConfigError naming
``queue.mqtt_topic_template``): the template, with {topic} standing for any topic, is
compared with every ingress subscription filter, for every destination the forwarder can
use. Imports no SDK.
"""

from __future__ import annotations

import ipaddress
import socket
import string
from collections.abc import Iterable

from gateway.errors import ConfigError

PLACEHOLDERS = frozenset({"queue", "topic", "gateway_id"})


def check_template(template: str, source: str = "") -> None:
    try:
        names = {name for _, name, _spec, _conv in string.Formatter().parse(template)
                 if name is not None}
    except ValueError as exc:
        raise ConfigError("queue.mqtt_topic_template", template, f"not a template: {exc}",
                          source) from None
    unknown = names - PLACEHOLDERS
    if unknown or "" in names:
        raise ConfigError("queue.mqtt_topic_template", template,
                          f"unknown placeholder(s) {sorted(unknown) or ['{}']}; "
                          "use {queue}, {topic}, {gateway_id}", source)
    if not template or "+" in template or "#" in template:
        raise ConfigError("queue.mqtt_topic_template", template,
                          "must render a topic name (no + or # wildcards)", source)


def render(template: str, queue: str, topic: str, gateway_id: str) -> str:
    return template.format(queue=queue, topic=topic or queue, gateway_id=gateway_id)


def subscription_filter(template: str, queue: str, gateway_id: str) -> str:
    """The filter that receives what ``render`` produces for ``queue``: {topic} -> '#'.

    Only a template whose {topic} is a whole last level has one ({topic} can span levels)."""
    if "{topic}" in template and not template.endswith("/{topic}") and template != "{topic}":
        raise ValueError("{topic} is not the template's last level")
    return template.replace("{topic}", "#").format(queue=queue, gateway_id=gateway_id)


def topic_part(template: str, queue: str, gateway_id: str, cloud_topic: str) -> str | None:
    """The part of ``cloud_topic`` that the template's ``{topic}`` (its last level) matched
    when rendered for ``queue``; None when the template has no such level or the topic
    does not start with the rendered prefix."""
    if template == "{topic}":
        return cloud_topic or None
    if not template.endswith("/{topic}") or template.count("{topic}") != 1:
        return None
    try:
        prefix = template[:-len("{topic}")].format(queue=queue, gateway_id=gateway_id)
    except (KeyError, IndexError, ValueError):
        return None
    rest = cloud_topic[len(prefix):] if cloud_topic.startswith(prefix) else ""
    return rest or None


def filters_overlap(a: str, b: str) -> bool:
    """Can one topic name match both filters? ('+' one level, '#' the rest, incl. none)."""
    left, right = a.split("/"), b.split("/")
    for i in range(max(len(left), len(right))):
        x = left[i] if i < len(left) else None
        y = right[i] if i < len(right) else None
        if x == "#" or y == "#":
            return True
        if x is None or y is None:
            return False
        if x != y and "+" not in (x, y):
            return False
    return True


def _as_pattern(template: str, queue: str, gateway_id: str) -> str:
    """The template as a filter over every topic it can render: {topic} may be anything, so
    it and all after it become '#'."""
    head, sep, _ = template.partition("{topic}")
    prefix = head.format(queue=queue, gateway_id=gateway_id) if "{" in head else head
    return prefix + "#" if sep else template.format(queue=queue, gateway_id=gateway_id)


def _addresses(host: str) -> set[str]:
    try:
        return {str(ipaddress.ip_address(host))}
    except ValueError:
        pass
    if host in ("localhost", ""):
        return {"127.0.0.1", "::1"}
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError:
        return {host}


def same_broker(host_a: str, port_a: int, host_b: str, port_b: int) -> bool:
    if port_a != port_b:
        return False
    a, b = _addresses(host_a), _addresses(host_b)
    loopback = {"127.0.0.1", "::1"}
    return bool(a & b) or (bool(a & loopback) and bool(b & loopback))


def refuse_loops(template: str, destinations: Iterable[str], gateway_id: str,
                 subscriptions: Iterable[str], source: str = "") -> None:
    for queue in destinations:
        pattern = _as_pattern(template, queue, gateway_id)
        for sub in subscriptions:
            if filters_overlap(pattern, sub):
                raise ConfigError(
                    "queue.mqtt_topic_template", template,
                    f"the uplink broker is the ingress broker and cloud topics like {pattern!r} "
                    f"(destination {queue!r}) match the ingress subscription {sub!r}: the gateway "
                    "would ingest its own uplink. Use a topic space the ingress does not "
                    "subscribe to, e.g. 'cloud/{gateway_id}/{topic}'", source)
