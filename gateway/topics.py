"""MQTT topic filter matching (``+`` one level, ``#`` the rest), as in MQTT 3.1.1 §4.7."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=4096)
def _split(text: str) -> tuple[str, ...]:
    return tuple(text.split("/"))


def topic_matches(topic_filter: str, topic: str) -> bool:
    f, t = _split(topic_filter), _split(topic)
    if topic.startswith("$") and f[0] in ("+", "#"):
        return False  # wildcards at the first level never match $SYS-style topics
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t):
            return False
        if level != "+" and level != t[i]:
            return False
    return len(f) == len(t)
