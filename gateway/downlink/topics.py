"""Where a downlink command goes on the local broker, and which topics the loop guard allows.

``TopicTemplate`` renders a local topic from a command's attributes:
``devices/{device}/commands`` takes the attribute ``device``. A placeholder fills part of one
topic level and its value may not contain ``/``, ``+``, ``#`` or NUL (nor be empty): a cloud
application can choose *which* device, never another part of the topic tree. That is also
what makes the loop guard sound: every topic the template can render matches
``as_filter()`` (each level with a placeholder becomes ``+``), so comparing that filter with
the ingress subscriptions at start covers every command.

Not ``str.format``: a template from config must not reach attributes of Python objects.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.errors import ConfigError

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_NAME = re.compile(r"[A-Za-z0-9_.:-]+")
_FORBIDDEN_IN_VALUE = ("/", "+", "#", "\0")


class Undeliverable(Exception):
    """This command can never go to the local broker; ``reason`` says why (it is dead-lettered)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class TopicTemplate:
    template: str
    #: literal text (str) and attribute names (one-element tuples), in order
    parts: tuple[str | tuple[str], ...]

    @classmethod
    def parse(cls, template: str, key: str, source: str = "") -> TopicTemplate:
        parts: list[str | tuple[str]] = []
        pos = 0
        for match in _PLACEHOLDER.finditer(template):
            if match.start() > pos:
                parts.append(template[pos:match.start()])
            name = match.group(1)
            if not _NAME.fullmatch(name):
                raise ConfigError(key, template, f"placeholder {{{name}}} must name an attribute "
                                  "(letters, digits, _ . : -)", source)
            parts.append((name,))
            pos = match.end()
        rest = template[pos:]
        if "{" in rest or "}" in rest or any("{" in p or "}" in p for p in parts
                                             if isinstance(p, str)):
            raise ConfigError(key, template, "unbalanced '{' or '}'", source)
        if rest:
            parts.append(rest)
        literal = "".join(p for p in parts if isinstance(p, str))
        if "+" in literal or "#" in literal or "\0" in literal:
            raise ConfigError(key, template, "a topic name has no + or # wildcards", source)
        if not parts or template.startswith("$"):
            raise ConfigError(key, template, "must render a topic name (not empty, not $...)",
                              source)
        return cls(template, tuple(parts))

    @property
    def attributes(self) -> list[str]:
        return [p[0] for p in self.parts if isinstance(p, tuple)]

    def render(self, attributes: Mapping[str, str]) -> str:
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            value = attributes.get(part[0])
            if not value:
                raise Undeliverable(f"attribute {part[0]!r} (for the topic template "
                                   f"{self.template!r}) is missing or empty")
            if any(c in value for c in _FORBIDDEN_IN_VALUE):
                raise Undeliverable(f"attribute {part[0]!r} = {value!r} may not contain / + # "
                                   "or NUL: it fills one level of the topic template")
            out.append(value)
        return "".join(out)

    def as_filter(self) -> str:
        """A filter matching every topic this template can render."""
        # a placeholder stands for one or more characters within its level
        rendered = "".join(p if isinstance(p, str) else "\0" for p in self.parts)
        return "/".join("+" if "\0" in level else level for level in rendered.split("/"))


def topic_name_problem(topic: str) -> str | None:
    """Why ``topic`` cannot be published to, or None."""
    if not topic:
        return "the local topic is empty"
    if "+" in topic or "#" in topic or "\0" in topic:
        return f"the local topic {topic!r} contains a wildcard or NUL"
    if topic.startswith("$"):
        return f"the local topic {topic!r} starts with '$' (reserved for the broker)"
    if len(topic.encode("utf-8")) > 65535:
        return "the local topic is longer than MQTT allows"
    return None


def filter_covers(outer: str, inner: str) -> bool:
    """Does every topic that ``inner`` matches also match ``outer``?"""
    a, b = outer.split("/"), inner.split("/")
    for i, level in enumerate(a):
        if level == "#":
            return True
        if i >= len(b) or b[i] == "#":
            return False
        if level == "+":
            continue
        if b[i] != level:  # '+' in inner is wider than a literal
            return False
    return len(a) == len(b)
