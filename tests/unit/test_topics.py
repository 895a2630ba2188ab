from __future__ import annotations

import pytest

from gateway.topics import topic_matches


@pytest.mark.parametrize(("flt", "topic", "expected"), [
    ("a/b", "a/b", True), ("a/+", "a/b", True), ("a/+", "a/b/c", False), ("a/#", "a", True),
    ("a/#", "a/b/c", True), ("#", "x/y", True), ("+/+", "a/b", True), ("+", "$SYS", False),
    ("#", "$SYS/x", False), ("a/+/c", "a//c", True), ("a", "b", False),
])
def test_topic_matches(flt: str, topic: str, expected: bool) -> None:
    assert topic_matches(flt, topic) is expected
