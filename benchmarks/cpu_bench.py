"""CPU per message at a steady rate: the gateway daemon against the client libraries alone.

    python benchmarks/cpu_bench.py [--rate 1000] [--seconds 60] [--commit-interval-ms 20]
                                   [--linger 0 [0.25 ...]]

A private mosquitto and redis-server start on free loopback ports. A paho publisher sends
``--rate`` QoS 1 sensor readings per second (~75 bytes of JSON, 10 topics, in 10 ms slices,
as ``soak_bench.py`` does) for ``--seconds``, three times, each to one consumer process whose
CPU (utime + stime from /proc) is measured from its first to its last message:

1. **gateway**: the daemon (``python -m gateway run``, ``durability: full``, the Redis uplink
   with its default settings), MQTT in -> store -> XADD. Once per ``--linger`` value
   (``forwarder.linger``, seconds; default 0 only), each against the first.
2. **clients floor**: a Python process with the same two client libraries and nothing else:
   paho subscribes (QoS 1, MQTT 5, acknowledges on receipt), and every commit interval the
   messages received are XADDed to Redis with redis-py's asyncio pipeline, with the fields the
   gateway writes (id, body, attributes as JSON, timestamp, priority). No store, no fsync: what
   any Python gateway built on these libraries pays per message.
3. **MQTT alone**: the same paho subscriber, sending nothing on: the MQTT client's share.

Prints CPU microseconds per message for each, and the gateway's against the floor (issue
#14's target: <= 40 us per message on this machine). The gateway's ingress is its own MQTT 5
codec on asyncio (gateway/ingress/), not paho, so it can cost less than the floor: the floor is
what the usual Python client libraries cost, and "MQTT alone" what receiving costs with paho.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
import redis as redis_py

from benchmarks.soak_bench import TOPICS, Load, proc_sample
from tests.gateway_process import GatewayProcess, gateway_config
from tests.servers import mosquitto_server, redis_server, wait_until

STREAM = "cpu-bench"


class FloorClient:
    """paho receiving (QoS 1, acknowledged on receipt) and, with ``forward``, redis-py
    XADDing what arrived every commit interval: the two client libraries and nothing else."""

    def __init__(self, mqtt_port: int, root: str, *, forward: bool) -> None:
        import paho.mqtt.client as paho

        self.forward = forward
        self.lock = threading.Lock()
        self.pending: list[tuple[str, bytes]] = []
        self.got = 0
        self.expect = 1 << 62  # until the parent says how many were published
        self.first: dict[str, float] = {}
        self.done = threading.Event()
        subscribed = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5,
                                  client_id=f"floor-{uuid.uuid4().hex[:6]}")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", mqtt_port)
        self.client.subscribe(f"{root}/#", qos=1)
        self.client.loop_start()
        subscribed.wait(10)

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        if not self.first:
            self.first.update(proc_sample(os.getpid()))
        with self.lock:
            if self.forward:
                self.pending.append((msg.topic, msg.payload))
            self.got += 1
            if self.got >= self.expect:
                self.done.set()

    def expect_from_stdin(self) -> None:
        line = sys.stdin.readline()
        with self.lock:
            self.expect = int(line)
            if self.got >= self.expect:
                self.done.set()

    async def uplink(self, redis_port: int, commit_ms: int) -> None:
        import redis.asyncio as redis_async

        r = redis_async.Redis(host="127.0.0.1", port=redis_port)
        n = 0
        while not self.done.is_set() or self.pending:
            await asyncio.sleep(commit_ms / 1000)
            with self.lock:
                batch, self.pending = self.pending, []
            if not batch:
                continue
            pipe = r.pipeline(transaction=False)
            now = time.time()
            for topic, body in batch:
                n += 1
                pipe.xadd(STREAM, {"id": f"{n:032x}", "body": body,
                                   "attributes": orjson.dumps({"mqtt_topic": topic,
                                                               "mqtt_qos": "1"}),
                                   "timestamp": repr(now), "priority": "0"})
            await pipe.execute()
        await r.aclose()


def floor_child(mqtt_port: int, redis_port: int, root: str, commit_ms: int, *,
                forward: bool) -> None:
    """The clients floor (or MQTT alone): reads from stdin how many messages were published,
    runs until they all arrived (and went on to Redis), then prints its CPU seconds and that
    count as JSON."""
    floor = FloorClient(mqtt_port, root, forward=forward)
    threading.Thread(target=floor.expect_from_stdin, daemon=True).start()
    print("ready", flush=True)
    if forward:
        asyncio.run(floor.uplink(redis_port, commit_ms))
    else:
        floor.done.wait()
    end = proc_sample(os.getpid())
    floor.client.loop_stop()
    print(json.dumps({"cpu_s": end["cpu_s"] - floor.first["cpu_s"], "messages": floor.got}),
          flush=True)


def publish(mqtt_port: int, root: str, rate: int, seconds: float) -> int:
    load = Load(mqtt_port, root, rate)
    load.start()
    time.sleep(seconds)
    load.halt.set()
    load.join(10)
    wait_until(lambda: load.acked >= load.sent, 60, "every publish acknowledged")
    return load.sent


def run_floor(args: argparse.Namespace, mqtt_port: int, redis_port: int, forward: bool) -> float:
    root = f"cpu/{uuid.uuid4().hex[:6]}"
    child = subprocess.Popen(
        [sys.executable, __file__, "--floor-child", json.dumps(
            {"mqtt_port": mqtt_port, "redis_port": redis_port, "root": root,
             "commit_ms": args.commit_interval_ms, "forward": forward})],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    sent = publish(mqtt_port, root, args.rate, args.seconds)
    try:
        out, _ = child.communicate(f"{sent}\n", timeout=60)
    except subprocess.TimeoutExpired:
        child.kill()
        raise
    result = json.loads(out.strip().splitlines()[-1])
    assert result["messages"] == sent, (result, sent)
    return result["cpu_s"] / result["messages"] * 1e6


def run_gateway(args: argparse.Namespace, tmp: Path, mqtt_port: int, redis_port: int,
                linger: float) -> float:
    tmp.mkdir(parents=True, exist_ok=True)
    root = f"cpu/{uuid.uuid4().hex[:6]}"
    queue = {"type": "redis", "redis_url": f"redis://127.0.0.1:{redis_port}/0",
             "request_queue_name": STREAM}
    config = gateway_config(tmp, mqtt_port, root, queue, logging={"level": "INFO"},
                            store={"commit_interval_ms": args.commit_interval_ms},
                            forwarder={"linger": linger})
    gw = GatewayProcess(config, tmp)
    gw.start()
    assert gw.proc is not None
    time.sleep(1.0)
    base = proc_sample(gw.proc.pid)
    sent = publish(mqtt_port, root, args.rate, args.seconds)
    stream = redis_py.Redis(host="127.0.0.1", port=redis_port)
    wait_until(lambda: stream.xlen(STREAM) >= sent, 60, "everything uplinked")
    stream.close()
    end = proc_sample(gw.proc.pid)
    gw.stop()
    return (end["cpu_s"] - base["cpu_s"]) / sent * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--commit-interval-ms", type=int, default=20)
    ap.add_argument("--linger", type=float, nargs="+", default=[0.0],
                    help="forwarder.linger in seconds; several values run the gateway once each")
    ap.add_argument("--floor-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.floor_child:
        floor_child(**json.loads(args.floor_child))
        return
    tmp = Path(tempfile.mkdtemp(prefix="cpu-bench-"))
    broker, redis = mosquitto_server(tmp / "mosquitto"), redis_server(tmp / "redis")
    broker.start()
    redis.start()
    try:
        gateways = {linger: run_gateway(args, tmp / f"gw-{i}", broker.port, redis.port, linger)
                    for i, linger in enumerate(args.linger)}
        clients = run_floor(args, broker.port, redis.port, forward=True)
        mqtt_only = run_floor(args, broker.port, redis.port, forward=False)
    finally:
        broker.stop()
        redis.stop()
    print(f"{args.rate} msg/s of ~75-byte readings over {TOPICS} topics for {args.seconds:g} s, "
          f"commit interval {args.commit_interval_ms} ms; CPU per message:")
    gateway = gateways[args.linger[0]]
    for linger, cpu in gateways.items():
        label = "gateway (MQTT -> store -> Redis)" + (f", linger {linger:g} s" if linger else "")
        against = f"  ({cpu / gateway:.2f} of the first)" if linger != args.linger[0] else ""
        print(f"  {label:46s} {cpu:7.1f} us{against}")
    print(f"  {'clients floor (paho + redis-py)':46s} {clients:7.1f} us")
    print(f"  {'MQTT alone (paho)':46s} {mqtt_only:7.1f} us")
    print(f"gateway / clients floor: {gateway / clients:.2f}; gateway minus floor: "
          f"{gateway - clients:+.1f} us (store, forwarder and daemon, less what the gateway's own "
          f"MQTT codec saves against paho)")
    print(f"issue #14's target, <= 40 us per message, against paho alone here: "
          f"{mqtt_only:.0f} us")


if __name__ == "__main__":
    main()
