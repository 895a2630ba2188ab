"""Write-avoidance (``forwarder.ack_when: uplinked_or_stored``) against real servers.

While the uplink keeps up, a message is PUBACKed once the uplink accepted it and is never
written to the store (``openhqm_gateway_acked_without_write_total`` on /metrics counts
those); otherwise it goes the stored way. These tests check that the express path really is
taken where it should be (the counter grows), and that crashes, a power cut and a slow
uplink still lose nothing the broker acknowledged and keep the per-topic order.

"Acknowledged" means the broker sent the publisher a PUBACK, as in test_faults_crash.py: the
broker then holds the message until the gateway acknowledges it. Mosquitto PUBACKs a
publisher as soon as it has the message, so the publisher's PUBACK latency says nothing about
the gateway: whether ingest stalls is measured on the gateway's own counters.
"""

from __future__ import annotations

import functools
import random
import re
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from gateway.message import ATTR_MESSAGE_ID, ATTR_MQTT_TOPIC
from tests.faultproxy import FaultProxy
from tests.gateway_process import GatewayProcess, Publisher, gateway_config
from tests.integration.test_end_to_end import check_per_topic_order, read_stream
from tests.integration.test_faults_crash import (
    SteadyPublisher,
    after_crash_loop,
    check_crash_bounds,
    delivered_report_wait,
    make_gateway,
    power_cut_disk,
    store_count,
)
from tests.servers import ServerProcess, wait_until

pytestmark = pytest.mark.integration

EXPRESS = "openhqm_gateway_acked_without_write_total"
RECEIVED = "openhqm_gateway_ingress_received_total"
COMMITS = "openhqm_gateway_store_commits_total"
STORED_AFTER_OFFER = "openhqm_gateway_stored_after_offer_total"
DISK_WRITES = "openhqm_gateway_disk_write_bytes_total"
PAYLOAD_BYTES = "openhqm_gateway_ingress_payload_bytes_total"
WRITE_AVOIDANCE = {"ack_when": "uplinked_or_stored"}


# -- reading the daemon's /metrics ----------------------------------------------------------


def parse_metrics(text: str) -> dict[str, float]:
    """Sample name (labels dropped) -> value, summed over label sets."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, value = line.rsplit(" ", 1)
        base = name.split("{", 1)[0]
        out[base] = out.get(base, 0.0) + float(value)
    return out


class Life:
    """The daemon's current life: its /metrics URL from the log it wrote since this start.

    ``GatewayProcess.http_url`` takes the last URL in the whole log, which right after a
    restart is the previous life's (the new one has not logged yet)."""

    def __init__(self, gw: GatewayProcess) -> None:
        self.gw = gw
        self.offset = 0
        self.url: str | None = None

    def start(self, wait_ready: bool = True) -> None:
        self.offset = len(self.gw.log())
        self.url = None
        self.gw.start(wait_ready=wait_ready)

    def base(self) -> str | None:
        if self.url is None:
            found = re.findall(r"metrics and health on (https?://[0-9.:]+)/",
                               self.gw.log()[self.offset:])
            self.url = found[-1] if found else None
        return self.url

    def metrics(self, timeout: float = 5.0) -> dict[str, float] | None:
        """This life's metrics; None when it has no endpoint yet or does not answer in time."""
        base = self.base()
        if base is None:
            return None
        try:
            with urllib.request.urlopen(f"{base}/metrics", timeout=timeout) as resp:
                return parse_metrics(resp.read().decode())
        except (OSError, urllib.error.URLError):
            return None

    def require(self, timeout: float = 10.0) -> dict[str, float]:
        got: list[dict[str, float]] = []

        def scraped() -> bool:
            m = self.metrics()
            if m is not None:
                got.append(m)
            return bool(got)

        wait_until(scraped, timeout, "the daemon's /metrics")
        m = got[-1]
        assert EXPRESS in m, f"{EXPRESS} not on /metrics: {sorted(m)}"
        return m

    def express(self) -> float:
        return self.require()[EXPRESS]


