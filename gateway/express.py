"""Write-avoidance: acknowledge a message once it is durable *somewhere* — committed in the
store, or accepted by every uplink it is routed to (``forwarder.ack_when``).

The design and its invariants are in docs/architecture.md ("Write-avoidance"); in short:

- ``Express.sink`` is the ingress's sink. A batch goes *express* only when every message is
  plain (no dead-letter reason, delay, priority), routed to at least one uplink, and every
  uplink it is routed to has its lane OPENING or OPEN. Then each routed lane gets an ``Offer``
  (its share, in arrival order) and a deadline is armed ``store.commit_interval_ms`` ahead.
  Any other batch goes *the stored way*: ``Store.append``, as without write-avoidance.
- **PUBACK only when durable somewhere.** The sink call resolves when every message is
  accepted by all its uplinks (outcome UPLINKED, nothing written), or, for those that are
  not, when the append holding them committed (``Ticket.store_now``: the deadline passed, an
  offer failed or was withdrawn). Nothing else resolves it.
- **Order.** A lane's forwarder publishes offers only while the lane is OPEN; a lane becomes
  OPEN only from OPENING, when no stored-way append routed to it is pending and the store holds
  nothing for its cursor (checked on the store thread after those appends committed); any
  stored-way decision for a lane closes it (CLOSED) and withdraws its queued offers (their
  batches go the stored way too). So nothing goes express while something stored before it
  waits for the same uplink. A batch that goes the stored way takes its place in the commit
  order at once (``Store.enqueue``, synchronously, when the decision is made): a later batch
  of the same topic, perhaps the one whose stored-way decision withdrew it, gets a later seq.
- **No double delivery.** A message stored while its offer is in flight keeps the id it was
  offered under; when that offer is then accepted, the id goes into the lane's ``preacked``
  and the forwarder settles the stored copy as delivered without publishing it.
- **Bounded.** Offers live at most one deadline in a lane's queue (then they are stored and
  withdrawn); ``preacked`` is emptied each time the lane opens (the store held nothing).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from gateway.message import new_message_ids
from gateway.store.appending import full_attributes
from gateway.store.records import AppendOutcome, AppendStatus, NewMessage, StoredMessage
from gateway.store.store import Store
from gateway.topics import topic_matches

log = logging.getLogger("gateway.express")

UPLINKED = AppendOutcome(AppendStatus.UPLINKED)
#: topics whose routes are remembered; the cache is emptied when it holds more
ROUTE_CACHE = 4096


class LaneState(enum.Enum):
    #: messages routed to the uplink go the stored way
    CLOSED = "closed"
    #: new batches are offered and held until what was stored before them is delivered
    OPENING = "opening"
    #: offers are published as they come
    OPEN = "open"


@dataclass(eq=False, slots=True)
class Offer:
    """One batch's messages for one lane: indexes into the ticket's messages, and the
    messages as the uplink takes them."""

    ticket: Ticket
    lane: Lane
    indexes: list[int]
    messages: list[StoredMessage]
    #: the indexes the lane's uplink accepted
    accepted: list[int] = field(default_factory=list)


@dataclass(eq=False)
class Lane:
    """One uplink's side of the express path (owned by its forwarder, fed by ``Express``)."""

    name: str
    #: the MQTT topic filters of the uplink (empty = every topic)
    topics: tuple[str, ...] = ()
    #: the forwarder's "a batch is waiting": wakes its sleep
    wake: Callable[[], None] = lambda: None
    state: LaneState = LaneState.CLOSED
    #: seconds a batch may wait for this uplink before it is stored (0 = Express.deadline)
    wait: float = 0.0
    offers: deque[Offer] = field(default_factory=deque)
    #: ids of stored copies the uplink already accepted from memory
    preacked: set[str] = field(default_factory=set)
    #: stored-way appends routed here that have not committed yet
    pending_stores: int = 0

    def routes(self, topic: str) -> bool:
        return not self.topics or any(topic_matches(f, topic) for f in self.topics)

    @property
    def takes_offers(self) -> bool:
        return self.state is not LaneState.CLOSED

    def opening(self) -> None:
        """The forwarder drained what it saw: offers are taken (held until OPEN)."""
        if self.state is LaneState.CLOSED:
            self.state = LaneState.OPENING

    def open(self) -> None:
        if self.state is LaneState.OPENING:
            self.state = LaneState.OPEN
            self.preacked.clear()  # the store holds nothing for the uplink: no stored copy

    def close(self) -> None:
        """Messages routed here go the stored way from now on; queued offers are withdrawn
        (their batches are stored)."""
        if self.state is LaneState.CLOSED:
            return
        self.state = LaneState.CLOSED
        offers, self.offers = self.offers, deque()
        for offer in offers:
            offer.ticket.store_now()

    def offer(self, offer: Offer) -> None:
        self.offers.append(offer)
        if self.state is LaneState.OPEN:
            self.wake()

    def take(self, limit: int) -> list[Offer]:
        """Queued offers, oldest first, up to ``limit`` messages (the first always)."""
        taken: list[Offer] = []
        n = 0
        while self.offers and (not taken or n + len(self.offers[0].messages) <= limit):
            offer = self.offers.popleft()
            taken.append(offer)
            n += len(offer.messages)
        return taken

    def stored(self) -> None:
        """A message routed here goes the stored way (its append is pending)."""
        self.close()
        self.pending_stores += 1

    def committed(self) -> None:
        self.pending_stores -= 1
        if not self.pending_stores and self.state is LaneState.OPENING:
            self.wake()


