"""Bad input: odd payloads and topics get a clear outcome and block nothing else; a config
with a wrong type is refused with exit code 2 and the key named."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.gateway_process import GatewayProcess, Publisher, gateway_config
from tests.integration.test_end_to_end import read_stream
from tests.servers import ServerProcess, wait_until

pytestmark = pytest.mark.integration

TEN_MB = 10 * 1024**2


def make_gateway(tmp_path: Path, mosquitto: ServerProcess, redis: ServerProcess, root: str,
                 **sections: dict[str, object]) -> GatewayProcess:
    queue = {"type": "redis", "redis_url": f"redis://127.0.0.1:{redis.port}/0",
             "request_queue_name": f"{root}-stream"}
    return GatewayProcess(gateway_config(tmp_path, mosquitto.port, root, queue, **sections),
                          tmp_path)


@pytest.fixture
def owned() -> Iterator[list[GatewayProcess]]:
    """Daemons a failed test left running are killed at teardown."""
    made: list[GatewayProcess] = []
    yield made
    for gw in made:
        if gw.proc is not None:
            gw.kill()


def nested_json(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def test_odd_payloads_and_topics(tmp_path: Path, mosquitto: ServerProcess,
                                 redis: ServerProcess, owned: list[GatewayProcess]) -> None:
    root = f"input/{uuid.uuid4().hex[:8]}"
    gw = make_gateway(tmp_path, mosquitto, redis, root)  # max_message_bytes: 256KB (default)
    owned.append(gw)
    gw.start()
    pub = Publisher(mosquitto.port)
    # (topic, payload) that must pass through unchanged; a normal message after each odd one
    odd = [
        (f"{root}/empty", b""),
        (f"{root}/bad-utf8", b"\xff\xfe\xc3\x28 not utf-8 \xa0\xa1"),
        (f"{root}/nested", nested_json(20_000)),  # 120 KB, 20,000 levels: bytes, never parsed
        (f"{root}/ünïcödé/温度/🌡️", b"unicode topic levels"),
        (f"{root}/with space/ and  more ", b"spaces"),
        (f"{root}//empty//levels/", b"empty levels"),
        (f"{root}/$not-first/!\"%&'()*,-.:;<=>?@[\\]^_`{{|}}~", b"punctuation"),
    ]
    expected: list[tuple[str, bytes]] = []
    for n, (topic, body) in enumerate(odd):
        pub.publish(topic, body)
        expected.append((topic, body))
        if n == 2:  # 10 MB over max_message_bytes: dead-lettered, acknowledged, not blocking
            pub.publish(f"{root}/huge", b"h" * TEN_MB)
        normal = orjson.dumps({"n": n})
        pub.publish(f"{root}/normal", normal)
        expected.append((f"{root}/normal", normal))
    pub.wait_all_acked(len(expected) + 1, timeout=60)
    stream = f"{root}-stream"
    wait_until(lambda: len(read_stream(redis.port, stream)) >= len(expected), 30, "delivery")
    got = [(attrs["mqtt_topic"], body) for _, body, attrs in read_stream(redis.port, stream)]
    assert got == expected, "every odd payload and topic arrives unchanged, in order"
    (line,) = gw.cli("dlq", "list", "--json").stdout.splitlines()
    dead = orjson.loads(line)
    assert dead["topic"] == f"{root}/huge" and dead["bytes"] == TEN_MB
    assert "max_message_bytes" in dead["reason"]
    assert gw.stop() == 0
    pub.close()


def test_10mb_payload_passes_when_the_limit_allows(tmp_path: Path, mosquitto: ServerProcess,
                                                   redis: ServerProcess, owned: list[GatewayProcess]) -> None:
    root = f"input/{uuid.uuid4().hex[:8]}"
    gw = make_gateway(tmp_path, mosquitto, redis, root, ingress={"max_message_bytes": "16MB"})
    owned.append(gw)
    gw.start()
    pub = Publisher(mosquitto.port)
    big = bytes(range(256)) * (TEN_MB // 256)
    pub.publish(f"{root}/big", big)
    pub.publish(f"{root}/after", b"after")
    pub.wait_all_acked(2, timeout=60)
    stream = f"{root}-stream"
    wait_until(lambda: len(read_stream(redis.port, stream)) >= 2, 60, "delivery")
    bodies = [b for _, b, _ in read_stream(redis.port, stream)]
    assert bodies == [big, b"after"]
    assert gw.status()["uplinks"]["default"]["dead_letter"] == 0
    assert gw.stop() == 0
    pub.close()


def test_ten_thousand_distinct_topics(tmp_path: Path, mosquitto: ServerProcess,
                                      redis: ServerProcess, owned: list[GatewayProcess]) -> None:
    root = f"input/{uuid.uuid4().hex[:8]}"
    gw = make_gateway(tmp_path, mosquitto, redis, root)
    owned.append(gw)
    gw.start()
    pub = Publisher(mosquitto.port)
    started = time.monotonic()
    topics = [f"{root}/site{i % 7}/device-{i:05d}" for i in range(10_000)]
    for i, topic in enumerate(topics):
        pub.publish(topic, b"%d" % i)
    pub.wait_all_acked(len(topics), timeout=60)
    stream = f"{root}-stream"
    wait_until(lambda: len(read_stream(redis.port, stream)) >= len(topics), 60, "delivery")
    entries = read_stream(redis.port, stream)
    assert {attrs["mqtt_topic"] for _, _, attrs in entries} == set(topics)
    print(f"\n10,000 distinct topics delivered in {time.monotonic() - started:.1f}s")
    assert gw.stop() == 0
    pub.close()


BAD_CONFIGS = {
    "ingress.port": "ingress:\n  port: not-a-port\n",
    "ingress.keepalive": "ingress:\n  keepalive: soon\n",
    "ingress.subscriptions": "ingress:\n  subscriptions: sensors/#\n",
    "store.max_bytes": "store:\n  max_bytes: lots\n",
    "store.durability": "store:\n  durability: sometimes\n",
    "store.commit_batch_size": "store:\n  commit_batch_size: [1, 2]\n",
    "forwarder.batch_size": "forwarder:\n  batch_size: 1.5\n",
    "queue.redis_socket_timeout": "queue:\n  type: redis\n  redis_socket_timeout: {a: 1}\n",
    "logging.level": "logging:\n  level: 3\n",
}


@pytest.mark.parametrize("key", list(BAD_CONFIGS))
def test_wrong_type_in_config_exits_2_naming_the_key(tmp_path: Path, key: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(BAD_CONFIGS[key])
    gw = GatewayProcess(config, tmp_path)
    for command in (["config", "check"], ["run"]):
        result = gw.cli(*command, check=False)
        assert result.returncode == 2, (command, result.stderr)
        assert key in result.stderr and str(config) in result.stderr, result.stderr