# -- 1. crash loop ---------------------------------------------------------------------------

KILLS = 20
RECEIVE_MAXIMUM = 200
BATCH_SIZE = 200
CURSOR_SYNC = 200


def test_crash_loop_with_write_avoidance_loses_nothing_acknowledged(
        tmp_path: Path, mosquitto: ServerProcess, redis: ServerProcess) -> None:
    """20 SIGKILLs at random moments of a steady publish with the uplink online throughout:
    express-acked messages were accepted by Redis, stored ones were committed, so every
    acknowledged message arrives; the first occurrences keep each topic's order."""
    root = f"wacrash/{uuid.uuid4().hex[:8]}"
    gw = make_gateway(tmp_path, mosquitto, redis.port, root,
                      ingress={"receive_maximum": RECEIVE_MAXIMUM},
                      forwarder={"batch_size": BATCH_SIZE, **WRITE_AVOIDANCE},
                      store={"cursor_sync_messages": CURSOR_SYNC})
    life = Life(gw)
    life.start()
    pub = Publisher(mosquitto.port)
    steady = SteadyPublisher(pub, root, rate=400)
    steady.start()
    rng = random.Random()
    started = time.monotonic()
    express_by_life: list[float] = []  # the last scrape before each kill: a lower bound
    try:
        # A first life that is not killed early: the express path must be in use here.
        time.sleep(1.5)
        first = life.require()
        express_by_life.append(first[EXPRESS])
        received_first = first[RECEIVED]
        assert first[EXPRESS] > 0, ("write-avoidance on, Redis online: nothing was acknowledged "
                                    f"without a write (received {received_first:.0f})")
        gw.kill()
        life.start(wait_ready=False)
        for _ in range(KILLS - 1):
            deadline = time.monotonic() + rng.uniform(0.1, 1.2)  # start-up and catch-up too
            seen = 0.0
            while (left := deadline - time.monotonic()) > 0:
                m = life.metrics(timeout=max(0.05, min(left, 0.3)))
                if m is not None:
                    seen = m.get(EXPRESS, seen)
                time.sleep(max(0.0, min(0.1, deadline - time.monotonic())))
            express_by_life.append(seen)
            gw.kill()
            life.start(wait_ready=False)
    finally:
        steady.halt()
    report, crash_seconds = after_crash_loop(pub, steady.sent, redis.port, root, started)
    killed_lives = express_by_life[1:]
    print(f"\ncrash loop, write-avoidance on: {KILLS} SIGKILLs in {crash_seconds:.1f}s, "
          f"{len(pub.acked)} acknowledged, {report['entries']} stream entries, "
          f"{report['duplicates']} duplicates ({report['same_id']} same id, {report['new_id']} "
          f"new id); acked without a write: {express_by_life[0]:.0f} of "
          f"{received_first:.0f} received in the first 1.5s, at least "
          f"{sum(killed_lives):.0f} over the {len(killed_lives)} short lives "
          f"({sum(1 for x in killed_lives if x > 0)} of them with some)")
    check_crash_bounds(report, pub)
    assert gw.stop() == 0
    pub.close()


# -- 2. Kafka: on by default ---------------------------------------------------------------


