"""What the forwarder does and says about its uplink, against a real store and in-memory
uplinks: an outage is one WARNING each way, a slow first connection names the address, a
programming error in the uplink's code is a defect (never an endless outage), and stop()
returns within about a second whatever the uplink is doing, with the batch back in the
store. Client-library log records are detail (DEBUG)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest

import gateway.forwarder as forwarder_module
from gateway.config import LoggingConfig, parse_config
from gateway.forwarder import STOP_GRACE, UPLINK_QUEUE, Forwarder
from gateway.observability.http import Snapshot, UplinkSnapshot, readiness, render_metrics
from gateway.observability.logs import setup_logging
from gateway.queue.interface import PublishResult
from gateway.queue.registry import create_backend
from gateway.store import Store
from tests.stub_uplink import StubUplink
from tests.unit.test_custom_handler import MODULE, SeedStyleQueue
from tests.unit.test_forwarder import filled_store, make_config


def seed_config(cls: str = "SeedStyleQueue", module: str = MODULE) -> Any:
    return parse_config({"queue": {
        "type": "custom", "custom_module": module, "custom_class": cls,
        "custom_config": {"connection_string": "myqueue://localhost:5672",
                          "option1": "value1"}}}, "test.yaml")


async def eventually(done: Any, timeout: float = 5.0) -> None:
    """Poll ``done`` for up to ``timeout`` seconds (the forwarder has no event for it)."""
    for _ in range(int(timeout / 0.01)):
        if done():
            return
        await asyncio.sleep(0.01)


async def run_until(fwd: Forwarder, done: Any, timeout: float = 5.0) -> asyncio.Task[None]:
    task = asyncio.create_task(fwd.run())
    await eventually(done, timeout)
    return task


def logged(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == level and r.name.startswith("gateway")]


class HangingUplink(StubUplink):
    """A server that accepted the connection and then went silent."""

    def __init__(self, *, hang_connect: bool = False) -> None:
        super().__init__()
        self.hang_connect = hang_connect
        self.cancelled = asyncio.Event()

    @property
    def target(self) -> str:
        return "10.9.8.7:9092"

    async def _hang(self) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def connect(self) -> None:
        if self.hang_connect:
            await self._hang()

    async def publish_batch(self, queue_name: str,
                            messages: Any) -> list[PublishResult]:
        await self._hang()
        return []


async def test_stop_releases_a_batch_the_uplink_never_answers(tmp_path: Path) -> None:
    store = await filled_store(tmp_path / "s.db", [("s/1", b"%d" % i) for i in range(30)])
    uplink = HangingUplink()
    fwd = Forwarder(store, uplink, make_config(batch_size=10, publish_timeout=300))
    task = await run_until(fwd, lambda: fwd.stats.state == "online")
    await asyncio.sleep(0.2)  # the first batch is on the wire, forever
    started = time.monotonic()
    fwd.stop()
    await asyncio.wait_for(task, 5)
    took = time.monotonic() - started
    assert STOP_GRACE <= took < STOP_GRACE + 1.0, took
    assert uplink.cancelled.is_set()
    stats = await store.stats(UPLINK_QUEUE)
    assert (stats.depth, stats.in_flight or 0, stats.dead_letter) == (30, 0, 0)
    assert all(m.attempts == 0 for m in await store.lease(UPLINK_QUEUE, 30))  # nothing spent
    await store.close()


async def test_stop_while_connecting_returns_at_once(tmp_path: Path) -> None:
    store = await filled_store(tmp_path / "s.db", [("s/1", b"x")])
    uplink = HangingUplink(hang_connect=True)
    fwd = Forwarder(store, uplink, make_config(publish_timeout=300))
    task = asyncio.create_task(fwd.run())
    await asyncio.sleep(0.2)
    started = time.monotonic()
    fwd.stop()
    await asyncio.wait_for(task, 5)
    assert time.monotonic() - started < STOP_GRACE + 1.0
    assert uplink.cancelled.is_set()
    await store.close()


async def test_a_slow_first_connection_names_the_address(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forwarder_module, "CONNECT_NOTICE", 0.3)
    store = await filled_store(tmp_path / "s.db", [("s/1", b"x")])
    fwd = Forwarder(store, HangingUplink(hang_connect=True), make_config(publish_timeout=300))
    task = asyncio.create_task(fwd.run())
    await eventually(lambda: logged(caplog, logging.WARNING), 3)
    (warning,) = logged(caplog, logging.WARNING)
    assert "uplink stub has not connected within" in warning and "10.9.8.7:9092" in warning
    fwd.stop()
    await asyncio.wait_for(task, 5)
    await store.close()


async def test_an_outage_is_one_warning_when_it_starts_and_one_when_it_ends(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway")
    store = await filled_store(tmp_path / "s.db", [("s/1", b"%d" % i) for i in range(20)])
    uplink = StubUplink()
    fwd = Forwarder(store, uplink, make_config(batch_size=5))
    task = await run_until(fwd, lambda: len(uplink.published) == 20)
    assert logged(caplog, logging.INFO) == ["uplink stub connected"]
    uplink.down = True
    await filled_more(store, 10)
    await asyncio.sleep(0.6)  # dozens of failed rounds
    uplink.down = False
    await eventually(lambda: len(uplink.published) == 30)
    fwd.stop()
    await task
    warnings = logged(caplog, logging.WARNING)
    assert len(warnings) == 2, warnings
    assert warnings[0] == "uplink stub unavailable: stub is down; buffering locally"
    assert warnings[1].startswith("uplink stub back after ")
    assert len(logged(caplog, logging.DEBUG)) >= 3  # every further failure: detail
    assert not logged(caplog, logging.ERROR)
    await store.close()


async def filled_more(store: Store, n: int) -> None:
    from gateway.message import ATTR_MQTT_TOPIC, new_message_id
    from gateway.store import NewMessage

    await store.append(UPLINK_QUEUE, [NewMessage(new_message_id(), "s/1", b"more%d" % i,
                                                 {ATTR_MQTT_TOPIC: "s/1"}, time.time())
                                      for i in range(n)])


def snapshot_of(fwd: Forwarder, depth: int) -> Snapshot:
    now = time.time()
    uplink = UplinkSnapshot(name=fwd.queue, type=fwd.uplink.backend_name, state=fwd.stats.state,
                            depth=depth, in_flight=0, oldest_age_seconds=0.1, dead_letter=0,
                            last_ack_at=None, defect=fwd.stats.defect)
    return Snapshot(taken_at=now, started_at=now, ingress_connected=True, store_ok=True,
                    store_messages=depth, store_bytes=0, store_file_bytes=0, commits=0,
                    commit_seconds_total=0.0, uplinks=[uplink])


@pytest.mark.parametrize("bug", [TypeError, AttributeError, NameError])
async def test_a_programming_error_is_a_defect_reported_once_with_its_traceback(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, bug: type[Exception]) -> None:
    store: Store = await filled_store(tmp_path / "s.db", [("s/1", b"%d" % i) for i in range(20)],
                                      max_attempts=2)
    queue = create_backend(seed_config())
    assert isinstance(queue, SeedStyleQueue)
    queue.broken = bug
    fwd = Forwarder(store, queue, make_config(batch_size=5))
    caplog.set_level(logging.DEBUG, logger="gateway")
    task = await run_until(fwd, lambda: False, timeout=0.6)  # many retry rounds
    assert fwd.stats.state == "defective"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert errors[0].exc_info is not None  # the traceback, for whoever fixes the handler
    assert f"uplink SeedStyleQueue has a defect: {bug.__name__}" in errors[0].getMessage()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert not any("unavailable" in w for w in warnings), warnings
    stats = await store.stats(UPLINK_QUEUE)
    assert (stats.depth, stats.dead_letter) == (20, 0)  # buffered, no attempt spent
    failures = readiness(snapshot_of(fwd, stats.depth), make_config().observability)
    assert any(f"has a defect: {bug.__name__}: the handler's own bug" in f for f in failures)
    assert 'state="defective"} 1' in render_metrics(snapshot_of(fwd, stats.depth))

    queue.broken = None  # fixed (in real life: a new version and a restart)
    await eventually(lambda: len(queue.calls) == 20)
    assert fwd.stats.state == "online" and fwd.stats.defect == ""
    assert readiness(snapshot_of(fwd, 0), make_config().observability) == []
    assert any("uplink SeedStyleQueue back after" in r.getMessage() for r in caplog.records)
    fwd.stop()
    await task
    await store.close()


class BrokenConnect(SeedStyleQueue):
    async def connect(self) -> None:
        self.client = await my_queue_library.connect(self.connection_string)  # type: ignore[name-defined]  # noqa: F821


async def test_a_defect_in_connect_does_not_end_the_forwarder(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The seed's connect, pasted without its client library: NameError."""
    store = await filled_store(tmp_path / "s.db", [("s/1", b"x")])
    fwd = Forwarder(store, create_backend(seed_config("BrokenConnect", __name__)), make_config())
    task = await run_until(fwd, lambda: fwd.stats.state == "defective")
    await asyncio.sleep(0.2)
    assert not task.done()
    assert fwd.stats.defect.startswith("NameError: name 'my_queue_library' is not defined")
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    fwd.stop()
    await asyncio.wait_for(task, 2)
    assert (await store.stats(UPLINK_QUEUE)).depth == 1
    await store.close()


