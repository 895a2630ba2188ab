"""Fleet scale check: many gateways, each its own process and store, into one Kafka broker.

    python benchmarks/fleet_bench.py [--gateways 50] [--messages 200] [--idle-seconds 30]
                                     [--partitions 6] [--json PATH]

What happens:

1. One mosquitto (the gateways share it, each subscribes to its own ``fleet/<id>/#``) and one
   single-node Kafka broker (the jars of scripts/kafka/fetch-jars.sh) start on free loopback
   ports in a temp dir; the topic ``fleet`` is created with ``--partitions``.
2. ``--gateways`` daemons start (``python -m gateway run``), each with its own config, state
   directory and store, ``gateway.id`` = ``gw-NNN``, the Kafka uplink with its defaults.
3. **Idle**: once every daemon is ready and has settled (5 s), their CPU (utime + stime from
   /proc) is measured over ``--idle-seconds`` and their RSS summed: what a fleet of idle
   gateways costs a host, and each gateway its device.
4. **Load**: ``--messages`` QoS 1 readings per gateway are published to its topics (10 devices
   each). When the topic holds them all, every record is read back: each must carry the
   ``openhqm_gateway_id`` header of the gateway whose topic it came from (the payload names it),
   nothing lost, duplicates counted.

Prints the idle figures (summed and per gateway), the RSS, the CPU per message under load,
and the check's outcome; exits 1 if anything was lost or not attributable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from benchmarks.soak_bench import proc_sample
from gateway.message import ATTR_GATEWAY_ID
from gateway.uplinks.kafka.settings import KafkaSettings
from gateway.uplinks.kafka.uplink import KafkaQueue
from tests.gateway_process import GatewayProcess, Publisher, gateway_config
from tests.kafka_read import end_offsets, read_topic
from tests.kafka_server import kafka_server, missing_requirements
from tests.servers import mosquitto_server, wait_until

TOPIC = "fleet"
DEVICES = 10


def start_fleet(args: argparse.Namespace, tmp: Path, mqtt_port: int,
                bootstrap: str) -> list[tuple[str, GatewayProcess]]:
    fleet: list[tuple[str, GatewayProcess]] = []
    queue = {"type": "kafka", "kafka_bootstrap_servers": bootstrap, "request_queue_name": TOPIC}
    for i in range(args.gateways):
        gw_id = f"gw-{i:03d}"
        work = tmp / gw_id
        work.mkdir()
        config = gateway_config(work, mqtt_port, f"fleet/{gw_id}", queue,
                                gateway={"id": gw_id})
        gw = GatewayProcess(config, work)
        gw.start(wait_ready=False)
        fleet.append((gw_id, gw))
    for _, gw in fleet:  # started all at once; now each must say it subscribed
        wait_until(lambda gw=gw: "ready: subscribed" in gw.log() or _exited(gw), 180,
                   "every gateway ready")
        if _exited(gw):
            raise SystemExit(f"a gateway exited:\n{gw.log()}")
    return fleet


def _exited(gw: GatewayProcess) -> bool:
    return gw.proc is None or gw.proc.poll() is not None


def pids(fleet: list[tuple[str, GatewayProcess]]) -> list[int]:
    return [gw.proc.pid for _, gw in fleet if gw.proc is not None]


def totals(fleet: list[tuple[str, GatewayProcess]]) -> tuple[float, float]:
    """Summed CPU seconds and RSS (MB) of the fleet now."""
    samples = [proc_sample(pid) for pid in pids(fleet)]
    return sum(s["cpu_s"] for s in samples), sum(s["rss_mb"] for s in samples)


def publish(mqtt_port: int, fleet: list[tuple[str, GatewayProcess]], per_gateway: int) -> int:
    pub = Publisher(mqtt_port)
    try:
        for n in range(per_gateway):
            for gw_id, _ in fleet:
                payload = orjson.dumps({"gw": gw_id, "n": n, "temp": 20.5})
                pub.publish(f"fleet/{gw_id}/dev-{n % DEVICES}/temp", payload)
        total = per_gateway * len(fleet)
        wait_until(lambda: len(pub.acked) >= total, 120, "every reading acknowledged")
        return len(pub.acked)
    finally:
        pub.close()


def check(bootstrap: str, expected: int) -> dict[str, Any]:
    wait_until(lambda: sum(end_offsets(bootstrap, TOPIC).values()) >= expected, 300,
               "every reading in Kafka")
    records = read_topic(bootstrap, TOPIC, timeout=120)
    seen: Counter[tuple[str, int]] = Counter()
    wrong = 0
    for record in records:
        body = orjson.loads(record.value)
        headers = dict(record.headers)
        if headers.get(ATTR_GATEWAY_ID, b"").decode() != body["gw"]:
            wrong += 1
        seen[(body["gw"], body["n"])] += 1
    return {"records": len(records), "unique": len(seen),
            "duplicates": sum(c - 1 for c in seen.values()), "not_attributable": wrong,
            "gateways_seen": len({gw for gw, _ in seen})}


async def create_topic(bootstrap: str, partitions: int) -> None:
    async with KafkaQueue(KafkaSettings(kafka_bootstrap_servers=bootstrap)) as admin:
        await admin.create_queue(TOPIC, partitions=partitions)


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    broker = mosquitto_server(tmp / "mosquitto")
    kafka = kafka_server(tmp / "kafka")
    broker.start()
    kafka.start()
    fleet: list[tuple[str, GatewayProcess]] = []
    try:
        asyncio.run(create_topic(kafka.bootstrap, args.partitions))
        t0 = time.monotonic()
        fleet = start_fleet(args, tmp, broker.port, kafka.bootstrap)
        started = time.monotonic() - t0
        time.sleep(5.0)
        cpu0, _ = totals(fleet)
        time.sleep(args.idle_seconds)
        cpu1, rss_idle = totals(fleet)
        idle_cpu = (cpu1 - cpu0) / args.idle_seconds  # cores
        sent = publish(broker.port, fleet, args.messages)
        outcome = check(kafka.bootstrap, sent)
        cpu2, rss_load = totals(fleet)
        return {
            "gateways": len(fleet), "start_seconds": round(started, 1),
            "idle_cpu_percent_of_one_core": round(idle_cpu * 100, 2),
            "idle_cpu_percent_per_gateway": round(idle_cpu * 100 / len(fleet), 3),
            "rss_mb_idle_total": round(rss_idle, 1),
            "rss_mb_idle_per_gateway": round(rss_idle / len(fleet), 1),
            "rss_mb_after_load_total": round(rss_load, 1),
            "published": sent, **outcome,
            "lost": sent - outcome["unique"],
            "cpu_us_per_message_under_load": round((cpu2 - cpu1) / max(1, sent) * 1e6, 1),
        }
    finally:
        for _, gw in fleet:
            if gw.proc is not None:
                gw.proc.terminate()
        for _, gw in fleet:
            if gw.proc is not None:
                gw.proc.wait(30)
                gw.proc = None
        kafka.stop()
        broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gateways", type=int, default=50)
    ap.add_argument("--messages", type=int, default=200, help="per gateway")
    ap.add_argument("--idle-seconds", type=float, default=30.0)
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    missing = missing_requirements()
    if missing:
        raise SystemExit(missing)
    tmp = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    try:
        result = run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["machine"] = f"{os.cpu_count()} cores, python {sys.version.split()[0]}"
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if result["lost"] or result["not_attributable"] or result["gateways_seen"] != args.gateways:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