@pytest.mark.parametrize("ack_when", [None, "stored"], ids=["default", "stored"])
def test_kafka_express_exactly_once(tmp_path: Path, mosquitto: ServerProcess,
                                    kafka_broker: Any, ack_when: str | None) -> None:
    """Kafka with acks=all: write-avoidance is on unless set to ``stored``. A steady publish
    and a clean stop put every message in the topic exactly once, in per-topic order."""
    from tests.kafka_read import read_topic

    root = f"wakafka/{uuid.uuid4().hex[:8]}"
    topic = f"wa-{uuid.uuid4().hex[:12]}"
    queue = {"type": "kafka", "kafka_bootstrap_servers": kafka_broker.bootstrap,
             "request_queue_name": topic}
    forwarder = {} if ack_when is None else {"ack_when": ack_when}
    gw = GatewayProcess(gateway_config(tmp_path, mosquitto.port, root, queue,
                                       forwarder=forwarder), tmp_path)
    life = Life(gw)
    life.start()
    before = life.require()
    pub = Publisher(mosquitto.port)
    try:
        steady = SteadyPublisher(pub, root, rate=400)
        steady.start()
        time.sleep(2.5)
        steady.halt()
        pub.wait_all_acked(steady.sent)

        def uplinked() -> bool:
            m = life.metrics()
            return m is not None and m.get(RECEIVED, 0) >= steady.sent and (
                m.get("openhqm_gateway_backlog_messages", 1) == 0)

        wait_until(uplinked, 60, "everything received and nothing waiting")
        m = life.require()
        express, received = m[EXPRESS], m[RECEIVED]
        written = m.get(DISK_WRITES, 0) - before.get(DISK_WRITES, 0)
        payload = m.get(PAYLOAD_BYTES, 0) - before.get(PAYLOAD_BYTES, 0)
        assert gw.stop() == 0
    finally:
        pub.close()
        if gw.proc is not None:
            gw.kill()
    records = read_topic(kafka_broker.bootstrap, topic)
    entries = [(dict(r.headers)[ATTR_MESSAGE_ID].decode(), r.value,
                {ATTR_MQTT_TOPIC: dict(r.headers)[ATTR_MQTT_TOPIC].decode()}) for r in records]
    bodies = Counter(b for _, b, _ in entries)
    print(f"\nkafka, ack_when={ack_when or 'default'}: {len(pub.acked)} acknowledged, "
          f"{len(records)} records, {express:.0f} of {received:.0f} acked without a write, "
          f"{m.get(STORED_AFTER_OFFER, 0):.0f} stored after an offer, "
          f"{m.get(COMMITS, 0) - before.get(COMMITS, 0):.0f} store commits, "
          f"{written / max(payload, 1):.1f} disk bytes written per payload byte while publishing "
          f"({m.get('openhqm_gateway_disk_written_per_payload_byte', float('nan')):.1f} "
          "since start)")
    assert set(bodies) == set(pub.acked), "every acknowledged message in the topic"
    assert max(bodies.values()) == 1, (
        f"exactly once: {sum(n - 1 for n in bodies.values())} duplicates "
        f"(ids {Counter(m for m, _, _ in entries).most_common(3)})")
    check_per_topic_order(entries)
    if ack_when is None:
        assert express > 0, "Kafka acks=all: write-avoidance is on by default"
    else:
        assert express == 0, "ack_when: stored writes every message"


# -- 3. power cut ----------------------------------------------------------------------------


def wa_power_cut_config(tmp_path: Path, mosquitto: ServerProcess, redis_port: int, *,
                        root: str, gateway_id: str, state_dir: Path, durability: str) -> Path:
    """test_faults_crash.power_cut_config with write-avoidance on."""
    queue = {"type": "redis", "redis_url": f"redis://127.0.0.1:{redis_port}/0",
             "request_queue_name": f"{root}-stream", "redis_socket_timeout": "1s"}
    return gateway_config(tmp_path, mosquitto.port, root, queue,
                          gateway={"id": gateway_id, "state_dir": str(state_dir)},
                          store={"durability": durability}, forwarder=WRITE_AVOIDANCE)


