"""The gateway's main job, on this machine, in about a minute.

Starts a private mosquitto and redis-server on free loopback ports (their data in a temp
directory), runs the gateway daemon against them, lets simulated sensors publish QoS 1
readings, takes Redis away for a while (the uplink outage), brings it back, waits for the
catch-up, and checks the Redis stream against what the broker acknowledged.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import redis
import yaml
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def binary(name: str) -> str:
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and os.path.exists(candidate):
            return candidate
    sys.exit(f"{name} is not installed: run scripts/demo.sh, which installs it")


def wait(check, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, redis.RedisError):
            pass
        time.sleep(0.1)
    sys.exit(f"demo failed: {what} not ready after {timeout}s")


def start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as fh:
        return subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sensors", type=int, default=10)
    ap.add_argument("--rate", type=float, default=200.0, help="messages per second, all sensors")
    ap.add_argument("--seconds", type=float, default=15.0, help="how long sensors publish")
    ap.add_argument("--outage", type=float, default=6.0, help="seconds Redis is down")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="openhqm-demo-"))
    mqtt_port, redis_port = free_port(), free_port()
    (work / "mosquitto.conf").write_text(
        f"listener {mqtt_port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
        f"persistence_location {work}/\nmax_queued_messages 0\nmax_inflight_messages 0\n")
    redis_argv = [binary("redis-server"), "--port", str(redis_port), "--bind", "127.0.0.1",
                  "--dir", str(work), "--save", "", "--appendonly", "yes"]
    config = {
        "gateway": {"id": "demo", "state_dir": str(work / "state")},
        "ingress": {"port": mqtt_port, "subscriptions": [{"topic": "sensors/#", "qos": 1}]},
        "forwarder": {"retry_max_delay": "2s"},
        "queue": {"type": "redis", "redis_url": f"redis://127.0.0.1:{redis_port}/0",
                  "request_queue_name": "openhqm-requests"},
    }
    (work / "gateway.yaml").write_text(yaml.safe_dump(config))
    print(f"demo directory: {work}")

    broker = start([binary("mosquitto"), "-c", str(work / "mosquitto.conf")], work / "mosquitto.log")
    redis_proc = start(redis_argv, work / "redis.log")
    r = redis.Redis(host="127.0.0.1", port=redis_port)
    wait(lambda: r.ping(), 10, "redis")
    gateway = start([sys.executable, "-m", "gateway", "-c", str(work / "gateway.yaml"), "run"],
                    work / "gateway.log")
    wait(lambda: "ready: subscribed" in (work / "gateway.log").read_text(), 20, "gateway")
    print(f"gateway running (log: {work / 'gateway.log'})")

    acked: set[bytes] = set()
    pending: dict[int, bytes] = {}
    lock = threading.Lock()

    early: set[int] = set()  # acks that arrive before publish() returned

    def on_publish(client, userdata, mid, reason, props) -> None:  # type: ignore[no-untyped-def]
        if reason.is_failure:
            return
        with lock:
            body = pending.pop(mid, None)
            if body is None:
                early.add(mid)
            else:
                acked.add(body)

    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="demo-sensors", protocol=mqtt.MQTTv5)
    pub.on_publish = on_publish
    pub.max_inflight_messages_set(1000)
    pub.connect("127.0.0.1", mqtt_port)
    pub.loop_start()

    total = int(args.rate * args.seconds)
    outage_at, outage_end = args.seconds * 0.25, args.seconds * 0.25 + args.outage
    began = time.monotonic()
    redis_down = False
    for n in range(total):
        now = time.monotonic() - began
        if not redis_down and now >= outage_at and redis_proc.poll() is None and n:
            stop(redis_proc)
            redis_down = True
            print(f"t={now:5.1f}s  uplink outage: redis-server stopped; the gateway buffers locally")
        if redis_down and now >= outage_end:
            redis_proc = start(redis_argv, work / "redis.log")
            wait(lambda: r.ping(), 10, "redis restart")
            redis_down = False
            print(f"t={now:5.1f}s  uplink back: redis-server restarted; catching up")
        sensor = n % args.sensors
        body = orjson.dumps({"sensor": sensor, "n": n, "temp": round(20 + random.gauss(0, 2), 2),
                             "ts": time.time()})
        mid = pub.publish(f"sensors/dev{sensor}/temp", body, qos=1).mid  # not under our lock
        with lock:
            if mid in early:
                early.discard(mid)
                acked.add(body)
            else:
                pending[mid] = body
        time.sleep(max(0.0, began + (n + 1) / args.rate - time.monotonic()))
    if redis_down:
        redis_proc = start(redis_argv, work / "redis.log")
        wait(lambda: r.ping(), 10, "redis restart")
    wait(lambda: len(acked) == total, 30, "broker acknowledgements")
    print(f"published {total} readings from {args.sensors} sensors; waiting for the catch-up")

    started_wait = time.monotonic()
    delivered: set[bytes] = set()

    def caught_up() -> bool:
        delivered.clear()
        delivered.update(f[b"body"] for _, f in r.xrange("openhqm-requests"))
        return delivered >= acked

    wait(caught_up, 60, "catch-up")
    entries = r.xlen("openhqm-requests")
    print(f"caught up {time.monotonic() - started_wait:.1f}s after the last publish")
    status = subprocess.run([sys.executable, "-m", "gateway", "-c", str(work / "gateway.yaml"),
                             "status"], capture_output=True, text=True, check=False)
    print(status.stdout, end="")
    pub.loop_stop()
    pub.disconnect()
    stop(gateway)
    stop(redis_proc)
    stop(broker)
    lost = len(acked - delivered)
    print(f"RESULT: published {total}, acknowledged by the broker {len(acked)}, delivered to Redis "
          f"{len(delivered & acked)} ({entries - len(delivered)} duplicate entries), lost {lost}")
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
