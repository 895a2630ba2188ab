"""The gateway's main job, on this machine, in about half a minute.

Starts a private mosquitto and redis-server on free loopback ports (their data in a temporary
directory), runs the gateway daemon against them, lets simulated sensors publish QoS 1
readings for ``--seconds``, takes Redis away once for ``--outage`` seconds (the uplink
outage) a quarter of the way in, waits for the catch-up, and checks the Redis stream against
what the broker acknowledged. Prints a handful of lines, the gateway's own two lines about
the outage among them, and ends with the RESULT line. The temporary directory is removed
afterwards, unless something failed (then it is kept, and named, for its logs).
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
from collections.abc import Callable
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import redis
import yaml
from paho.mqtt.enums import CallbackAPIVersion

STREAM = "openhqm-requests"


class DemoFailed(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def binary(name: str) -> str:
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and os.path.exists(candidate):
            return candidate
    raise DemoFailed(f"{name} is not installed: run scripts/demo.sh, which installs it")


def wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, redis.RedisError):
            pass
        time.sleep(0.1)
    raise DemoFailed(f"{what} not ready after {timeout:g}s")


class Processes:
    """The demo's child processes; every one is stopped on the way out, whatever happened."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str]) -> None:
        with open(self.work / f"{name}.log", "ab") as log:
            self.running[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                  start_new_session=True)

    def stop(self, name: str) -> None:
        proc = self.running.pop(name, None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def stop_all(self) -> None:
        for name in list(self.running)[::-1]:
            self.stop(name)


class Sensors:
    """paho at QoS 1; ``acked`` holds the payloads the broker acknowledged."""

    def __init__(self, port: int) -> None:
        self.acked: set[bytes] = set()
        self._pending: dict[int, bytes] = {}
        self._early: set[int] = set()  # acks that arrive before publish() returned
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="demo-sensors",
                                  protocol=mqtt.MQTTv5)
        self.client.on_publish = self._on_publish
        self.client.max_inflight_messages_set(1000)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_publish(self, client, userdata, mid, reason, props) -> None:  # type: ignore[no-untyped-def]
        if reason.is_failure:
            return
        with self._lock:
            body = self._pending.pop(mid, None)
            if body is None:
                self._early.add(mid)
            else:
                self.acked.add(body)

    def publish(self, topic: str, body: bytes) -> None:
        mid = self.client.publish(topic, body, qos=1).mid  # not under our lock
        with self._lock:
            if mid in self._early:
                self._early.discard(mid)
                self.acked.add(body)
            else:
                self._pending[mid] = body

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def say(began: float, text: str) -> None:
    print(f"t={time.monotonic() - began:5.1f}s  {text}", flush=True)


def outage(procs: Processes, redis_argv: list[str], r: redis.Redis, began: float,
           at: float, seconds: float, failures: list[BaseException]) -> None:
    """Take Redis away once, at ``at`` seconds, for ``seconds``; then bring it back."""
    try:
        time.sleep(max(0.0, began + at - time.monotonic()))
        procs.stop("redis")
        say(began, f"uplink outage: redis-server stopped for {seconds:g}s; the gateway "
                   "buffers locally")
        time.sleep(seconds)
        procs.start("redis", redis_argv)
        wait(lambda: bool(r.ping()), 10, "redis restart")
        say(began, "uplink back: redis-server restarted; the gateway catches up")
    except BaseException as exc:
        failures.append(exc)