@pytest.mark.parametrize("durability", ["full", "normal"])
def test_power_cut_with_write_avoidance(tmp_path: Path, mosquitto: ServerProcess,
                                        redis: ServerProcess, durability: str) -> None:
    """Redis online for a second (messages go express: only Redis has them), then down for a
    second (messages go the stored way), then a SIGKILL and a power cut of the gateway's disk.

    full: every acknowledged message arrives after the restart on the power-cut disk. normal:
    only stored messages can be lost: no more than the store lost to the power cut."""
    fs, disk = power_cut_disk(tmp_path)
    gw: GatewayProcess | None = None
    root, gateway_id = f"wapower/{uuid.uuid4().hex[:8]}", f"wapower-{uuid.uuid4().hex[:8]}"
    stream = f"{root}-stream"
    try:
        config = functools.partial(wa_power_cut_config, tmp_path, mosquitto, redis.port,
                                   root=root, gateway_id=gateway_id, durability=durability)
        gw = GatewayProcess(config(state_dir=disk / "state"), tmp_path)
        life = Life(gw)
        life.start()
        pub = Publisher(mosquitto.port)
        steady = SteadyPublisher(pub, root, rate=600)
        steady.start()
        time.sleep(1.0)
        express = life.express()  # Redis has these; the store never had them
        redis.stop()  # from here on everything goes the stored way
        time.sleep(1.0)
        gw.kill()
        steady.halt()
        pub.wait_all_acked(steady.sent)
        after_cut = fs.power_cut_copy("after-cut", "disk")
        in_cache = store_count(disk / "state" / "store.db")
        on_disk = store_count(after_cut / "state" / "store.db")
        print(f"\nwrite-avoidance, durability={durability}: {len(pub.acked)} published, "
              f"{express:.0f} acked without a write while Redis was up, {in_cache} in the store "
              f"after the kill (page cache), {on_disk} after the power cut")
        assert express > 0, "write-avoidance on, Redis up: some messages went express"
        assert in_cache > 0, "Redis down: messages went the stored way"
        redis.start()
        gw = GatewayProcess(config(state_dir=after_cut / "state"), tmp_path)
        gw.start()
        if durability == "full":
            report = delivered_report_wait(redis.port, stream, pub.acked)
            print(f"after restart: {report}")
        else:
            lost = lost_after_restart(gw, pub, redis.port, root)
            print(f"after restart: {lost} acknowledged messages lost to the power cut "
                  f"(the store lost {in_cache - on_disk})")
            assert lost <= in_cache - on_disk, "only messages that were in the store are lost"
        assert gw.stop() == 0
        pub.close()
    finally:
        if gw is not None and gw.proc is not None:
            gw.kill()
        fs.cleanup()


def lost_after_restart(gw: GatewayProcess, pub: Publisher, redis_port: int, root: str) -> int:
    """Acknowledged messages that never arrive (the restarted gateway drained its store and
    the broker's redeliveries); the first occurrences that did arrive keep their order."""
    stream = f"{root}-stream"
    pub.publish(f"{root}/marker", b"marker")  # arrives after the redeliveries
    wait_until(lambda: b"marker" in {b for _, b, _ in read_stream(redis_port, stream)}
               and gw.status()["uplinks"]["default"]["depth"] == 0, 60, "drained")
    entries = [e for e in read_stream(redis_port, stream) if e[1] != b"marker"]
    check_per_topic_order(entries)
    return len(set(pub.acked) - {b"marker"} - {b for _, b, _ in entries})


# -- 4. slow uplink --------------------------------------------------------------------------

SLOW_RATE = 300  # messages per second published
SLOW_SECONDS = 4.0
SLOW = {"delay": 0.05, "rate": 10_000}  # bytes/s: well under what SLOW_RATE needs
INGRESS_WINDOW = 100  # receive_maximum: the gateway cannot run far ahead of its acks


def watch_ingest(life: Life, pub: Publisher, seconds: float) -> tuple[list[float], float]:
    """For ``seconds``: how far the gateway's received count trails the broker's acks to the
    publisher, every 0.2 s, and the largest backlog seen."""
    lags: list[float] = []
    backlog_max = 0.0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        published = len(pub.acked)  # before the scrape: the lag is not underestimated
        m = life.require()
        lags.append(published - m[RECEIVED])
        backlog_max = max(backlog_max, m.get("openhqm_gateway_backlog_messages", 0))
        time.sleep(0.2)
    return lags, backlog_max


