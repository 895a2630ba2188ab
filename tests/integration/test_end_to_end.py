"""The main job end to end: sensors -> mosquitto -> gateway daemon -> Redis Streams.

Every test runs the real daemon as a child process against a real broker and a real
redis-server, and checks what arrived in the stream.
"""

from __future__ import annotations

import random
import time
import uuid
from collections import defaultdict
from pathlib import Path

import orjson
import pytest
import redis as redis_py

from tests.gateway_process import GatewayProcess, Publisher, gateway_config
from tests.servers import ServerProcess, wait_until

pytestmark = pytest.mark.integration


def read_stream(port: int, stream: str) -> list[tuple[str, bytes, dict[str, str]]]:
    """(message id, body, attributes) of every entry, in stream order."""
    client = redis_py.Redis(host="127.0.0.1", port=port)
    try:
        entries = client.xrange(stream)
    finally:
        client.close()
    out = []
    for _, fields in entries:
        attrs = orjson.loads(fields[b"attributes"]) if fields.get(b"attributes") else {}
        out.append((fields[b"id"].decode(), fields[b"body"], attrs))
    return out


def check_per_topic_order(entries: list[tuple[str, bytes, dict[str, str]]]) -> None:
    """First occurrences of each topic's messages arrive in publish order (duplicates allowed)."""
    seen: set[bytes] = set()
    last: dict[str, int] = defaultdict(lambda: -1)
    for _, body, attrs in entries:
        if body in seen:
            continue
        seen.add(body)
        n = orjson.loads(body)["n"]
        topic = attrs["mqtt_topic"]
        assert n > last[topic], f"{topic}: {n} arrived after {last[topic]}"
        last[topic] = n


@pytest.fixture
def root() -> str:
    return f"e2e/{uuid.uuid4().hex[:8]}"


def make_gateway(tmp_path: Path, mosquitto: ServerProcess, redis: ServerProcess, root: str,
                 **sections: dict[str, object]) -> GatewayProcess:
    queue = {"type": "redis", "redis_url": f"redis://127.0.0.1:{redis.port}/0",
             "request_queue_name": f"{root}-stream"}
    config = gateway_config(tmp_path, mosquitto.port, root, queue, **sections)
    return GatewayProcess(config, tmp_path)


def payload(topic: str, n: int) -> bytes:
    return orjson.dumps({"topic": topic, "n": n, "v": round(random.random(), 4)})


def test_uplink_outage_then_catch_up(tmp_path: Path, mosquitto: ServerProcess,
                                     redis: ServerProcess, root: str) -> None:
    gw = make_gateway(tmp_path, mosquitto, redis, root)
    gw.start()
    pub = Publisher(mosquitto.port)
    topics = [f"{root}/dev{i}/temp" for i in range(5)]
    sent = [payload(t, n) for n in range(300) for t in topics]
    for body in sent[:500]:
        pub.publish(orjson.loads(body)["topic"], body)
    pub.wait_all_acked(500)
    redis.stop()  # the uplink goes away part-way
    for body in sent[500:1200]:
        pub.publish(orjson.loads(body)["topic"], body)
    pub.wait_all_acked(1200)
    wait_until(lambda: gw.status()["uplinks"]["default"]["depth"] > 0, 20, "messages buffered")
    redis.start()
    for body in sent[1200:]:
        pub.publish(orjson.loads(body)["topic"], body)
    pub.wait_all_acked(len(sent))
    stream = f"{root}-stream"
    wait_until(lambda: {b for _, b, _ in read_stream(redis.port, stream)} >= set(sent), 60,
             "every message in Redis")
    entries = read_stream(redis.port, stream)
    check_per_topic_order(entries)
    ids = {mid for mid, _, _ in entries}
    assert len(ids) == len({b for _, b, _ in entries}), "one stable id per message"
    status = gw.status()["uplinks"]["default"]
    assert status["dropped"] == {} and status["dead_letter"] == 0
    assert gw.stop() == 0
    pub.close()


def test_sigkill_during_ingest_loses_nothing_acknowledged(tmp_path: Path, mosquitto: ServerProcess,
                                                          redis: ServerProcess, root: str) -> None:
    gw = make_gateway(tmp_path, mosquitto, redis, root)
    gw.start()
    pub = Publisher(mosquitto.port)
    topics = [f"{root}/dev{i}" for i in range(4)]
    sent = [payload(t, n) for n in range(1500) for t in topics]
    for i, body in enumerate(sent):
        pub.publish(orjson.loads(body)["topic"], body)
        if i == 2500:
            gw.kill()  # mid-stream, with commits and acks in flight
    pub.wait_all_acked(len(sent))
    gw.start()
    stream = f"{root}-stream"
    wait_until(lambda: {b for _, b, _ in read_stream(redis.port, stream)} >= set(pub.acked), 60,
             "every acknowledged message in Redis")
    entries = read_stream(redis.port, stream)
    check_per_topic_order(entries)
    duplicates = len(entries) - len({b for _, b, _ in entries})
    print(f"delivered {len(entries)} entries for {len(sent)} messages, {duplicates} duplicates")
    assert gw.stop() == 0
    pub.close()