def run(args: argparse.Namespace, work: Path, procs: Processes) -> int:
    mqtt_port, redis_port = free_port(), free_port()
    (work / "mosquitto.conf").write_text(
        f"listener {mqtt_port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
        f"persistence_location {work}/\nmax_queued_messages 0\nmax_inflight_messages 0\n")
    redis_argv = [binary("redis-server"), "--port", str(redis_port), "--bind", "127.0.0.1",
                  "--dir", str(work), "--save", "", "--appendonly", "yes"]
    config = work / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "gateway": {"id": "demo", "state_dir": str(work / "state")},
        "ingress": {"port": mqtt_port, "subscriptions": [{"topic": "sensors/#", "qos": 1}]},
        "forwarder": {"retry_max_delay": "2s"},
        "queue": {"type": "redis", "redis_url": f"redis://127.0.0.1:{redis_port}/0",
                  "request_queue_name": STREAM},
        "observability": {"listen": ""},
    }))
    gateway_log = work / "gateway.log"

    procs.start("mosquitto", [binary("mosquitto"), "-c", str(work / "mosquitto.conf")])
    procs.start("redis", redis_argv)
    r = redis.Redis(host="127.0.0.1", port=redis_port)
    wait(lambda: bool(r.ping()), 10, "redis")
    procs.start("gateway", [sys.executable, "-m", "gateway", "run", "-c", str(config)])
    wait(lambda: "ready: subscribed" in gateway_log.read_text(), 20, "gateway")
    began = time.monotonic()
    say(began, f"gateway running; {args.sensors} sensors publish {args.rate:g} readings/s "
               f"for {args.seconds:g}s")

    sensors = Sensors(mqtt_port)
    failures: list[BaseException] = []
    breaker = threading.Thread(target=outage, name="outage", args=(
        procs, redis_argv, r, began, args.seconds * 0.25, args.outage, failures))
    breaker.start()
    total = int(args.rate * args.seconds)
    for n in range(total):
        sensor = n % args.sensors
        body = orjson.dumps({"sensor": sensor, "n": n, "ts": time.time(),
                             "temp": round(20 + random.gauss(0, 2), 2)})
        sensors.publish(f"sensors/dev{sensor}/temp", body)
        time.sleep(max(0.0, began + (n + 1) / args.rate - time.monotonic()))
    breaker.join()
    if failures:
        raise failures[0]
    wait(lambda: len(sensors.acked) == total, 30, "broker acknowledgements")
    published_at = time.monotonic()
    say(began, f"published {total} readings; waiting for the catch-up")

    delivered: set[bytes] = set()

    def caught_up() -> bool:
        delivered.clear()
        delivered.update(fields[b"body"] for _, fields in r.xrange(STREAM))
        return delivered >= sensors.acked

    wait(caught_up, 60, "catch-up")
    entries = int(r.xlen(STREAM))
    say(began, f"caught up {time.monotonic() - published_at:.1f}s after the last reading")
    for line in gateway_log.read_text().splitlines():  # what the gateway said about it
        if "WARNING" in line and "uplink" in line:
            print(f"          gateway: {line.split(': ', 1)[-1]}")
    status = subprocess.run([sys.executable, "-m", "gateway", "status", "-c", str(config)],
                            capture_output=True, text=True, check=False)
    print(status.stdout, end="")
    sensors.close()
    acked = sensors.acked
    lost = len(acked - delivered)
    print(f"RESULT: published {total}, acknowledged by the broker {len(acked)}, delivered to "
          f"Redis {len(delivered & acked)} ({entries - len(delivered)} duplicate entries), "
          f"lost {lost}", flush=True)
    return 0 if lost == 0 and len(acked) == total else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sensors", type=int, default=10)
    ap.add_argument("--rate", type=float, default=200.0, help="readings per second, all sensors")
    ap.add_argument("--seconds", type=float, default=15.0, help="how long the sensors publish")
    ap.add_argument("--outage", type=float, default=6.0,
                    help="seconds Redis is down (once, a quarter of the way in)")
    args = ap.parse_args()
    if args.outage >= args.seconds * 0.75:
        ap.error("--outage must end before the sensors stop (at most 3/4 of --seconds)")

    work = Path(tempfile.mkdtemp(prefix="openhqm-demo-"))
    procs = Processes(work)
    code = 1
    try:
        code = run(args, work, procs)
    except DemoFailed as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
    finally:
        procs.stop_all()
        if code == 0:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"logs and data kept in {work}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