def test_slow_uplink_goes_the_stored_way_without_stalling_ingest(
        tmp_path: Path, mosquitto: ServerProcess, redis: ServerProcess) -> None:
    """Redis behind a slow link: the express offers miss their deadline, the lane closes and
    messages are committed and acknowledged as without write-avoidance; ingest keeps pace
    with the publisher. Back to normal, everything arrives in order and the express path
    opens again once the backlog is delivered."""
    root = f"waslow/{uuid.uuid4().hex[:8]}"
    stream = f"{root}-stream"
    proxy = FaultProxy(redis.port, lifetime=120).start()
    gw: GatewayProcess | None = None
    try:
        queue = {"type": "redis", "redis_url": f"redis://127.0.0.1:{proxy.port}/0",
                 "request_queue_name": stream, "redis_socket_timeout": "1s"}
        gw = GatewayProcess(gateway_config(
            tmp_path, mosquitto.port, root, queue,
            ingress={"keepalive": "1s", "receive_maximum": INGRESS_WINDOW},
            forwarder={"publish_timeout": "2s", "retry_max_delay": "500ms", **WRITE_AVOIDANCE}),
            tmp_path)
        life = Life(gw)
        life.start()
        pub = Publisher(mosquitto.port)
        steady = SteadyPublisher(pub, root, rate=SLOW_RATE)
        steady.start()
        try:
            time.sleep(1.0)
            healthy = life.require()
            assert healthy[EXPRESS] > 0, "a fast uplink: messages go express"
            proxy.set_mode("slow", **SLOW)
            slow_start = life.require()
            lags, backlog_max = watch_ingest(life, pub, SLOW_SECONDS)
            published_in_slow = len(pub.acked)
            wait_until(lambda: life.require()[RECEIVED] >= published_in_slow, 10,
                       "the gateway received everything published while the uplink was slow")
            slow_end = life.require()
            proxy.set_mode("up")
            # keep publishing until the express path is back (the backlog was delivered)
            wait_until(lambda: life.express() > slow_end[EXPRESS], 30,
                       "express path open again after the uplink recovered")
        finally:
            steady.halt()
        pub.wait_all_acked(steady.sent)
        report = delivered_report_wait(redis.port, stream, pub.acked)
        final = life.require()
        slow_received = slow_end[RECEIVED] - slow_start[RECEIVED]
        slow_express = slow_end[EXPRESS] - slow_start[EXPRESS]
        slow_commits = slow_end[COMMITS] - slow_start[COMMITS]
        print(f"\nslow uplink, write-avoidance on: healthy 1s {healthy[EXPRESS]:.0f} of "
              f"{healthy[RECEIVED]:.0f} acked without a write; slow {SLOW_SECONDS:.0f}s: "
              f"{slow_received:.0f} received, {slow_express:.0f} acked without a write, "
              f"{slow_commits:.0f} store commits, backlog up to {backlog_max:.0f}, ingest lag "
              f"max {max(lags):.0f} (median {sorted(lags)[len(lags) // 2]:.0f}) messages; "
              f"after: {final[EXPRESS]:.0f} of {final[RECEIVED]:.0f} acked without a write in "
              f"all; {report}; proxy {proxy.stats}")
        # ingest not stalled: the gateway stays within ~1.5 s of the publisher (a gateway
        # whose acks waited on a 10 kB/s uplink would fall behind by hundreds per second)
        assert max(lags) <= SLOW_RATE * 1.5, f"ingest fell behind the publisher: {lags}"
        assert slow_received >= SLOW_RATE * SLOW_SECONDS * 0.5
        # stored way: commits and a backlog, next to no express acks
        assert slow_express <= 0.1 * slow_received, "a slow uplink: messages go the stored way"
        assert slow_commits > 0 and backlog_max > 0
        status = gw.status()["uplinks"]["default"]
        assert status["dropped"] == {} and status["dead_letter"] == 0
        assert gw.stop() == 0
        pub.close()
    finally:
        if gw is not None and gw.proc is not None:
            gw.kill()
        proxy.stop()
