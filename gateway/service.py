"""The daemon's lifecycle: one TaskGroup of named tasks around the store.

Tasks: ``ingress`` (MQTT -> store), ``forwarder`` (store -> the uplink; with several
uplinks ``forwarder-NAME``, one each, each with its own cursor, so none waits for another),
``downlink`` (an uplink's backend -> local broker, when its ``downlink.enabled``; with
several uplinks ``downlink-NAME``), ``retention``
(max_age expiry and space reclaim on a timer), ``ready`` (sd_notify READY=1 once
subscribed), ``http`` (metrics, health, status page), ``watchdog`` (systemd pings, when
WatchdogSec= is set), ``reload`` (SIGHUP: gateway/reload.py).

Reload promise (SIGHUP, ``systemctl reload``): the config is read again by the loader the
daemon started with (file + OPENHQM_ environment + credentials). An invalid one is refused
as a whole: nothing of it applies, the last good config keeps running, the ERROR line names
the problem, ``config_reload_failures_total`` counts it and /readyz reports it (without
failing: the gateway runs fine) until a reload succeeds. A valid one is applied as
gateway/reload.py plans it; an uplink whose backend settings changed gets a new backend and
a new forwarder task of the same name on the same store cursor, after the old forwarder
stopped as at shutdown (its batch in flight finished or released to the store, so nothing
acknowledged is lost and nothing is settled twice) and the old backend was closed. The
ingress keeps storing throughout. Reloads run one at a time, in the ``reload`` task.

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
from collections.abc import Callable

from gateway.config import Config, UplinkConfig
from gateway.downlink.downlink import Downlink
from gateway.errors import BackendNotInstalled, ConfigError, NotSupportedError, StoreError
from gateway.express import Express, Lane
from gateway.forwarder import UPLINK_QUEUE, Forwarder
from gateway.ingress import MqttIngress
from gateway.message import ATTR_GATEWAY_ID
from gateway.observability.http import ObservabilityServer, Snapshot, UplinkSnapshot
from gateway.observability.logs import set_level
from gateway.observability.systemd import sd_notify, watchdog_interval
from gateway.queue.interface import MessageQueueInterface
from gateway.queue.registry import create_backend
from gateway.reload import ReloadPlan, plan_reload
from gateway.store.db import Destination
from gateway.store.records import QueueStats
from gateway.store.store import Store

log = logging.getLogger("gateway.service")

STOP_TIMEOUT = 15.0
#: closing the uplink at shutdown: what it still holds is in the store and is sent again
DISCONNECT_TIMEOUT = 3.0


#: reads the config again for a reload (load_config with the daemon's path)
ConfigLoader = Callable[[], Config]


class Gateway:
    """``uplink`` replaces the (first) configured uplink's backend (tests); ``loader`` reads
    the config again on SIGHUP (None: a reload is refused)."""

    def __init__(self, config: Config, uplink: MessageQueueInterface | None = None,
                 loader: ConfigLoader | None = None) -> None:
        self.config = config
        self.loader = loader
        stamp = {ATTR_GATEWAY_ID: config.gateway_id}
        self.store = Store(config.store_path, config.store, stamp=stamp)
        self.uplinks: dict[str, MessageQueueInterface] = {}
        self.forwarders: dict[str, Forwarder] = {}
        lanes = [Lane(u.name, tuple(u.topics)) for u in config.uplinks]
        for u, lane in zip(config.uplinks, lanes, strict=True):
            view = config.uplink_view(u)
            backend = uplink if uplink is not None and not self.uplinks else create_backend(view)
            self.uplinks[u.name] = backend
            self.forwarders[u.name] = Forwarder(self.store, backend, view, queue=u.name,
                                                lane=lane)
        #: the ingress's sink: write-avoidance in front of the store (gateway/express.py)
        self.express = Express(self.store, UPLINK_QUEUE, lanes,
                               config.store.commit_interval_ms / 1000, stamp=stamp)
        self.ingress = MqttIngress(config.ingress, config.ingress_client_id, self.express.sink)
        self.downlinks = {u.name: Downlink(config.uplink_view(u), name=u.name)
                          for u in config.uplinks if u.queue.downlink.enabled}
        self._stop = asyncio.Event()
        self._reload_requested = asyncio.Event()
        self.reloads = self.reload_failures = 0
        #: why the last reload was refused; '' after a good one
        self.reload_error = ""
        self._tg: asyncio.TaskGroup | None = None
        self._forwarder_tasks: dict[str, asyncio.Task[None]] = {}
        self._signals = 0
        self._started_at = time.time()
        #: the process's disk writes when it became ready (the per-payload-byte gauge's zero)
        self._write_base = 0
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
                      "ingress_duplicates": ing.duplicates, "ingress_excluded": ing.excluded,
                      "ingress_payload_bytes": self.express.payload_bytes,
                      "acked_without_write": self.express.acked_without_write,
                      "stored_after_offer": self.express.stored_after_offer,
                      "config_reloads": self.reloads,
                      "config_reload_failures": self.reload_failures},
            downlinks=tuple(d.snapshot() for d in self.downlinks.values()),
            config_reload_error=self.reload_error, disk_write_bytes=disk_write_bytes(),
            disk_write_base=self._write_base)

    def _uplink_snapshot(self, u: UplinkConfig, stats: QueueStats | None) -> UplinkSnapshot:
        fwd = self.forwarders[u.name].stats
        return UplinkSnapshot(
            name=u.name, type=self.uplinks[u.name].backend_name, state=fwd.state,
            depth=stats.depth if stats else 0, in_flight=(stats.in_flight or 0) if stats else 0,
            oldest_age_seconds=stats.oldest_age_seconds if stats else None,
            dead_letter=stats.dead_letter if stats else 0, last_ack_at=fwd.last_ack_at,
            counters={"uplinked": fwd.delivered, "uplinked_from_memory": fwd.express,
                      "retried": fwd.retried,
                      "dead_lettered": fwd.dead_lettered, "batches": fwd.batches},
            dropped=stats.dropped if stats else {}, defect=fwd.defect)

    async def _watchdog(self, interval: float) -> None:
        """Ping systemd's watchdog from the event loop: a hung loop stops the pings and
        systemd restarts the service."""
        while True:
            sd_notify("WATCHDOG=1")
            await asyncio.sleep(interval)

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
                self._tg = tg
                ingress = tg.create_task(self.ingress.run(), name="ingress")
                several = len(self.forwarders) > 1
                for name in self.forwarders:
                    self._start_forwarder(name)
                stoppable = [ingress]
                stoppable += [tg.create_task(d.run(), name=f"downlink-{name}" if several
                                             else "downlink")
                              for name, d in self.downlinks.items()]
                helpers = [tg.create_task(self._retention(), name="retention"),
                           tg.create_task(self._announce_ready(), name="ready"),
                           tg.create_task(self._reloader(), name="reload")]
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
                await self._drain_and_stop(*stoppable, *self._forwarder_tasks.values())
        finally:
            await self.express.close()  # what is still on offer is stored
            await asyncio.gather(*(self._disconnect(name, backend)
                                   for name, backend in self.uplinks.items()))
            await self.store.close()
            log.info("stopped")

    def _start_forwarder(self, name: str) -> None:
        assert self._tg is not None
        several = len(self.forwarders) > 1
        self._forwarder_tasks[name] = self._tg.create_task(
            self.forwarders[name].run(), name=f"forwarder-{name}" if several else "forwarder")

    def request_reload(self) -> None:
        self._reload_requested.set()

    async def _reloader(self) -> None:
        while True:
            await self._reload_requested.wait()
            self._reload_requested.clear()
            try:
                await self.reload()
            except Exception as exc:  # applying went wrong: logged, the daemon runs on
                self.reload_failures += 1
                self.reload_error = f"applying it failed: {type(exc).__name__}: {exc}"
                log.exception("config reload: %s", self.reload_error)

    async def reload(self) -> bool:
        """Read the config again and apply what can change live (module docstring).
        Returns whether the new config was accepted."""
        try:
            if self.loader is None:
                raise ConfigError("--config", None, "this gateway was started without a "
                                  "config loader; restart it to change its config")
            new = await asyncio.to_thread(self.loader)
            plan = plan_reload(self.config, new)
            backends = {name: create_backend(plan.config.uplink_view(u))
                        for name, u in plan.rebuild.items()}
        except Exception as exc:  # whatever it is, a reload never stops the daemon
            known = isinstance(exc, ConfigError | BackendNotInstalled | NotSupportedError)
            text = str(exc) if known else f"{type(exc).__name__}: {exc}"
            self.reload_failures += 1
            self.reload_error = "; ".join(line.strip() for line in text.splitlines())
            log.error("config reload refused, still running the last good config: %s",
                      self.reload_error)
            return False
        self.config = plan.config
        self.reloads += 1
        self.reload_error = ""
        await self._apply(plan, backends)
        return True

    async def _apply(self, plan: ReloadPlan, backends: dict[str, MessageQueueInterface]) -> None:
        if plan.restart:
            log.warning("config reload: these changes need a restart and are not applied: "
                        "%s", ", ".join(plan.restart))
        if plan.log_level is not None:
            set_level(plan.log_level)
        for name, u in plan.forwarders.items():
            self.forwarders[name].configure(u.forwarder)
        await asyncio.gather(*(self._replace_uplink(name, backend, plan.config)
                               for name, backend in backends.items()))
        live = ", ".join(plan.live) if plan.live else "nothing that applies live changed"
        log.info("config reloaded from %s; applied: %s", plan.config.source, live)

    async def _replace_uplink(self, name: str, backend: MessageQueueInterface,
                              config: Config) -> None:
        """Stop the uplink's forwarder as at shutdown, close its backend, start a new
        forwarder with the new backend on the same cursor."""
        old, task = self.forwarders[name], self._forwarder_tasks.get(name)
        old.stop()
        if task is not None:
            _, pending = await asyncio.wait({task}, timeout=STOP_TIMEOUT)
            if pending:
                log.warning("forwarder of uplink %s did not stop within %.0fs; cancelling it "
                            "(its lease expires and is delivered again)", name, STOP_TIMEOUT)
                task.cancel()
        await self._disconnect(name, self.uplinks[name])
        view = config.uplink_view(next(u for u in config.uplinks if u.name == name))
        self.uplinks[name] = backend
        self.forwarders[name] = Forwarder(self.store, backend, view, queue=name,
                                          stats=old.stats, lane=old.lane)
        if not self._stop.is_set():
            self._start_forwarder(name)
        log.info("uplink %s: backend rebuilt from the new settings (%s)", name,
                 backend.target)

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
        self._write_base = disk_write_bytes() or 0
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
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)

    def _on_reload_signal(self) -> None:
        log.info("received SIGHUP: reloading the config")
        self.request_reload()

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second %s: exiting at once", signal.Signals(sig).name)
            os._exit(1)
        log.info("received %s", signal.Signals(sig).name)
        self.request_stop()


def disk_write_bytes() -> int | None:
    """What this process caused to be written to disk so far (Linux /proc/self/io)."""
    try:
        with open("/proc/self/io", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


async def run_gateway(config: Config, loader: ConfigLoader | None = None) -> None:
    gateway = Gateway(config, loader=loader)
    gateway.install_signal_handlers()
    await gateway.run()