class Ticket:
    """One ingress batch on the express path; ``future`` is the sink call's result."""

    def __init__(self, express: Express, messages: list[NewMessage],
                 routes: list[tuple[Lane, ...]], deadline: float) -> None:
        self.express = express
        self.messages = messages
        self.routes = routes
        #: per message: the uplinks that have not accepted it yet
        self.waiting = [len(r) for r in routes]
        self.left = len(messages)
        self.offers: list[Offer] = []
        self.storing = False
        #: the indexes stored (once ``storing``), and whether their append committed
        self._stored_at: frozenset[int] = frozenset()
        self._stored_ok = True
        loop = asyncio.get_running_loop()
        self.future: asyncio.Future[list[AppendOutcome]] = loop.create_future()
        self._timer = loop.call_later(deadline, self.store_now)

    def accept(self, offer: Offer, indexes: Iterable[int]) -> None:
        """``offer``'s uplink accepted these of its messages."""
        done = 0
        waiting = self.waiting
        for i in indexes:
            offer.accepted.append(i)
            waiting[i] -= 1
            if waiting[i] == 0:
                done += 1
        if self.storing:
            self._preack(offer)
            return
        self.left -= done
        if self.left == 0:
            self._timer.cancel()
            self.express.acked_without_write += len(self.messages)
            if not self.future.done():
                self.future.set_result([UPLINKED] * len(self.messages))

    def _preack(self, offer: Offer) -> None:
        """The batch is stored: the stored copies of what ``offer``'s uplink accepted are
        delivered."""
        if self.future.done() and not self._stored_ok:
            return  # the append failed: no stored copy exists, the broker sends them again
        ids = offer.lane.preacked
        for i in offer.accepted:
            if i in self._stored_at:
                ids.add(self.messages[i].id)

    def store_now(self) -> None:
        """Store the messages not yet accepted by all their uplinks; resolve after the
        commit. Idempotent."""
        if self.storing or self.future.done():
            return
        self.storing = True
        self._timer.cancel()
        keep = [i for i, w in enumerate(self.waiting) if w > 0]
        if not keep:  # nothing left to store (every uplink accepted every message)
            self.future.set_result([UPLINKED] * len(self.messages))
            return
        self._stored_at = frozenset(keep)
        # queued for the commit first, in order: closing the lanes below withdraws the
        # batches offered after this one, and they must get later seqs
        try:
            committed = self.express.store.enqueue(self.express.queue,
                                                   [self.messages[i] for i in keep])
        except Exception as exc:  # the store is closed
            committed = asyncio.get_running_loop().create_future()
            committed.set_exception(exc)
        lanes = {lane for r in {self.routes[i] for i in keep} for lane in r}
        for lane in lanes:
            lane.stored()
        for offer in self.offers:
            self._preack(offer)
        self.express.stored_after_offer += len(keep)
        task = asyncio.ensure_future(self._append(committed, keep, lanes))
        self.express.tasks.add(task)
        task.add_done_callback(self.express.tasks.discard)

    async def _append(self, committed: asyncio.Future[list[AppendOutcome]], keep: list[int],
                      lanes: set[Lane]) -> None:
        try:
            outcomes = await committed
        except BaseException as exc:
            self._stored_ok = False
            if not self.future.done():
                self.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            for lane in lanes:
                lane.committed()
        out = [UPLINKED] * len(self.messages)
        for i, outcome in zip(keep, outcomes, strict=True):
            out[i] = outcome
        if not self.future.done():
            self.future.set_result(out)