def test_client_library_records_are_debug_detail(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        for level in ("INFO", "DEBUG"):
            setup_logging(LoggingConfig(level=level, journald="off"))
            logging.getLogger("gateway.uplinks.kafka.librdkafka").error("FAIL Connect refused")
            logging.getLogger("azure.eventhub._pyamqp").warning("link detached")
            logging.getLogger("gateway.forwarder").warning("uplink kafka unavailable")
            logging.getLogger("asyncio").error("Task exception was never retrieved")
            out = capsys.readouterr().out
            assert "WARNING gateway.forwarder: uplink kafka unavailable" in out
            assert "ERROR   asyncio: Task exception" in out
            if level == "INFO":
                assert "FAIL Connect refused" not in out and "link detached" not in out
            else:
                assert "DEBUG   gateway.uplinks.kafka.librdkafka: FAIL Connect refused" in out
                assert "DEBUG   azure.eventhub._pyamqp: link detached" in out
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


def test_the_uplink_state_metric_lists_defective() -> None:
    text = render_metrics(Snapshot(
        taken_at=0, started_at=0, ingress_connected=True, store_ok=True, store_messages=0,
        store_bytes=0, store_file_bytes=0, commits=0, commit_seconds_total=0.0,
        uplinks=[UplinkSnapshot(name="default", type="x", state="online", depth=0, in_flight=0,
                                oldest_age_seconds=None, dead_letter=0, last_ack_at=None)]))
    assert 'openhqm_gateway_uplink_state{uplink="default",type="x",state="defective"} 0' in text
    # nothing waits: no age (NaN, as status.json says null), not a misleading 0
    assert 'openhqm_gateway_backlog_oldest_age_seconds{uplink="default"} NaN' in text
