"""What a consumer handed to its handler and has not settled yet.

A backend's ``consume`` tracks one record per delivery (the backend's handle: a stream
entry, a receipt, an ack id, an offset); ``acknowledge`` and ``reject`` take it by gateway
message id. Invariants:

- A record is findable by message id and by its backend key while it is tracked, and by
  neither once taken: a second ``acknowledge`` of the same id returns False.
- The same message id may be in flight more than once (a redelivery while the first copy is
  still with the handler); ``take`` returns the oldest copy first.
- ``settle`` puts the record back (first in line) when the backend call raised, so the caller
  may try again; a backend call that returns False ("the handle is stale, the message is
  gone from us") leaves it untracked.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable, Iterator
from typing import Generic, TypeVar

R = TypeVar("R")


class InFlight(Generic[R]):
    def __init__(self, key: Callable[[R], Hashable]) -> None:
        self._key = key
        self._by_id: dict[str, list[R]] = {}
        self._by_key: dict[Hashable, R] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._by_key

    def __iter__(self) -> Iterator[tuple[str, R]]:
        for message_id, records in list(self._by_id.items()):
            for record in list(records):
                yield message_id, record

    def get(self, key: Hashable) -> R | None:
        """The record with this backend key, if tracked."""
        return self._by_key.get(key)

    def track(self, message_id: str, record: R, *, first: bool = False) -> None:
        records = self._by_id.setdefault(message_id, [])
        if first:
            records.insert(0, record)
        else:
            records.append(record)
        self._by_key[self._key(record)] = record

    def take(self, message_id: str) -> R | None:
        """Untrack and return the oldest record of this message id."""
        records = self._by_id.get(message_id)
        if not records:
            return None
        record = records[0]
        self.untrack(message_id, record)
        return record

    def untrack(self, message_id: str, record: R) -> bool:
        """False when that record was not tracked (already settled)."""
        records = self._by_id.get(message_id, [])
        if record not in records:
            return False
        records.remove(record)
        if not records:
            del self._by_id[message_id]
        self._by_key.pop(self._key(record), None)
        return True

    def forget(self, where: Callable[[R], bool]) -> int:
        """Untrack every record for which ``where`` is true (its queue went away)."""
        gone = [(mid, r) for mid, r in self if where(r)]
        for message_id, record in gone:
            self.untrack(message_id, record)
        return len(gone)

    def clear(self) -> None:
        self._by_id.clear()
        self._by_key.clear()

    async def settle(self, message_id: str, call: Callable[[R], Awaitable[bool]]) -> bool:
        """Take the record and run the backend ``call`` on it; False when nothing was in
        flight under this id or ``call`` returned False. If ``call`` raises, the record is
        tracked again and the error propagates."""
        record = self.take(message_id)
        if record is None:
            return False
        try:
            return await call(record)
        except BaseException:
            self.track(message_id, record, first=True)  # still ours: the caller may try again
            raise