class Express:
    """The ingress's sink with write-avoidance. ``lanes``: one per uplink, in config order;
    a lane is used only while its forwarder opens it."""

    def __init__(self, store: Store, queue: str, lanes: Sequence[Lane], deadline: float,
                 stamp: dict[str, str] | None = None) -> None:
        self.store = store
        self.queue = queue
        self.lanes = list(lanes)
        #: seconds an offered batch may wait for its uplinks before it is stored, unless
        #: its lanes say otherwise (``forwarder.ack_wait``)
        self.deadline = deadline
        self.stamp = stamp or {}
        self._routes: dict[str, tuple[Lane, ...]] = {}
        self.tasks: set[asyncio.Future[None]] = set()
        #: messages acknowledged to the broker without a store write
        self.acked_without_write = 0
        #: messages offered to an uplink and then stored (deadline, failure, lane closed)
        self.stored_after_offer = 0
        #: payload bytes of every message the ingress handed over
        self.payload_bytes = 0

    def routes(self, topic: str) -> tuple[Lane, ...]:
        found = self._routes.get(topic)
        if found is None:
            if len(self._routes) >= ROUTE_CACHE:
                self._routes.clear()
            found = self._routes[topic] = tuple(lane for lane in self.lanes if lane.routes(topic))
        return found

    async def sink(self, messages: list[NewMessage]) -> list[AppendOutcome]:
        if not messages:
            return []
        self.payload_bytes += sum(len(m.payload) for m in messages)
        routes = [self.routes(m.topic) for m in messages]
        if self._express(messages, routes):
            return await self._offer(messages, routes)
        lanes = {lane for r in set(routes) for lane in r}  # routes are cached: few distinct
        for lane in lanes:
            lane.stored()
        try:
            return await self.store.append(self.queue, messages)
        finally:
            for lane in lanes:
                lane.committed()

    @staticmethod
    def _express(messages: list[NewMessage], routes: list[tuple[Lane, ...]]) -> bool:
        if any(m.dead_letter_reason is not None or m.delay_seconds > 0 or m.priority
               for m in messages):
            return False
        return all(r and all(lane.takes_offers for lane in r) for r in set(routes))

    async def _offer(self, messages: list[NewMessage],
                     routes: list[tuple[Lane, ...]]) -> list[AppendOutcome]:
        ids = new_message_ids(len(messages), messages[0].received_at)
        shares: dict[Lane, tuple[list[int], list[StoredMessage]]] = {}
        stamp = self.stamp
        for i, (m, r) in enumerate(zip(messages, routes, strict=True)):
            m.id = ids[i]
            qm = StoredMessage.detached(0, self.queue, m.topic, m.payload, m.received_at,
                                        order=0, priority=0, attempts=0, msg_id=m.id,
                                        attributes=full_attributes(m), stamp=stamp)
            for lane in r:
                share = shares.get(lane)
                if share is None:
                    share = shares[lane] = ([], [])
                share[0].append(i)
                share[1].append(qm)
        wait = max(lane.wait for lane in shares) or self.deadline
        ticket = Ticket(self, messages, routes, wait)
        for lane, (indexes, qms) in shares.items():
            offer = Offer(ticket, lane, indexes, qms)
            ticket.offers.append(offer)
            lane.offer(offer)
        return await ticket.future

    async def close(self) -> None:
        """Store what is still on offer (stopping) and wait for those appends."""
        for lane in self.lanes:
            lane.close()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
