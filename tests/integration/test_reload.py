"""Reload without a restart (SIGHUP): the real daemon, a real mosquitto and redis-server.

An uplink's password changes under a steady stream and nothing acknowledged is lost; an
invalid config is refused and the last good one keeps delivering; a change that needs a
restart is named and not applied; the log level follows the file.
"""

from __future__ import annotations

import signal
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis as redis_py
import yaml

from tests.gateway_process import GatewayProcess, Publisher, gateway_config
from tests.servers import ServerProcess, wait_until

pytestmark = pytest.mark.integration

OLD, NEW = "oldpass-4f1c9a", "newpass-b27e05"


def read_bodies(port: int, stream: str, password: str | None = None) -> set[bytes]:
    client = redis_py.Redis(host="127.0.0.1", port=port, password=password)
    try:
        return {fields[b"body"] for _, fields in client.xrange(stream)}
    finally:
        client.close()


def rewrite(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    cfg = yaml.safe_load(path.read_text())
    change(cfg)
    path.write_text(yaml.safe_dump(cfg))


def reload(gw: GatewayProcess, marker: str, count: int) -> None:
    """SIGHUP, then wait for the ``count``-th log line containing ``marker``."""
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: gw.log().count(marker) >= count, 20, f"{marker!r} x{count} in the log")


