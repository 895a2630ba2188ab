"""The forwarder: drains the store into the uplink, batch by batch.

Promises:

- A message leaves the store only when the uplink accepted it (PublishResult.ok), when the
  uplink refused it for good (dead-lettered with the reason), or when it ran out of
  attempts (dead-lettered). An unreachable uplink never costs a message an attempt: the
  batch is released and the forwarder backs off with full jitter, however long the outage.
  After an outage it probes with a batch of one message (the uplink's own publish, so no
  extra permission is needed), so an outage of hours does not hand a whole batch to a
  dead link on every backoff round.
- One batch is on the wire at a time (the next is leased meanwhile, and published only if
  the one before needed no retry), so per-topic order (the store's invariant 3) carries
  through to the uplink. Messages are grouped by destination (``forwarder.routes`` first
  match, else ``queue.request_queue_name``) keeping their order within each group.
- The message id and MQTT topic travel with every message (attributes), identical on every
  retry, so cloud consumers can deduplicate.
- No polling: when nothing is ready the forwarder sleeps until the store says something was
  committed, released, or falls due.
- Stopping honours the promise in any uplink state: a connect or publish still running
  ``STOP_GRACE`` seconds after ``stop()`` is cancelled and its batch released to the store,
  so a dead server never holds the daemon up for its client's timeouts.
- New settings (a reload, gateway/reload.py) are taken between batches: ``configure()``
  stores them, the run loop adopts them before it leases the next batch; a batch in flight
  finishes under the settings it was leased with.
- What the operator reads about the uplink (one line per change of state, defects of the
  uplink's code told apart from outages) is gateway/linkstate.py.
- ``forwarder.linger``: while the forwarder keeps up (its last batch was not full), it waits
  that long after something became ready before it leases, so batches fill; a backlog is
  drained without waiting, and express offers (below) never wait for it.
- Write-avoidance (``ack_when: uplinked_or_stored``, gateway/express.py): the forwarder owns
  its uplink's express lane. It moves the lane CLOSED -> OPENING when a drain left the store
  empty for it, OPENING -> OPEN once the stored-way appends routed to it committed and the
  store is still empty for it, and closes it on any failure, outage, probe or stop. Offers are
  published only while OPEN, one call at a time like leased batches; a stored copy of an
  accepted offer (``lane.preacked``) is settled as delivered without being published.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from gateway.aio import Interrupted, wait_event
from gateway.config import Config, ForwarderConfig
from gateway.errors import ConfigError, QueueError, RetryableError, StoreError, UplinkUnavailable
from gateway.express import Lane, LaneState
from gateway.linkstate import CONNECT_NOTICE, UplinkState, is_programming_error
from gateway.message import QueueMessage
from gateway.queue.interface import MessageQueueInterface, PublishResult
from gateway.store.records import Settlement, StoredMessage, queue_messages
from gateway.store.store import Store
from gateway.topics import topic_matches

log = logging.getLogger("gateway.forwarder")
T = TypeVar("T")

#: the store queue the ingress fills and the forwarder drains
UPLINK_QUEUE = "default"
#: the longest the forwarder sleeps without a wake-up from this process's store
EXTERNAL_WRITE_WAKEUP = 5.0
#: after stop(), how long a connect or publish in flight may still finish
STOP_GRACE = 1.0


def full_jitter(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter (uniform in [0, min(cap, base * 2**attempt)])."""
    return random.uniform(0, min(cap, base * (2 ** min(attempt, 30))))


@dataclass
class ForwarderStats:
    delivered: int = 0
    retried: int = 0
    dead_lettered: int = 0
    batches: int = 0
    #: "connecting", "online", "backing_off", "defective", "stopped"
    state: str = "connecting"
    last_ack_at: float | None = None
    last_error: str = ""
    #: the programming error the uplink's code raised ("TypeError: ..."), '' when none
    defect: str = ""
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    #: of ``delivered``: accepted from memory, before any store write (write-avoidance)
    express: int = 0


