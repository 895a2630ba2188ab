"""The daemon's lifecycle: one TaskGroup of named tasks around the store.

Tasks: ``ingress`` (MQTT -> store), ``forwarder`` (store -> the uplink; with several
uplinks ``forwarder-NAME``, one each, each with its own cursor, so none waits for another),
``downlink`` (an uplink's backend -> local broker, when its ``downlink.enabled``; with
several uplinks ``downlink-NAME``), ``retention``
(max_age expiry and space reclaim on a timer), ``ready`` (sd_notify READY=1 once
subscribed), ``http`` (metrics, health, status page), ``watchdog`` (systemd pings, when
WatchdogSec= is set).

Shutdown promise: on SIGTERM/SIGINT the ingress stops reading, commits and acknowledges what
it already received, and disconnects; the forwarder finishes its batch in flight, or, when
the uplink cannot take it within a second (a dead server, any backend), releases it to the
store; the uplink gets ``DISCONNECT_TIMEOUT`` seconds to close; the store commits and
closes. With any uplink state that takes about a second. ``STOP_TIMEOUT`` is the backstop
after which remaining tasks are cancelled (nothing acknowledged is lost either way:
unsettled leases are released at the next start). A second signal exits at once with
status 1.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
import time

from gateway.config import Config, UplinkConfig
from gateway.downlink.downlink import Downlink
from gateway.errors import StoreError
from gateway.forwarder import UPLINK_QUEUE, Forwarder
from gateway.ingress import MqttIngress
from gateway.message import ATTR_GATEWAY_ID
from gateway.observability.http import ObservabilityServer, Snapshot, UplinkSnapshot
from gateway.observability.systemd import sd_notify, watchdog_interval
from gateway.queue.interface import MessageQueueInterface
from gateway.queue.registry import create_backend
from gateway.store.db import Destination
from gateway.store.records import AppendOutcome, NewMessage, QueueStats
from gateway.store.store import Store

log = logging.getLogger("gateway.service")

STOP_TIMEOUT = 15.0
#: closing the uplink at shutdown: what it still holds is in the store and is sent again
DISCONNECT_TIMEOUT = 3.0


class Gateway:
    """``uplink`` replaces the (first) configured uplink's backend (tests)."""

    def __init__(self, config: Config, uplink: MessageQueueInterface | None = None) -> None:
        self.config = config
        self.store = Store(config.store_path, config.store,
                           stamp={ATTR_GATEWAY_ID: config.gateway_id})
        self.uplinks: dict[str, MessageQueueInterface] = {}
        self.forwarders: dict[str, Forwarder] = {}
        for u in config.uplinks:
            view = config.uplink_view(u)
            backend = uplink if uplink is not None and not self.uplinks else create_backend(view)
            self.uplinks[u.name] = backend
            self.forwarders[u.name] = Forwarder(self.store, backend, view, queue=u.name)
        first = config.uplinks[0].name
        self.uplink, self.forwarder = self.uplinks[first], self.forwarders[first]
        self.ingress = MqttIngress(config.ingress, config.ingress_client_id, self._sink)
        self.downlinks = {u.name: Downlink(config.uplink_view(u), name=u.name)
                          for u in config.uplinks if u.queue.downlink.enabled}
        self._stop = asyncio.Event()
        self._signals = 0
        self._started_at = time.time()
        self.http = (ObservabilityServer(config.observability, self.snapshot)
                     if config.observability.listen else None)

    async def snapshot(self) -> Snapshot:
        """Counters and backlogs as the HTTP endpoint reports them."""
        stats: dict[str, QueueStats] = {}
        try:
            for name in self.forwarders:
                stats[name] = await self.store.stats(name)
            store_ok = await self.store.ping()
        except (StoreError, sqlite3.Error):
            store_ok = False
        ing = self.ingress
        return Snapshot(
            taken_at=time.time(), started_at=self._started_at,
            ingress_connected=ing.connected, store_ok=store_ok,
            store_messages=self.store.message_count, store_bytes=self.store.message_bytes,
            store_file_bytes=self.store.file_bytes(),
            commits=self.store.commits, commit_seconds_total=self.store.commit_seconds_total,
            uplinks=[self._uplink_snapshot(u, stats.get(u.name)) for u in self.config.uplinks],
            counters={"ingress_received": ing.received, "ingress_acked": ing.acked,
                      "ingress_dead_lettered": ing.dead_lettered, "ingress_dropped": ing.dropped,
                      "ingress_duplicates": ing.duplicates, "ingress_excluded": ing.excluded},
            downlinks=tuple(d.snapshot() for d in self.downlinks.values()))

    def _uplink_snapshot(self, u: UplinkConfig, stats: QueueStats | None) -> UplinkSnapshot:
        fwd = self.forwarders[u.name].stats
        return UplinkSnapshot(
            name=u.name, type=self.uplinks[u.name].backend_name, state=fwd.state,
            depth=stats.depth if stats else 0, in_flight=(stats.in_flight or 0) if stats else 0,
            oldest_age_seconds=stats.oldest_age_seconds if stats else None,
            dead_letter=stats.dead_letter if stats else 0, last_ack_at=fwd.last_ack_at,
            counters={"uplinked": fwd.delivered, "retried": fwd.retried,
                      "dead_lettered": fwd.dead_lettered, "batches": fwd.batches},
            dropped=stats.dropped if stats else {}, defect=fwd.defect)

    async def _watchdog(self, interval: float) -> None:
        """Ping systemd's watchdog from the event loop: a hung loop stops the pings and
        systemd restarts the service."""
        while True:
            sd_notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _sink(self, messages: list[NewMessage]) -> list[AppendOutcome]:
        return await self.store.append(UPLINK_QUEUE, messages)

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        await self.store.open()
        try:
            await self._register_uplinks()
        except BaseException:
            await self.store.close()
            raise
        log.info("store %s open: %d messages buffered", self.store.path,
                 self.store.message_count)
        try:
            async with asyncio.TaskGroup() as tg:
                ingress = tg.create_task(self.ingress.run(), name="ingress")
                several = len(self.forwarders) > 1
                forwarders = [tg.create_task(f.run(), name=f"forwarder-{name}" if several
                                             else "forwarder")
                              for name, f in self.forwarders.items()]
                stoppable = [ingress, *forwarders]
                stoppable += [tg.create_task(d.run(), name=f"downlink-{name}" if several
                                             else "downlink")
                              for name, d in self.downlinks.items()]
                helpers = [tg.create_task(self._retention(), name="retention"),
                           tg.create_task(self._announce_ready(), name="ready")]
                if self.http is not None:
                    helpers.append(tg.create_task(self.http.run(), name="http"))
                watchdog = watchdog_interval()
                if watchdog is not None:
                    helpers.append(tg.create_task(self._watchdog(watchdog), name="watchdog"))
                await self._stop.wait()
                sd_notify("STOPPING=1")
                log.info("stopping: finishing in-flight work")
                for task in helpers:
                    task.cancel()
                await self._drain_and_stop(*stoppable)
        finally:
            await asyncio.gather(*(self._disconnect(name, backend)
                                   for name, backend in self.uplinks.items()))
            await self.store.close()
            log.info("stopped")

    async def _register_uplinks(self) -> None:
        """Each configured uplink is a cursor of the ingress queue; an uplink no longer
        configured loses its cursor (what it had not delivered is counted and logged)."""
        removed = await self.store.register(UPLINK_QUEUE, [
            Destination(u.name, tuple(u.topics), u.forwarder.max_attempts)
            for u in self.config.uplinks])
        for name in removed:
            stats = await self.store.stats(name)
            log.warning("uplink %s is no longer configured: its cursor is removed; %d messages "
                        "it had not delivered are counted as dropped (uplink_removed)", name,
                        stats.dropped.get("uplink_removed", 0))

    @staticmethod
    async def _disconnect(name: str, backend: MessageQueueInterface) -> None:
        try:
            await asyncio.wait_for(backend.disconnect(), DISCONNECT_TIMEOUT)
        except Exception as exc:  # a dead server: what it holds is in the store
            log.debug("closing the uplink %s: %s", name, exc or type(exc).__name__)

    async def _drain_and_stop(self, *tasks: asyncio.Task[None]) -> None:
        for forwarder in self.forwarders.values():
            forwarder.stop()
        for downlink in self.downlinks.values():
            downlink.stop()
        try:
            await asyncio.wait_for(self.ingress.stop(), STOP_TIMEOUT)
        except TimeoutError:
            log.warning("ingress did not stop within %.0fs", STOP_TIMEOUT)
        _, pending = await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
        for task in pending:
            log.warning("task %s did not finish within %.0fs; cancelling it", task.get_name(),
                        STOP_TIMEOUT)
            task.cancel()

    async def _announce_ready(self) -> None:
        await self.ingress.ready.wait()
        sd_notify("READY=1")
        log.info("ready: subscribed and storing")

    async def _retention(self) -> None:
        period = max(1.0, min(60.0, self.config.store.max_age / 10))
        while True:
            try:
                await self.store.expire()
            except StoreError as exc:  # a full disk must not stop the daemon
                log.error("retention pass failed: %s", exc)
            await asyncio.sleep(period)

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second %s: exiting at once", signal.Signals(sig).name)
            os._exit(1)
        log.info("received %s", signal.Signals(sig).name)
        self.request_stop()


async def run_gateway(config: Config) -> None:
    gateway = Gateway(config)
    gateway.install_signal_handlers()
    await gateway.run()
