"""Which offset a consumer may commit when messages are settled out of order.

Kafka commits a position per partition: committing N says "everything below N is done".
A message handed to a handler stays outstanding until acknowledged or rejected, so the
committable position of a partition is its lowest outstanding offset, or one past the
highest delivered offset when nothing is outstanding. Pure bookkeeping, no I/O.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field


@dataclass
class PartitionOffsets:
    #: offsets handed out and not yet settled (a heap, with lazy deletion)
    _heap: list[int] = field(default_factory=list)
    _settled: set[int] = field(default_factory=set)
    #: one past the highest offset handed out
    next_offset: int = -1
    #: the last position committed (or -1)
    committed: int = -1

    def delivered(self, offset: int) -> None:
        heapq.heappush(self._heap, offset)
        self.next_offset = max(self.next_offset, offset + 1)

    def settle(self, offset: int) -> None:
        self._settled.add(offset)
        while self._heap and self._heap[0] in self._settled:
            self._settled.discard(heapq.heappop(self._heap))

    def committable(self) -> int | None:
        """The position to commit now, or None when it would not move forward."""
        position = self._heap[0] if self._heap else self.next_offset
        return position if position > self.committed else None

    @property
    def outstanding(self) -> int:
        return len(self._heap) - len(self._settled)
