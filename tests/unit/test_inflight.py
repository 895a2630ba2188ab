"""The in-flight registry shared by the consuming uplinks."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gateway.queue.inflight import InFlight


@dataclass(frozen=True)
class Rec:
    place: str
    handle: int


def registry() -> InFlight[Rec]:
    return InFlight(lambda r: (r.place, r.handle))


async def test_take_oldest_copy_first_and_only_once() -> None:
    reg = registry()
    first, second = Rec("q", 1), Rec("q", 2)
    reg.track("m", first)
    reg.track("m", second)
    assert ("q", 1) in reg and reg.get(("q", 2)) is second and len(reg) == 2
    assert reg.take("m") is first
    assert reg.take("m") is second
    assert reg.take("m") is None and len(reg) == 0 and ("q", 1) not in reg


async def test_settle_puts_the_record_back_first_when_the_call_raises() -> None:
    reg = registry()
    first, second = Rec("q", 1), Rec("q", 2)
    reg.track("m", first)
    reg.track("m", second)

    async def boom(record: Rec) -> bool:
        raise RuntimeError("backend down")

    with pytest.raises(RuntimeError):
        await reg.settle("m", boom)
    seen: list[Rec] = []

    async def ok(record: Rec) -> bool:
        seen.append(record)
        return True

    assert await reg.settle("m", ok) is True and seen == [first], "the same copy, first again"


async def test_settle_false_leaves_it_untracked_and_unknown_ids_are_false() -> None:
    reg = registry()
    reg.track("m", Rec("q", 1))

    async def stale(record: Rec) -> bool:
        return False

    assert await reg.settle("m", stale) is False
    assert len(reg) == 0
    assert await reg.settle("nobody", stale) is False


async def test_forget_drops_one_place_only() -> None:
    reg = registry()
    reg.track("a", Rec("q1", 1))
    reg.track("b", Rec("q2", 2))
    reg.track("a", Rec("q2", 3))
    assert reg.forget(lambda r: r.place == "q2") == 2
    assert [mid for mid, _ in reg] == ["a"] and len(reg) == 1
    assert reg.untrack("b", Rec("q2", 2)) is False
