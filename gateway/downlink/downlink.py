"""The downlink: commands consumed at an uplink's backend, published to the local broker, at
least once.

A second instance of the uplink's backend class (``consuming_backend``: the same settings
plus ``downlink.overrides``; the forwarder's publishing client is never touched) runs the
seed's ``consume`` on the downlink's source; ``LocalPublisher`` publishes each command to the
local broker at QoS 1. One command at a time, in the order the backend hands them out, so
the backend's order per key (stream, partition, FIFO group, ordering key, session) is the
order on the local topic.

Promises:

- **Acknowledged only after the PUBACK.** A command is acknowledged at the backend only after
  the local broker's PUBACK accepted it. Until then it stays in flight at the backend, so a
  crash, a restart or a broker outage redelivers it: at least once, never lost.
- **A local broker outage is not the command's fault.** While the broker is unreachable the
  downlink holds the command it has and takes no more; once the broker is back it publishes
  it again (``republished`` counts these: the broker may have had the first copy). A
  connection that is lost ``LOSSES_PER_ATTEMPT`` times in a row while publishing the same
  command (a broker that drops the connection instead of refusing it) counts one attempt.
- **Refusals.** A PUBACK with a failure reason rejects the command with requeue after
  ``retry_delay`` (doubling per attempt, at most ``retry_max_delay``); after
  ``max_attempts`` attempts (the backend's retry count + 1), or at once for a refusal that
  cannot change (topic name or payload format invalid, a command larger than the broker
  takes), it goes to the backend's dead-letter destination with the reason. So does a command
  that can never be delivered (no local topic, one the loop guard refuses, an unreadable
  expiry: gateway/downlink/command.py).
- **Expiry.** A command whose ``expires_at`` leaves less than a second is acknowledged at the
  backend, not delivered, and counted in ``expired`` — also when it expires while waiting
  for the local broker. Otherwise its remaining lifetime is its MQTT 5 message expiry.
- **Stopping.** The command being published gets ``STOP_GRACE`` seconds to be acknowledged
  by the broker and settled at the backend; a command still waiting (for the broker, a
  retry delay) is left unsettled and the backend delivers it again after the restart.
- One log line per change of the backend's or the broker's state; each dead letter is a
  WARNING with its reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn

from gateway.aio import CANCEL_WAIT, Interrupted, unless_set, wait_event
from gateway.config import Config
from gateway.downlink.command import Command, CommandRules
from gateway.downlink.publisher import CommandTooLarge, LocalBrokerUnavailable, LocalPublisher
from gateway.downlink.settings import IngressView, consumer_settings, render_source
from gateway.downlink.topics import Undeliverable
from gateway.errors import ConfigError, NotSupportedError, QueueError, RetryableError
from gateway.linkstate import is_programming_error
from gateway.message import QueueMessage
from gateway.queue.interface import MessageQueueInterface
from gateway.queue.registry import create_backend

log = logging.getLogger("gateway.downlink")

#: after stop(), how long the command being published may still finish
STOP_GRACE = 1.0
#: one connect, acknowledge or reject call at the backend
BACKEND_CALL_TIMEOUT = 30.0
DISCONNECT_TIMEOUT = 3.0
#: connections lost in a row while publishing one command that count as one failed attempt
LOSSES_PER_ATTEMPT = 3
_BACKOFF = (0.2, 10.0)

#: PUBACK reason codes (MQTT 5) and what they mean
REASONS = {0x80: "unspecified error", 0x83: "implementation specific error",
           0x87: "not authorized", 0x90: "topic name invalid", 0x91: "packet identifier in use",
           0x97: "quota exceeded", 0x99: "payload format invalid"}
#: refusals that the same command will get again, however often it is retried
PERMANENT = frozenset({0x90, 0x99})


@dataclass
class DownlinkStats:
    """What /metrics and the status page report about one uplink's downlink."""

    uplink: str
    type: str
    source: str
    #: starting | online | local_broker_down | backend_unavailable | failed | stopped
    state: str = "starting"
    received: int = 0
    delivered: int = 0
    expired: int = 0
    dead_lettered: int = 0
    #: refused by the local broker and handed back to the backend for another attempt
    retried: int = 0
    #: the backend said it delivered the command before (retry count > 0): a possible duplicate
    redelivered: int = 0
    #: published again after the connection was lost before its PUBACK: a possible duplicate
    republished: int = 0
    #: acknowledge/reject calls the backend refused: it delivers those commands again
    settle_failures: int = 0
    last_delivered_at: float | None = None
    last_error: str = ""