def test_payloads_pass_through_unchanged(tmp_path: Path, mosquitto: ServerProcess,
                                         redis: ServerProcess, root: str) -> None:
    gw = make_gateway(tmp_path, mosquitto, redis, root,
                      ingress={"max_message_bytes": 1024})
    gw.start()
    pub = Publisher(mosquitto.port)
    bodies = [b"", bytes(range(256)), b"\xff\xfe\x00binary", "héllo".encode(), b'{"a": 1}',
              b"x" * 1024]
    for body in bodies:
        pub.publish(f"{root}/p", body)
    pub.publish(f"{root}/big", b"y" * 1025)  # over max_message_bytes: dead-lettered
    pub.publish(f"{root}/p", b"after")
    pub.wait_all_acked(len(bodies) + 2)
    stream = f"{root}-stream"
    wait_until(lambda: len(read_stream(redis.port, stream)) >= len(bodies) + 1, 30, "delivery")
    got = [b for _, b, _ in read_stream(redis.port, stream)]
    assert got == [*bodies, b"after"]
    dead = gw.cli("dlq", "list", "--json").stdout.splitlines()
    (entry,) = [orjson.loads(line) for line in dead]
    assert entry["topic"] == f"{root}/big" and entry["bytes"] == 1025
    assert "max_message_bytes" in entry["reason"]
    assert gw.stop() == 0
    pub.close()


def test_backend_rejection_dead_letters_while_rest_flow(tmp_path: Path, mosquitto: ServerProcess,
                                                        redis: ServerProcess, root: str) -> None:
    client = redis_py.Redis(host="127.0.0.1", port=redis.port)
    client.set(f"{root}-wrongtype", "a string, not a stream")  # XADD to it fails for good
    gw = make_gateway(tmp_path, mosquitto, redis, root,
                      forwarder={"routes": [{"topic": f"{root}/bad/#",
                                             "destination": f"{root}-wrongtype"}]})
    gw.start()
    pub = Publisher(mosquitto.port)
    for n in range(20):
        pub.publish(f"{root}/good", payload("good", n))
        if n == 10:
            pub.publish(f"{root}/bad/x", b"doomed")
    pub.wait_all_acked(21)
    stream = f"{root}-stream"
    wait_until(lambda: len(read_stream(redis.port, stream)) >= 20, 30, "good messages delivered")
    wait_until(lambda: gw.status()["uplinks"]["default"]["dead_letter"] == 1, 30, "dead letter")
    (line,) = gw.cli("dlq", "list", "--json").stdout.splitlines()
    entry = orjson.loads(line)
    assert entry["payload"] == "doomed" and "WRONGTYPE" in entry["reason"]
    # Fix the cause, replay, and the message goes through.
    client.delete(f"{root}-wrongtype")
    assert "replayed 1" in gw.cli("dlq", "replay", "--all").stdout
    wait_until(lambda: client.xlen(f"{root}-wrongtype") == 1, 40, "replayed message delivered")
    assert gw.stop() == 0
    client.close()
    pub.close()


def test_sigterm_stops_promptly_and_keeps_backlog(tmp_path: Path, mosquitto: ServerProcess,
                                                  redis: ServerProcess, root: str) -> None:
    redis.stop()  # nothing can be uplinked: everything stays buffered
    gw = make_gateway(tmp_path, mosquitto, redis, root)
    gw.start()
    pub = Publisher(mosquitto.port)
    for n in range(200):
        pub.publish(f"{root}/t", payload("t", n))
    pub.wait_all_acked(200)
    wait_until(lambda: gw.status()["uplinks"]["default"]["depth"] == 200, 20, "200 buffered")
    started = time.monotonic()
    assert gw.stop() == 0
    assert time.monotonic() - started < 20
    assert gw.status()["uplinks"]["default"]["depth"] == 200
    redis.start()
    gw.start()
    wait_until(lambda: len(read_stream(redis.port, f"{root}-stream")) == 200, 30, "drained")
    # status reads the file: the cursor and its counter are written within cursor_sync_interval
    wait_until(lambda: gw.status()["uplinks"]["default"]["delivered_total"] == 200, 5,
               "delivered_total written")
    assert gw.stop() == 0
    pub.close()


def test_status_json_shape(tmp_path: Path, mosquitto: ServerProcess, redis: ServerProcess,
                           root: str) -> None:
    gw = make_gateway(tmp_path, mosquitto, redis, root)
    gw.start()
    status = gw.status()
    assert set(status["store"]) >= {"path", "bytes", "messages"}
    uplink = status["uplinks"]["default"]
    assert set(uplink) >= {"depth", "in_flight", "oldest_age_seconds", "dead_letter",
                           "delivered_total", "dropped"}
    assert uplink["type"] == "redis"
    text = gw.cli("status").stdout
    assert "uplink   default (redis)" in text
    assert gw.stop() == 0


def test_bad_config_exit_code_and_message(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("ingress:\n  port: not-a-port\n")
    gw = GatewayProcess(config, tmp_path)
    result = gw.cli("config", "check", check=False)
    assert result.returncode == 2
    assert "ingress.port='not-a-port'" in result.stderr and str(config) in result.stderr
    result = gw.cli("run", check=False)
    assert result.returncode == 2


def test_config_check_masks_secrets(tmp_path: Path) -> None:
    config = tmp_path / "ok.yaml"
    config.write_text("ingress:\n  password: hunter2\nqueue:\n  type: redis\n"
                      "  redis_url: redis://:topsecret@h:6379/0\n")
    out = GatewayProcess(config, tmp_path).cli("config", "check").stdout
    assert "hunter2" not in out and "topsecret" not in out and "***" in out


def test_config_check_builds_the_uplink(tmp_path: Path) -> None:
    """A config that parses but whose uplink cannot be built fails `config check`, not `run`."""
    config = tmp_path / "custom.yaml"
    config.write_text("queue:\n  type: custom\n  custom_module: no.such.module\n"
                      "  custom_class: Nope\n")
    result = GatewayProcess(config, tmp_path).cli("config", "check", check=False)
    assert result.returncode == 2
    assert "no.such.module" in result.stderr