def http(gw: GatewayProcess, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(gw.http_url() + path, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(gw: GatewayProcess, name: str) -> float:
    for line in http(gw, "/metrics")[1].splitlines():
        if line.startswith(f"openhqm_gateway_{name} "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


@contextmanager
def steady(pub: Publisher, topic: str) -> Iterator[list[bytes]]:
    """Publish about 200 messages a second until the block ends; yields what was sent."""
    sent: list[bytes] = []
    done = threading.Event()

    def run() -> None:
        n = 0
        while not done.is_set():
            body = orjson.dumps({"n": n, "id": uuid.uuid4().hex})
            pub.publish(topic, body)
            sent.append(body)
            n += 1
            time.sleep(0.005)

    thread = threading.Thread(target=run, name="steady-publisher", daemon=True)
    thread.start()
    try:
        yield sent
    finally:
        done.set()
        thread.join(10)


@pytest.fixture
def root() -> str:
    return f"reload/{uuid.uuid4().hex[:8]}"


def make_gateway(tmp_path: Path, mosquitto: ServerProcess, redis: ServerProcess, root: str,
                 password: str | None = None) -> GatewayProcess:
    auth = f":{password}@" if password else ""
    queue = {"type": "redis", "redis_url": f"redis://{auth}127.0.0.1:{redis.port}/0",
             "request_queue_name": f"{root}-stream"}
    return GatewayProcess(gateway_config(tmp_path, mosquitto.port, root, queue), tmp_path)


def test_password_change_under_a_steady_stream(tmp_path: Path, mosquitto: ServerProcess,
                                               redis: ServerProcess, root: str) -> None:
    admin = redis_py.Redis(host="127.0.0.1", port=redis.port)
    admin.config_set("requirepass", OLD)
    admin = redis_py.Redis(host="127.0.0.1", port=redis.port, password=OLD)
    gw = make_gateway(tmp_path, mosquitto, redis, root, OLD)
    gw.start()
    assert gw.proc is not None
    pid = gw.proc.pid
    pub = Publisher(mosquitto.port)
    stream = f"{root}-stream"
    with steady(pub, f"{root}/dev1") as sent:
        wait_until(lambda: len(read_bodies(redis.port, stream, OLD)) > 100, 20, "flowing")
        # the server's password changes; AUTH is per connection, so the gateway's open
        # connections are closed too: its reconnects with the old password are refused
        admin.config_set("requirepass", NEW)
        admin = redis_py.Redis(host="127.0.0.1", port=redis.port, password=NEW)
        admin.client_kill_filter(_type="normal", skipme=True)
        wait_until(lambda: "unavailable" in gw.log(), 20, "the uplink refused")
        time.sleep(0.5)  # messages buffer meanwhile
        rewrite(gw.config, lambda c: c["queue"].update(
            redis_url=f"redis://:{NEW}@127.0.0.1:{redis.port}/0"))
        reload(gw, "config reloaded", 1)
        time.sleep(1.0)  # the stream goes on after the reload
    pub.wait_all_acked(len(sent))
    acked = set(pub.acked)
    assert len(acked) == len(sent)
    wait_until(lambda: read_bodies(redis.port, stream, NEW) >= acked, 60,
               "every acknowledged message in Redis")
    assert gw.proc is not None and gw.proc.pid == pid and gw.proc.poll() is None
    log = gw.log()
    assert "queue.redis_url" in log and "backend rebuilt" in log
    assert OLD not in log and NEW not in log, "the password is never logged"
    assert "need a restart" not in log
    assert metric(gw, "config_reloads_total") == 1
    assert metric(gw, "config_last_reload_success") == 1
    assert gw.status()["uplinks"]["default"]["dropped"] == {}
    assert gw.stop() == 0
    pub.close()


def test_invalid_reload_is_refused_and_the_old_config_runs_on(
        tmp_path: Path, mosquitto: ServerProcess, redis: ServerProcess, root: str) -> None:
    gw = make_gateway(tmp_path, mosquitto, redis, root)
    gw.start()
    pub = Publisher(mosquitto.port)
    stream = f"{root}-stream"
    rewrite(gw.config, lambda c: c["forwarder"].update(batch_size="lots"))
    with steady(pub, f"{root}/dev1") as sent:
        reload(gw, "config reload refused", 1)
        time.sleep(0.5)
    refused = next(line for line in gw.log().splitlines() if "config reload refused" in line)
    assert "ERROR" in refused and "forwarder.batch_size" in refused
    pub.wait_all_acked(len(sent))
    wait_until(lambda: read_bodies(redis.port, stream) >= set(pub.acked), 30,
               "delivered under the last good config")
    assert metric(gw, "config_reload_failures_total") == 1
    assert metric(gw, "config_last_reload_success") == 0
    status, body = http(gw, "/readyz")
    assert status == 200, body  # reported, not failing: the gateway runs fine
    assert body.startswith("ready\n") and "forwarder.batch_size" in body
    # fixed: the next reload succeeds and clears the note
    rewrite(gw.config, lambda c: c["forwarder"].update(batch_size=50))
    reload(gw, "config reloaded", 1)
    reloaded = next(line for line in gw.log().splitlines() if "config reloaded" in line)
    assert "forwarder.batch_size" in reloaded
    assert metric(gw, "config_last_reload_success") == 1
    assert http(gw, "/readyz") == (200, "ready\n")
    assert gw.stop() == 0
    pub.close()


def test_store_path_waits_for_a_restart(tmp_path: Path, mosquitto: ServerProcess,
                                        redis: ServerProcess, root: str) -> None:
    gw = make_gateway(tmp_path, mosquitto, redis, root)
    gw.start()
    elsewhere = tmp_path / "elsewhere.db"
    rewrite(gw.config, lambda c: c.setdefault("store", {}).update(path=str(elsewhere)))
    reload(gw, "config reloaded", 1)
    warning = next(line for line in gw.log().splitlines() if "need a restart" in line)
    assert "WARNING" in warning and "store.path" in warning
    pub = Publisher(mosquitto.port)
    bodies = [orjson.dumps({"n": n}) for n in range(50)]
    for body in bodies:
        pub.publish(f"{root}/dev1", body)
    pub.wait_all_acked(len(bodies))
    wait_until(lambda: read_bodies(redis.port, f"{root}-stream") >= set(bodies), 30,
               "delivered from the store it runs with")
    assert not elsewhere.exists()
    assert gw.stop() == 0
    pub.close()


def test_log_level_follows_the_file(tmp_path: Path, mosquitto: ServerProcess,
                                    redis: ServerProcess, root: str) -> None:
    gw = make_gateway(tmp_path, mosquitto, redis, root)
    gw.start()
    redis.stop()  # the forwarder retries every second; each retry is a DEBUG line
    pub = Publisher(mosquitto.port)
    pub.publish(f"{root}/dev1", b"waits for the uplink")
    debug = "DEBUG   gateway.forwarder: uplink redis still unavailable"
    wait_until(lambda: "unavailable" in gw.log(), 20, "the uplink is down")
    time.sleep(2)
    assert debug not in gw.log()
    rewrite(gw.config, lambda c: c["logging"].update(level="DEBUG"))
    reload(gw, "config reloaded", 1)
    wait_until(lambda: debug in gw.log(), 20, "DEBUG lines")
    rewrite(gw.config, lambda c: c["logging"].update(level="INFO"))
    reload(gw, "config reloaded", 2)
    seen = gw.log().count(debug)
    time.sleep(3)
    assert gw.log().count(debug) == seen, "no DEBUG lines at INFO"
    redis.start()
    wait_until(lambda: b"waits for the uplink" in read_bodies(redis.port, f"{root}-stream"), 30,
               "delivered once the uplink is back")
    assert gw.stop() == 0
    pub.close()


def test_several_uplinks_one_rebuilt_one_retuned(tmp_path: Path, mosquitto: ServerProcess,
                                                 redis: ServerProcess, root: str) -> None:
    """Uplink b's stream name changes (its backend and forwarder-b are replaced), uplink a's
    batch size changes (taken between batches); both keep delivering every message."""
    url = f"redis://127.0.0.1:{redis.port}/0"
    uplinks = {"a": {"type": "redis", "redis_url": url, "request_queue_name": f"{root}-a"},
               "b": {"type": "redis", "redis_url": url, "request_queue_name": f"{root}-b1"}}
    gw = GatewayProcess(gateway_config(tmp_path, mosquitto.port, root, None, uplinks=uplinks),
                        tmp_path)
    gw.start()
    pub = Publisher(mosquitto.port)
    with steady(pub, f"{root}/dev1") as sent:
        wait_until(lambda: len(read_bodies(redis.port, f"{root}-b1")) > 50, 20, "flowing")

        def change(c: dict[str, Any]) -> None:
            c["uplinks"]["b"]["request_queue_name"] = f"{root}-b2"
            c["uplinks"]["a"]["forwarder"] = {"batch_size": 7}
        rewrite(gw.config, change)
        reload(gw, "config reloaded", 1)
        wait_until(lambda: len(read_bodies(redis.port, f"{root}-b2")) > 50, 20, "b2 flowing")
    pub.wait_all_acked(len(sent))
    acked = set(pub.acked)
    wait_until(lambda: read_bodies(redis.port, f"{root}-a") >= acked, 60, "every message in a")
    wait_until(lambda: read_bodies(redis.port, f"{root}-b1") | read_bodies(
        redis.port, f"{root}-b2") >= acked, 60, "every message in b1 or b2")
    reloaded = next(line for line in gw.log().splitlines() if "config reloaded" in line)
    assert "uplinks.a.forwarder.batch_size" in reloaded
    assert "uplinks.b.request_queue_name" in reloaded
    assert "forwarder settings reloaded" in gw.log()
    status = gw.status()["uplinks"]
    assert status["a"]["dropped"] == {} and status["b"]["dropped"] == {}
    assert metric(gw, "config_reloads_total") == 1
    assert gw.stop() == 0
    pub.close()