class Forwarder:
    """Drains one uplink's cursor. ``queue`` is the uplink's name, the name of its cursor in
    the store (the single ``queue:`` section's uplink is ``default``)."""

    def __init__(self, store: Store, uplink: MessageQueueInterface, config: Config,  # noqa: PLR0917
                 queue: str = UPLINK_QUEUE, stats: ForwarderStats | None = None,
                 lane: Lane | None = None) -> None:
        self.store = store
        self.uplink = uplink
        self.cfg = config.forwarder
        #: settings given by configure(), adopted before the next batch
        self._next_cfg: ForwarderConfig | None = None
        self.default_destination = config.queue.request_queue_name
        self.queue = queue
        #: a forwarder that replaces another (a reload) carries its counters on
        self.stats = stats if stats is not None else ForwarderStats()
        #: replacing one that was down, it probes first and tells the store when online
        was_down = self.stats.state in ("backing_off", "defective")
        self.stats.state, self.stats.defect = "connecting", ""
        #: how logs name the uplink: its type alone for the single uplink, else both
        self.label = (uplink.backend_name if queue == UPLINK_QUEUE
                      else f"{queue} ({uplink.backend_name})")
        self.link = UplinkState(self.label, uplink.target, self.stats)
        self._stopping = asyncio.Event()
        self._failures = 0  # consecutive whole-batch failures, for the backoff
        self._connected = False
        self._ever_connected = False
        #: after an outage the next batch is one message: a dead link is not handed a whole
        #: batch per backoff round
        self._probe = was_down
        self._ahead: asyncio.Task[_Batch] | None = None
        self._settling: asyncio.Future[None] | None = None
        #: the deadline of the uplink call in progress (stop() brings it forward)
        self._bound: asyncio.Timeout | None = None
        #: the last batch reached a lease limit: more may be ready behind it
        self._more = False
        #: the uplink's side of write-avoidance (gateway/express.py); a replacement (a
        #: reload) takes the lane over
        self.lane = lane if lane is not None else Lane(queue)
        self.lane.wake = lambda: store.wake(queue)
        self.lane.wait = self.cfg.ack_wait

    @property
    def ack_when(self) -> str:
        """``forwarder.ack_when``, or the backend's default when unset."""
        if self.cfg.ack_when:
            return self.cfg.ack_when
        return "uplinked_or_stored" if self.uplink.durable_acks else "stored"

    def configure(self, cfg: ForwarderConfig) -> None:
        """New settings, taken before the next batch (the one in flight keeps its own)."""
        self._next_cfg = cfg
        self.store.wake(self.queue)  # an idle forwarder adopts them now

    def _adopt(self) -> None:
        if self._next_cfg is not None:
            self.cfg, self._next_cfg = self._next_cfg, None
            self.lane.wait = self.cfg.ack_wait
            log.info("uplink %s: forwarder settings reloaded", self.label,
                     extra={"uplink": self.label})

    def stop(self) -> None:
        """Finish the batch in flight (a call to the uplink gets STOP_GRACE seconds more),
        then return from ``run``."""
        self._stopping.set()
        self.lane.close()  # what is on offer goes the stored way
        self.store.wake(self.queue)  # an idle wait for messages ends now
        bound = self._bound
        if bound is not None:
            deadline = asyncio.get_running_loop().time() + STOP_GRACE
            when = bound.when()
            if when is None or when > deadline:
                bound.reschedule(deadline)

    async def run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._adopt()
                if not self._connected and not await self._connect():
                    await self._backoff()
                    continue
                try:
                    if self.lane.state is LaneState.OPEN and not self._express_allowed():
                        self.lane.close()  # e.g. a reload set ack_when: stored
                    if self.lane.state is LaneState.OPEN:
                        if self.lane.offers:
                            await self._express()
                            continue
                        # the store holds nothing for an open lane: no lease until something
                        # else than an offer wakes it (a commit, a release, stop) or the
                        # safety net passes
                        await self.store.wait_woken(self.queue, EXTERNAL_WRITE_WAKEUP)
                        if (self.lane.offers or self._stopping.is_set()
                                or self._next_cfg is not None):
                            continue
                    sent = await self.drain_once()
                except UplinkUnavailable as exc:
                    if self._stopping.is_set():
                        break  # the batch was released; nothing to report
                    self._note_unavailable(exc)
                    self._probe = True
                    await self._backoff()
                    continue
                except StoreError as exc:
                    # e.g. a full disk refusing even the lease or the delete: keep running,
                    # unsettled leases expire and the messages are delivered again.
                    await self._store_trouble(exc)
                    continue
                if await self._advance_lane(sent):
                    continue
                if sent == 0 or not self._more:
                    # nothing was left behind the batch when it was leased: what committed
                    # since has set the store's event, so this returns at once for it
                    await self._sleep_until_ready()
                    if self.cfg.linger > 0:
                        # keeping up: let the next batch fill for a while (forwarder.linger)
                        await self._sleep_or_stop(self.cfg.linger)
        finally:
            self.lane.close()
            await self.flush()
            self.stats.state = "stopped"

    async def _connect(self) -> bool:
        self.link.connecting()
        if self._ever_connected:  # start the adapter afresh after it misbehaved
            try:
                await self._unless_stopping(self.uplink.disconnect())
            except (QueueError, TimeoutError, Interrupted) as exc:
                log.debug("disconnect before reconnect failed: %s", exc)
        notice = asyncio.get_running_loop().call_later(CONNECT_NOTICE, self.link.slow_connect,
                                                       CONNECT_NOTICE)
        try:
            await self._unless_stopping(self.uplink.connect())
        except Interrupted:
            return False
        except (QueueError, TimeoutError) as exc:
            self._note_unavailable(exc)
            return False
        except ConfigError:
            raise  # the client refused its settings (a TLS file...): the daemon exits 2
        except Exception as exc:  # the adapter's own bug: reported, never fatal
            self._note_unavailable(_Defect.of(exc, self.uplink.backend_name))
            return False
        finally:
            notice.cancel()
        self._connected = self._ever_connected = True
        self._failures = 0
        self.link.connected()
        return True

    async def _unless_stopping(self, aw: Awaitable[T]) -> T:
        """``aw`` bounded by forwarder.publish_timeout, and abandoned STOP_GRACE seconds
        after stop() (Interrupted). No task of its own: one runs per batch."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.cfg.publish_timeout) as bound:
                self._bound = bound
                if self._stopping.is_set():
                    bound.reschedule(loop.time() + STOP_GRACE)
                return await aw
        except TimeoutError:
            if self._stopping.is_set():
                raise Interrupted(f"interrupted after a {STOP_GRACE:g}s grace") from None
            raise
        finally:
            self._bound = None

    async def _store_trouble(self, exc: StoreError) -> None:
        log.error("store error while forwarding (%s); retrying with backoff", exc,
                  extra={"uplink": self.label})
        self.lane.close()
        if self._ahead is not None:  # its lease, if it got one, expires and is retried
            self._ahead.cancel()
            self._ahead = None
        self._settling = None
        self.stats.last_error = str(exc)
        self._failures += 1
        await self._backoff()

    def _note_unavailable(self, exc: BaseException) -> None:
        if isinstance(exc, _Defect):
            if is_programming_error(exc.cause):
                self.link.defect(exc.cause)
            else:
                self.link.untranslated(exc.cause)
        else:
            self.link.unavailable(exc)
        self.lane.close()
        self._failures += 1
        self.store.uplink_state(self.queue, online=False)

    async def _backoff(self) -> None:
        delay = full_jitter(self._failures, self.cfg.retry_min_delay, self.cfg.retry_max_delay)
        delay = max(delay, self.cfg.retry_min_delay / 2)
        await self._sleep_or_stop(delay)

    async def _sleep_or_stop(self, seconds: float) -> None:
        await wait_event(self._stopping, seconds)

    async def _sleep_until_ready(self) -> None:
        """Until the store has something (stop() wakes it too). The timeout is a safety net
        for writers outside this process (``dlq replay``)."""
        if not self._stopping.is_set():
            await self.store.wait_ready(self.queue, EXTERNAL_WRITE_WAKEUP)

    # -- write-avoidance: the express lane ------------------------------------------------

    def _express_allowed(self) -> bool:
        return (self.ack_when == "uplinked_or_stored" and self._connected and not self._probe
                and not self._failures and not self._stopping.is_set())

    async def _advance_lane(self, sent: int) -> bool:
        """Move the lane on after a drain (module docstring); True = drain again now."""
        lane = self.lane
        if not self._express_allowed():
            lane.close()
            return False
        if lane.state is LaneState.OPEN:
            if sent:  # stored around the lane (a replay, a direct append): it opens afresh
                lane.close()
            return bool(sent)
        if self._more:
            return False
        opening = lane.state is LaneState.OPENING
        if opening and lane.pending_stores:
            self.store.commit_soon()  # stored-way messages first: their commit wakes us
            return False
        if opening and sent:
            return True  # deliver what came, then look again
        if not await self.store.caught_up(self.queue) or not self._express_allowed():
            return False  # e.g. a retry is parked: its topic must wait for it
        if lane.state is LaneState.CLOSED:
            lane.opening()  # offers are held from now on ...
            self.store.commit_soon()  # ... and what was stored before them goes first
            return True
        if lane.pending_stores:  # a stored-way append came in while the store looked
            return False
        lane.open()
        return True

    async def _express(self) -> None:
        """Publish the lane's queued offers (one call per destination); settle their tickets.
        Raises UplinkUnavailable as ``drain_once`` does (the offers go the stored way)."""
        lane = self.lane
        started = time.monotonic()
        offers = lane.take(self.cfg.batch_size)
        accepted: set[int] = set()  # id() of the messages the uplink accepted
        unavailable: UplinkUnavailable | None = None
        for destination, group in self._group([m for o in offers for m in o.messages]):
            if unavailable is not None:
                break
            results = await self._publish(destination, queue_messages(group))
            for msg, result in zip(group, results, strict=True):
                if result.error is None:
                    accepted.add(id(msg))
                elif isinstance(result.error, UplinkUnavailable):
                    unavailable = unavailable or result.error
                self._count_error(result.error)
        failed = False
        for offer in offers:
            took = [i for i, m in zip(offer.indexes, offer.messages, strict=True)
                    if id(m) in accepted]
            failed = failed or len(took) < len(offer.indexes)
            offer.ticket.accept(offer, took)
        if failed:  # what was not accepted goes the stored way, and so does what follows
            lane.close()
            for offer in offers:
                offer.ticket.store_now()
        n = len(accepted)
        self.stats.batches += 1
        if n:
            self.stats.delivered += n
            self.stats.express += n
            self.stats.last_ack_at = time.time()
        if unavailable is not None:
            self._connected = not isinstance(unavailable, _Disconnected)
            raise unavailable
        if not failed:
            self._failures = 0
            self.link.online()
        await self._pace(n, started)

    def destination(self, topic: str) -> str:
        for route in self.cfg.routes:
            if topic_matches(route.topic, topic):
                return route.destination
        return self.default_destination

    async def drain_once(self) -> int:
        """Publish one batch and settle it. Returns how many were delivered.

        Pipelined: while a batch is on the wire the next one is leased, and its settlement
        is written while the following batch is on the wire; the store thread and the
        network overlap. A batch with any retry or release drains the pipeline first, so a
        batch leased ahead never overtakes a message waiting for its retry (per-topic order).
        Raises UplinkUnavailable (after releasing the batch) when the uplink could not be
        reached, so the caller backs off."""
        started = time.monotonic()
        probing = self._probe
        batch = await self._next_batch(1 if probing else self.cfg.batch_size)
        if not batch:
            return 0
        # a probe of one message says nothing of what waits behind it: look again at once
        # (after an outage with no new commit to wake it, it slept EXTERNAL_WRITE_WAKEUP)
        self._more = probing or batch.full(self.cfg.batch_size, self.cfg.max_batch_bytes)
        if not probing and self._more:
            # a full batch: more may be waiting, lease it while this one is on the wire
            self._ahead = asyncio.create_task(self._lease(self.cfg.batch_size),
                                              name="lease-ahead")
        settlement, unavailable = await self._publish_all(batch)
        settlement.delivered.extend(batch.preacked)
        in_order = not settlement.retry and not settlement.release
        if not in_order:
            settlement.release.extend(m.seq for m in (await self._take_ahead()).messages)
        await self._settled()
        self._settling = self.store.submit_settle(settlement)
        if not in_order:
            await self._settled()
        self._account(settlement, len(batch.preacked))
        if unavailable is not None:
            self._connected = not isinstance(unavailable, _Disconnected)
            raise unavailable
        if self._failures or self._probe:
            self.store.uplink_state(self.queue, online=True)
        self._probe = False
        self._failures = 0
        self.link.online()
        await self._pace(len(settlement.delivered), started)
        return len(settlement.delivered)

    async def _next_batch(self, limit: int) -> _Batch:
        if self._ahead is not None:
            return await self._take_ahead()
        return await self._lease(limit)

    async def _lease(self, limit: int) -> _Batch:
        """Lease a batch and convert it for the uplink. Leased ahead, the conversion runs
        while the batch before it waits for the uplink's acknowledgements."""
        leased = await self.store.lease(self.queue, limit, max_bytes=self.cfg.max_batch_bytes)
        preacked = self.lane.preacked
        done: list[int] = []
        send = leased
        if preacked:  # stored copies the uplink accepted from memory: settled, not sent
            send = []
            for m in leased:
                if m.id in preacked:
                    done.append(m.seq)
                else:
                    send.append(m)
        return _Batch(leased, [(dest, group, queue_messages(group))
                               for dest, group in self._group(send)], done)

    async def _take_ahead(self) -> _Batch:
        task, self._ahead = self._ahead, None
        return _EMPTY if task is None else await task

    async def _settled(self) -> None:
        task, self._settling = self._settling, None
        if task is not None:
            await task

    async def flush(self) -> None:
        """Write the last settlement and give back a batch leased ahead."""
        ahead = await self._take_ahead()
        if ahead:
            await self._settled()
            self._settling = self.store.submit_settle(
                Settlement(release=[m.seq for m in ahead.messages], cursor=self.queue))
        await self._settled()

    async def _publish_all(self, batch: _Batch) -> tuple[Settlement, UplinkUnavailable | None]:
        settlement = Settlement(cursor=self.queue)
        unavailable: UplinkUnavailable | None = None
        for destination, group, messages in batch.groups:
            if unavailable is not None:
                settlement.release.extend(m.seq for m in group)
                continue
            results = await self._publish(destination, messages)
            unavailable = self._settle_group(group, results, settlement)
        return settlement, unavailable

    def _group(self, batch: list[StoredMessage]) -> list[tuple[str, list[StoredMessage]]]:
        if not batch:
            return []
        if not self.cfg.routes:
            return [(self.default_destination, batch)]
        groups: dict[str, list[StoredMessage]] = {}
        for msg in batch:
            groups.setdefault(self.destination(msg.topic), []).append(msg)
        return list(groups.items())

    async def _publish(self, destination: str, messages: list[QueueMessage]) -> list[PublishResult]:
        try:
            results = await self._unless_stopping(
                self.uplink.publish_batch(destination, messages))
        except Interrupted:  # stopping: the batch goes back to the store as it is
            error = UplinkUnavailable("the gateway is stopping", backend=self.uplink.backend_name)
            return [PublishResult(m.id, error) for m in messages]
        except TimeoutError:
            error = UplinkUnavailable(f"publish_batch took longer than "
                                      f"forwarder.publish_timeout ({self.cfg.publish_timeout}s)",
                                      backend=self.uplink.backend_name)
            return [PublishResult(m.id, error) for m in messages]
        except QueueError as exc:
            error = exc if isinstance(exc, UplinkUnavailable) else UplinkUnavailable(
                str(exc), backend=self.uplink.backend_name)
            return [PublishResult(m.id, error) for m in messages]
        except Exception as exc:  # an adapter bug must not lose or wedge the batch
            error = _Defect.of(exc, self.uplink.backend_name)  # reported by the run loop
            return [PublishResult(m.id, error) for m in messages]
        if len(results) != len(messages):
            error = _Disconnected(f"publish_batch returned {len(results)} results for "
                                  f"{len(messages)} messages", backend=self.uplink.backend_name)
            return [PublishResult(m.id, error) for m in messages]
        return results

    def _settle_group(self, group: list[StoredMessage], results: list[PublishResult],
                      settlement: Settlement) -> UplinkUnavailable | None:
        if all(r.error is None for r in results):  # the usual case, without a loop per message
            settlement.delivered.extend(m.seq for m in group)
            return None
        unavailable: UplinkUnavailable | None = None
        for msg, result in zip(group, results, strict=True):
            error = result.error
            if error is None:
                settlement.delivered.append(msg.seq)
            elif isinstance(error, UplinkUnavailable):
                settlement.release.append(msg.seq)
                unavailable = unavailable or error
            elif isinstance(error, RetryableError):
                delay = full_jitter(msg.attempts + 1, self.cfg.retry_min_delay,
                                    self.cfg.retry_max_delay)
                settlement.retry.append((msg.seq, delay, str(error)))
            else:
                settlement.dead.append((msg.seq, f"{type(error).__name__}: {error}"))
            self._count_error(error)
        return unavailable

    def _count_error(self, error: QueueError | None) -> None:
        if error is not None:
            kind = type(error).__name__
            self.stats.errors_by_kind[kind] = self.stats.errors_by_kind.get(kind, 0) + 1

    def _account(self, s: Settlement, preacked: int = 0) -> None:
        """Count a settlement; ``preacked`` of its deliveries were counted when the uplink
        accepted them from memory."""
        self.stats.batches += 1
        if len(s.delivered) > preacked:
            self.stats.delivered += len(s.delivered) - preacked
            self.stats.last_ack_at = time.time()
        self.stats.retried += len(s.retry)
        self.stats.dead_lettered += len(s.dead)
        for seq, reason in s.dead:
            log.warning("dead-lettered message seq=%d: %s", seq, reason,
                        extra={"uplink": self.label, "store_seq": seq})

    async def _pace(self, sent: int, started: float) -> None:
        if self.cfg.max_rate > 0 and sent:
            spare = sent / self.cfg.max_rate - (time.monotonic() - started)
            if spare > 0:
                await self._sleep_or_stop(spare)


@dataclass(slots=True)
class _Batch:
    """A leased batch: its messages, and per destination the group and its QueueMessages."""

    messages: list[StoredMessage]
    groups: list[tuple[str, list[StoredMessage], list[QueueMessage]]]
    #: seqs of stored copies the uplink already accepted from memory (write-avoidance)
    preacked: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.messages)

    def full(self, limit: int, max_bytes: int) -> bool:
        """It reached a limit of the lease: more messages may be ready behind it."""
        return len(self.messages) >= limit or (
            max_bytes > 0 and sum(len(m.payload) for m in self.messages) * 2 >= max_bytes)


_EMPTY = _Batch([], [])


class _Disconnected(UplinkUnavailable):
    """The uplink misbehaved; reconnect it before the next batch."""


class _Defect(_Disconnected):
    """The uplink's code raised something outside gateway/errors.py: a programming error
    (a defect, gateway/linkstate.py) or an exception it should have translated. The batch
    is released like an outage's; ``cause`` is what was raised, with its traceback."""

    cause: BaseException

    @classmethod
    def of(cls, exc: BaseException, backend: str) -> _Defect:
        error = cls(f"{type(exc).__name__}: {exc}", backend=backend)
        error.cause = exc
        return error