def consuming_backend(config: Config) -> MessageQueueInterface:
    """A second instance of the uplink's backend class for consuming: the uplink's settings
    with ``downlink.overrides``; an MQTT uplink's client id gets ``-downlink`` (two clients
    with one id would take turns throwing each other off the broker)."""
    dl, queue = config.queue.downlink, config.queue
    settings = consumer_settings(dl, queue.settings, config.gateway_id)
    if queue.type == "mqtt" and "mqtt_client_id" not in dl.overrides:
        base = (settings.mqtt_client_id
                or f"openhqm-gateway-{config.gateway_id}{config.client_suffix}")
        settings = dataclasses.replace(settings, mqtt_client_id=f"{base}-downlink")
    return create_backend(dataclasses.replace(config, queue=dataclasses.replace(
        queue, settings=settings)))


class Downlink:
    def __init__(self, config: Config, backend: MessageQueueInterface | None = None,
                 name: str = "default") -> None:
        dl = config.queue.downlink
        self.cfg = dl
        self.source = render_source(dl, config.queue.response_queue_name, config.gateway_id)
        self.backend = backend if backend is not None else consuming_backend(config)
        self.publisher = LocalPublisher(config.ingress,
                                        f"{config.ingress_client_id}-downlink{config.client_suffix}")
        ingress = IngressView([s.topic for s in config.ingress.subscriptions],
                              list(config.ingress.exclude))
        self.rules = CommandRules(dl, ingress)
        self.stats = DownlinkStats(name, self.backend.backend_name, self.source)
        self._stopping = asyncio.Event()
        self._busy = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._backend_up = False
        self._down_since: float | None = None
        self._defects: set[str] = set()

    @property
    def _where(self) -> str:
        target = self.backend.target
        return f"{self.backend.backend_name} {self.source!r}" + (f" ({target})" if target else "")

    def snapshot(self) -> DownlinkStats:
        stats = dataclasses.replace(self.stats)
        if stats.state not in ("failed", "stopped", "starting"):
            stats.state = ("local_broker_down" if not self.publisher.connected.is_set()
                           else "online" if self._backend_up else "backend_unavailable")
        return stats

    def stop(self) -> None:
        self._stopping.set()
        self.publisher.stop()

    # -- lifecycle ----------------------------------------------------------------------

    async def run(self) -> None:
        """Until ``stop()``: keep the local broker connection and consume the source."""
        log.info("downlink: consuming %s into the local broker", self._where)
        publisher = asyncio.create_task(self.publisher.run(), name="downlink-publisher")
        publisher.add_done_callback(self._publisher_ended)
        try:
            await self._consume_forever()
        finally:
            self.publisher.stop()
            await asyncio.wait({publisher}, timeout=DISCONNECT_TIMEOUT)
            publisher.cancel()
            if self.stats.state != "failed":
                self.stats.state = "stopped"
            try:
                await asyncio.wait_for(self.backend.disconnect(), DISCONNECT_TIMEOUT)
            except Exception as exc:  # what it held is redelivered by the backend
                log.debug("downlink: closing the backend: %s", exc or type(exc).__name__)

    def _publisher_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._fail(task.exception() or RuntimeError("the local publisher ended"))
            self._stopping.set()  # nothing can be delivered: stop consuming

    async def _consume_forever(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                if not self._backend_up:
                    await self._call(self.backend.connect())
                    self._backend_is_up()
                await self._consume_until_stopped()
                return
            except Interrupted:
                return
            except (NotSupportedError, ConfigError) as exc:
                self._fail(exc)
                return
            except (QueueError, TimeoutError) as exc:
                self._backend_is_down(exc)
            except Exception as exc:  # the backend's (a custom handler's?) own bug
                self._defect(exc)
            failures += 1
            await self._reset_backend()
            await wait_event(self._stopping, random.uniform(
                _BACKOFF[0], min(_BACKOFF[1], _BACKOFF[0] * 2 ** min(failures, 10))))

    async def _consume_until_stopped(self) -> None:
        consume = asyncio.ensure_future(self.backend.consume(
            self.source, self._handle, self.cfg.batch_size, self.cfg.poll_wait))
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({consume, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not consume.done():  # stopping: the command being published may finish first
            await wait_event(self._idle, STOP_GRACE)
            consume.cancel()
            await asyncio.wait({consume}, timeout=CANCEL_WAIT)
            return
        consume.result()  # consume returned or raised by itself: the caller reconnects
        raise QueueError(f"consume of {self.source} ended", backend=self.backend.backend_name)

    async def _call(self, aw: Awaitable[None]) -> None:
        await unless_set(asyncio.wait_for(aw, BACKEND_CALL_TIMEOUT), self._stopping, STOP_GRACE)

    async def _reset_backend(self) -> None:
        self._backend_up = False
        try:
            await asyncio.wait_for(self.backend.disconnect(), DISCONNECT_TIMEOUT)
        except Exception as exc:  # reconnecting starts afresh either way
            log.debug("downlink: disconnect before reconnect: %s", exc or type(exc).__name__)

    # -- state and log lines ------------------------------------------------------------

    def _backend_is_up(self) -> None:
        self._backend_up = True
        if self._down_since is not None:
            log.warning("downlink: %s back after %.1fs", self._where,
                        time.monotonic() - self._down_since)
            self._down_since = None
        self.stats.state = "online"

    def _backend_is_down(self, exc: BaseException) -> None:
        text = str(exc) or type(exc).__name__
        self.stats.last_error = text
        self.stats.state = "backend_unavailable"
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("downlink: %s unavailable: %s; commands wait there", self._where, text)
        else:
            log.debug("downlink: %s still unavailable: %s", self._where, text)

    def _defect(self, exc: BaseException) -> None:
        text = f"{type(exc).__name__}: {exc}"
        self._backend_is_down(exc)
        if text not in self._defects:
            self._defects.add(text)
            kind = "a defect" if is_programming_error(exc) else "an untranslated error"
            log.error("downlink: %s raised %s (%s); retrying with backoff", self._where, kind,
                      text, exc_info=exc)

    def _fail(self, exc: BaseException) -> None:
        self.stats.state = "failed"
        self.stats.last_error = str(exc)
        log.error("downlink: cannot consume %s: %s. The uplink keeps working; fix the "
                  "downlink's configuration and restart", self._where, exc)

    # -- one command ----------------------------------------------------------------------

    async def _handle(self, msg: QueueMessage) -> None:
        if self._stopping.is_set():
            await self._abandon()
        self._busy = True
        self._idle.clear()
        try:
            await self._deliver(msg)
        finally:
            self._busy = False
            self._idle.set()

    async def _abandon(self) -> NoReturn:
        """Leave the command unsettled (the backend delivers it again) until consume is
        cancelled; the stop does not wait for it."""
        self._busy = False
        self._idle.set()
        await asyncio.get_running_loop().create_future()
        raise AssertionError("unreachable")  # the future never completes

    async def _deliver(self, msg: QueueMessage) -> None:
        st = self.stats
        st.received += 1
        if msg.retry_count > 0:
            st.redelivered += 1
        try:
            command = self.rules.build(msg)
        except Undeliverable as exc:
            await self._dead_letter(msg, exc.reason)
            return
        losses = 0
        while True:
            if not await self._wait_for_broker(command):
                await self._expire(msg)
                return
            now = time.time()
            remaining = command.remaining(now)
            if remaining is not None and remaining < 1:
                await self._expire(msg)
                return
            if losses:
                st.republished += 1  # the broker may have the copy that lost its PUBACK
            try:
                code = await self.publisher.publish(command.topic, command.payload,
                                                    retain=command.retain,
                                                    properties=command.properties(now))
            except CommandTooLarge as exc:
                await self._dead_letter(msg, str(exc))
                return
            except LocalBrokerUnavailable as exc:
                if not exc.sent:
                    continue  # it never left: wait for the connection and send it
                losses += 1
                if losses >= LOSSES_PER_ATTEMPT:
                    await self._refused(msg, None, f"the local broker dropped the connection "
                                        f"{losses} times while taking it ({exc})")
                    return
                continue
            break
        if code >= 0x80:
            await self._refused(msg, code, f"the local broker refused it: "
                                f"{REASONS.get(code, 'error')} (0x{code:02x})")
            return
        st.delivered += 1
        st.last_delivered_at = time.time()
        await self._settle(msg, "acknowledge", lambda: self.backend.acknowledge(msg.id))

    async def _wait_for_broker(self, command: Command) -> bool:
        """True once the local broker is connected; False when the command expired first.
        Stopping meanwhile leaves the command unsettled."""
        connected = self.publisher.connected
        if connected.is_set():
            return True
        timeout = None if command.deadline is None else max(0.0, command.deadline - 1 - time.time())
        waiters = {asyncio.ensure_future(connected.wait()),
                   asyncio.ensure_future(self._stopping.wait())}
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if self._stopping.is_set():
            await self._abandon()
        return connected.is_set()

    async def _refused(self, msg: QueueMessage, code: int | None, text: str) -> None:
        attempt = msg.retry_count + 1
        if code in PERMANENT:
            await self._dead_letter(msg, text)
            return
        if attempt >= self.cfg.max_attempts:
            await self._dead_letter(msg, f"gave up after {attempt} attempts: {text}")
            return
        self.stats.retried += 1
        self.stats.last_error = text
        log.info("downlink: command %s for later (attempt %d of %d): %s", msg.id, attempt,
                 self.cfg.max_attempts, text)
        delay = min(self.cfg.retry_max_delay, self.cfg.retry_delay * 2 ** (attempt - 1))
        if await wait_event(self._stopping, delay):
            await self._abandon()
        await self._settle(msg, "requeue", lambda: self.backend.reject(msg.id, True, text))

    async def _dead_letter(self, msg: QueueMessage, reason: str) -> None:
        self.stats.dead_lettered += 1
        self.stats.last_error = reason
        log.warning("downlink: command %s to the dead-letter destination: %s", msg.id, reason,
                    extra={"message_id": msg.id})
        await self._settle(msg, "dead-letter", lambda: self.backend.reject(msg.id, False, reason))

    async def _expire(self, msg: QueueMessage) -> None:
        self.stats.expired += 1
        log.debug("downlink: command %s expired; dropped", msg.id)
        await self._settle(msg, "acknowledge", lambda: self.backend.acknowledge(msg.id))

    async def _settle(self, msg: QueueMessage, what: str,
                      call: Callable[[], Awaitable[bool]]) -> None:
        """Settle at the backend, retrying while it is unreachable: an unsettled command
        holds back a Kafka or Event Hubs commit and comes back as a duplicate."""
        delay = _BACKOFF[0]
        while True:
            try:
                if await asyncio.wait_for(call(), BACKEND_CALL_TIMEOUT):
                    return
                reason = "it was no longer in flight here"
            except (RetryableError, TimeoutError) as exc:
                if not self._stopping.is_set():
                    log.debug("downlink: %s of %s failed (%s); retrying", what, msg.id, exc)
                    await wait_event(self._stopping, delay)
                    delay = min(delay * 2, _BACKOFF[1])
                    continue
                reason = str(exc) or type(exc).__name__
            except QueueError as exc:
                reason = str(exc)
            self.stats.settle_failures += 1
            log.warning("downlink: %s of command %s failed: %s; the backend will deliver it "
                        "again", what, msg.id, reason)
            return
