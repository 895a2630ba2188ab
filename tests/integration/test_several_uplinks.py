"""Several uplinks at once behind the real daemon: one stored copy, a cursor per uplink, topic
routes, no uplink holding back another (issue: several uplinks; docs/architecture.md)."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.faultproxy import FaultProxy
from tests.gateway_process import GatewayProcess, Publisher, gateway_config
from tests.integration.test_end_to_end import check_per_topic_order, read_stream
from tests.integration.test_faults_crash import SteadyPublisher
from tests.kafka_read import end_offsets, read_topic
from tests.kafka_server import KafkaBroker
from tests.servers import ServerProcess, mosquitto_server, running, wait_until

pytestmark = pytest.mark.integration


class Subscriber:
    """A reader on the second (cloud) mosquitto: every payload per topic, in arrival order."""

    def __init__(self, port: int, topic_filter: str) -> None:
        self.got: dict[str, list[bytes]] = defaultdict(list)
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"cloud-reader-{uuid.uuid4().hex[:6]}")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._ready.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic_filter, qos=1)
        self.client.loop_start()
        assert self._ready.wait(10), "no SUBACK from the cloud broker"

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._lock:
            self.got[msg.topic].append(bytes(msg.payload))

    def payloads(self) -> list[bytes]:
        with self._lock:
            return [p for ps in self.got.values() for p in ps]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def body(topic: str, n: int) -> bytes:
    return orjson.dumps({"topic": topic, "n": n})


def in_topic_order(bodies: list[bytes]) -> bool:
    last: dict[str, int] = {}
    for b in bodies:
        msg = orjson.loads(b)
        if msg["n"] <= last.get(msg["topic"], -1):
            return False
        last[msg["topic"]] = msg["n"]
    return True


def test_three_uplinks_each_get_exactly_their_topics_in_order(
        tmp_path: Path, mosquitto: ServerProcess, redis: ServerProcess,
        kafka_broker: KafkaBroker) -> None:
    root = f"fan/{uuid.uuid4().hex[:8]}"
    stream, kafka_topic = f"{root}-telemetry", f"alarms-{uuid.uuid4().hex[:8]}"
    with running(mosquitto_server(tmp_path / "cloud")) as cloud:
        uplinks = {
            "telemetry": {"type": "redis", "redis_url": f"redis://127.0.0.1:{redis.port}/0",
                          "request_queue_name": stream, "topics": [f"{root}/+/telemetry"]},
            "alarms-kafka": {"type": "kafka", "kafka_bootstrap_servers": kafka_broker.bootstrap,
                             "request_queue_name": kafka_topic, "kafka_message_key": "{topic}",
                             "topics": [f"{root}/+/alarm"]},
            "alarms-mqtt": {"type": "mqtt", "mqtt_broker_host": "127.0.0.1",
                            "mqtt_broker_port": cloud.port, "mqtt_topic_template": "cloud/{topic}",
                            "topics": [f"{root}/+/alarm"]},
        }
        gw = GatewayProcess(gateway_config(tmp_path, mosquitto.port, root, None, uplinks=uplinks),
                            tmp_path)
        reader = Subscriber(cloud.port, f"cloud/{root}/#")
        gw.start()
        pub = Publisher(mosquitto.port)
        try:
            sent: dict[str, list[bytes]] = {"telemetry": [], "alarm": []}
            for n in range(300):
                kind = "alarm" if n % 4 == 0 else "telemetry"
                topic = f"{root}/d{n % 3}/{kind}"
                sent[kind].append(body(topic, n))
                pub.publish(topic, sent[kind][-1])
            pub.wait_all_acked(300)
            wait_until(lambda: len(read_stream(redis.port, stream)) >= len(sent["telemetry"])
                       and len(reader.payloads()) >= len(sent["alarm"])
                       and sum(end_offsets(kafka_broker.bootstrap, kafka_topic).values())
                       >= len(sent["alarm"]), 60,
                       "telemetry in Redis, alarms in Kafka and at the cloud broker")
            redis_bodies = [b for _, b, _ in read_stream(redis.port, stream)]
            kafka_bodies = [r.value for r in read_topic(kafka_broker.bootstrap, kafka_topic)]
            mqtt_bodies = reader.payloads()
            # exactly the routed ones, each once, in per-topic order
            assert sorted(redis_bodies) == sorted(sent["telemetry"])
            assert sorted(kafka_bodies) == sorted(sent["alarm"])
            assert sorted(mqtt_bodies) == sorted(sent["alarm"])
            assert in_topic_order(redis_bodies) and in_topic_order(mqtt_bodies)
            assert in_topic_order(kafka_bodies)  # keyed by topic: one partition per topic
            status = gw.status()
            assert set(status["uplinks"]) == {"telemetry", "alarms-kafka", "alarms-mqtt"}
            assert status["uplinks"]["alarms-kafka"]["type"] == "kafka"
            wait_until(lambda: all(u["delivered_total"] > 0 for u in gw.status()["uplinks"].values()),
                       5, "every uplink's delivered_total written")
            assert gw.stop() == 0
        finally:
            pub.close()
            reader.close()


def test_a_cut_uplink_holds_back_no_other_and_catches_up(
        tmp_path: Path, mosquitto: ServerProcess, redis: ServerProcess) -> None:
    """Uplink A (behind a proxy that cuts it) and B share the store; while A is cut for a
    while under a steady stream, B keeps delivering with its usual latency and loses
    nothing; afterwards A catches up completely."""
    root = f"iso/{uuid.uuid4().hex[:8]}"
    proxy = FaultProxy(redis.port, lifetime=300).start()
    uplinks = {
        "a": {"type": "redis", "redis_url": f"redis://127.0.0.1:{proxy.port}/0",
              "request_queue_name": f"{root}-a", "redis_socket_timeout": "1s"},
        "b": {"type": "redis", "redis_url": f"redis://127.0.0.1:{redis.port}/0",
              "request_queue_name": f"{root}-b"},
    }
    gw = GatewayProcess(gateway_config(tmp_path, mosquitto.port, root, None, uplinks=uplinks),
                        tmp_path)
    gw.start()
    pub = Publisher(mosquitto.port)
    rate, seconds = 200, 8.0
    try:
        def stream(phase: str, first: int) -> list[bytes]:
            """`rate` messages a second for `seconds`, numbered on from `first`."""
            sent = []
            started = time.monotonic()
            n = 0
            while (elapsed := time.monotonic() - started) < seconds:
                while n < elapsed * rate:
                    number = first + n
                    sent.append(orjson.dumps({"phase": phase, "n": number, "t": time.time()}))
                    pub.publish(f"{root}/dev{number % 4}/t", sent[-1])
                    n += 1
                time.sleep(0.005)
            return sent

        def b_latency(sent: list[bytes]) -> float:
            """p99 publish -> arrival in B's stream, from the entries' own timestamps."""
            mine = set(sent)
            wait_until(lambda: mine <= {b for _, b, _ in read_stream(redis.port, f"{root}-b")},
                       30, "B has everything")
            latencies = []
            for entry_id, b, _ in _stream_with_ids(redis.port, f"{root}-b"):
                if b in mine:
                    latencies.append(entry_id - orjson.loads(b)["t"])
            latencies.sort()
            return latencies[int(0.99 * (len(latencies) - 1))]

        healthy = stream("healthy", 0)
        pub.wait_all_acked(len(healthy))
        healthy_p99 = b_latency(healthy)
        proxy.set_mode("cut")
        cut = stream("cut", len(healthy))
        pub.wait_all_acked(len(healthy) + len(cut))
        cut_p99 = b_latency(cut)
        a_stream = [b for _, b, _ in read_stream(redis.port, f"{root}-a")]
        assert not set(cut) & set(a_stream), "A was cut: nothing of the cut phase reached it"
        print(f"\nB's p99 latency: {healthy_p99 * 1000:.1f} ms with A healthy, "
              f"{cut_p99 * 1000:.1f} ms with A cut; A's backlog "
              f"{gw.status()['uplinks']['a']['depth']}")
        # B's latency while A is down stays that of a healthy run. Held back by A, B would
        # wait out A's 1 s socket timeouts and backoff: a single stall puts a second's worth
        # of messages (200, 12% of the phase) a second late, above this bound. The 750 ms
        # margin is for a loaded machine: another worker building images under qemu measured
        # B's p99 at 176 ms against 47 ms healthy; two full local runs with the kill -9 loop
        # of test_write_avoidance.py on the other worker, 617 and 640 ms against 50-52 ms
        # (alone, and beside a busy loop on the other core: 47-48 ms, as before #16).
        assert cut_p99 <= max(healthy_p99 * 1.5, healthy_p99 + 0.75), (healthy_p99, cut_p99)
        proxy.set_mode("up")
        wait_until(lambda: set(healthy + cut) <= {b for _, b, _ in read_stream(redis.port,
                                                                              f"{root}-a")},
                   30, "A catches up")
        check_per_topic_order(read_stream(redis.port, f"{root}-a"))
        check_per_topic_order(read_stream(redis.port, f"{root}-b"))
        assert gw.stop() == 0
    finally:
        pub.close()
        proxy.stop()


def _stream_with_ids(port: int, stream: str) -> list[tuple[float, bytes, dict[str, str]]]:
    """(arrival time from the stream entry id, body, attributes)."""
    import redis as redis_py

    client = redis_py.Redis(host="127.0.0.1", port=port)
    try:
        entries = client.xrange(stream)
    finally:
        client.close()
    return [(int(eid.split(b"-")[0]) / 1000, fields[b"body"], {}) for eid, fields in entries]



def test_sigkills_lose_nothing_acknowledged_at_any_uplink(
        tmp_path: Path, mosquitto: ServerProcess, redis: ServerProcess) -> None:
    """Three uplinks (every topic; even devices; odd devices), ten SIGKILLs under a steady
    stream: every acknowledged message reaches every uplink it is routed to, in per-topic
    order, and none reaches an uplink it is not routed to."""
    root = f"kill3/{uuid.uuid4().hex[:8]}"
    url = f"redis://127.0.0.1:{redis.port}/0"
    routes = {"all": [f"{root}/#"], "even": [f"{root}/dev0", f"{root}/dev2"],
              "odd": [f"{root}/dev1", f"{root}/dev3"]}
    uplinks = {name: {"type": "redis", "redis_url": url, "request_queue_name": f"{root}-{name}",
                      "redis_socket_timeout": "2s", "topics": topics}
               for name, topics in routes.items()}
    gw = GatewayProcess(gateway_config(tmp_path, mosquitto.port, root, None, uplinks=uplinks,
                                       forwarder={"batch_size": 100},
                                       store={"cursor_sync_messages": 100}), tmp_path)
    gw.start()
    pub = Publisher(mosquitto.port)
    steady = SteadyPublisher(pub, root, rate=300)
    steady.start()
    rng = random.Random()
    try:
        for _ in range(10):
            time.sleep(rng.uniform(0.1, 1.0))
            gw.kill()
            gw.start(wait_ready=False)
    finally:
        steady.halt()
    pub.wait_all_acked(steady.sent, timeout=30)
    acked = set(pub.acked)
    routed = {"all": acked,
              "even": {b for b in acked if orjson.loads(b)["topic"][-1] in "02"},
              "odd": {b for b in acked if orjson.loads(b)["topic"][-1] in "13"}}
    assert routed["even"] and routed["odd"]
    for name, expected in routed.items():
        stream = f"{root}-{name}"
        wait_until(lambda s=stream, e=expected: {b for _, b, _ in read_stream(redis.port, s)}
                   >= e, 60, f"every acknowledged message routed to {name} in its stream")
    for name, expected in routed.items():
        entries = read_stream(redis.port, f"{root}-{name}")
        assert {b for _, b, _ in entries} == expected, f"{name} got a message not routed to it"
        check_per_topic_order(entries)
    assert gw.stop() == 0
    pub.close()
