"""Downlink benchmark: commands from a backend to a device, through the gateway daemon.

    python benchmarks/downlink_bench.py [--backend redis|kafka|sqs_moto|sqs_elasticmq|
                                         gcp_pubsub|azure_eventhubs|mqtt|custom]...
                                        [--samples 200] [--commands 2000]

For each backend (default: all):

1. A private mosquitto (the local broker) and the backend's server or fake start on free
   loopback ports, as the integration tests start them (tests/integration/downlink_clouds.py):
   redis-server, a Kafka broker from the test jars, moto or ElasticMQ, pstest
   ($PSTEST_BINARY), the Event Hubs test server, a second mosquitto, the example file plugin.
2. The daemon (``python -m gateway run``) runs with ``queue.downlink`` enabled; a device
   (paho, MQTT 5, QoS 1) subscribes to the command topics on the local broker.
3. Latency: ``--samples`` commands, one at a time: published at the backend by the cloud
   application, timed until the device received it (p50, p95, max). Each waits for the one
   before, so this is the path's latency, not a queue's.
4. Throughput: ``--commands`` commands published at once (3 devices); timed from the first
   publish until the device has them all, and until the backend holds none unacknowledged
   (where the backend can tell).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.gateway_process import GatewayProcess, gateway_config
from tests.integration.downlink_clouds import (
    BACKENDS,
    Cloud,
    Command,
    Device,
    make_cloud,
)
from tests.servers import mosquitto_server, wait_until


class Fixtures:
    """What the cloud makers ask pytest for, started here instead (once per run)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: dict[str, Any] = {}
        self.stack = contextlib.ExitStack()

    def getfixturevalue(self, name: str) -> Any:
        if name not in self.started:
            self.started[name] = self._start(name)
        return self.started[name]

    def _start(self, name: str) -> Any:
        if name == "kafka_broker":
            from tests.kafka_server import kafka_server

            server: Any = kafka_server(self.workdir / "kafka")
        elif name in ("moto_sqs", "elasticmq"):
            from tests.sqs_servers import elasticmq_server, moto_sqs_server

            server = (moto_sqs_server if name == "moto_sqs" else elasticmq_server)(
                self.workdir / name)
        elif name == "pubsub_emulator":
            from tests.pubsub_server import pubsub_fake

            server = pubsub_fake(self.workdir / "pstest")
        elif name == "eventhubs_server":
            from tests.eventhubs_server import EventHubsServer
            from tests.servers import free_port

            server = EventHubsServer({}, port=free_port())
        elif name == "sqs_env":
            from tests.sqs_servers import DUMMY_AWS_ENV

            os.environ.update(DUMMY_AWS_ENV)
            return None
        else:
            raise KeyError(name)
        server.start()
        self.stack.callback(server.stop)
        if name == "pubsub_emulator":
            os.environ["PUBSUB_EMULATOR_HOST"] = server.host
        return server

    def close(self) -> None:
        self.stack.close()


class TimedDevice(Device):
    def __post_init__(self) -> None:
        self.arrivals: list[float] = []
        super().__post_init__()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self.arrivals.append(time.perf_counter())
        super()._on_message(client, userdata, msg)


async def bench(name: str, fixtures: Fixtures, workdir: Path, samples: int,
                commands: int) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    tmp = workdir / name
    tmp.mkdir()
    local = mosquitto_server(tmp / "local")
    local.start()
    cloud: Cloud = await make_cloud(name, tag, tmp, fixtures)  # type: ignore[arg-type]
    gw = GatewayProcess(gateway_config(tmp, local.port, f"gw/{tag}", cloud.queue,
                                       logging={"level": "WARNING"}), tmp, env=cloud.env)
    device = TimedDevice(local.port, f"dl/{tag}/#")
    try:
        gw.start(wait_ready=False)
        await asyncio.sleep(1.0)
        await cloud.send([Command("d0", -1)])  # warm-up: connections, consumer groups
        await asyncio.to_thread(wait_until, lambda: len(device.received) >= 1, 60, "warm-up")
        latencies = []
        for n in range(samples):
            before = len(device.received)
            sent = time.perf_counter()
            await cloud.send([Command("d0", n)])
            # the arrival time is taken in paho's callback; waiting here only paces the loop
            await asyncio.to_thread(wait_until, lambda b=before: len(device.received) > b, 60,
                                    "the command")
            latencies.append(device.arrivals[before] - sent)
        before = len(device.received)
        batch = [Command(f"d{k % 3}", k) for k in range(commands)]
        started = time.perf_counter()
        await cloud.send(batch)
        published = time.perf_counter() - started
        await asyncio.to_thread(wait_until, lambda: len(device.received) >= before + commands,
                                300, "every command")
        delivered = device.arrivals[-1] - started
        acked = None
        if cloud.depth is not None:
            for _ in range(6000):  # 5 minutes at most
                if await cloud.depth() == 0:
                    break
                await asyncio.sleep(0.05)
            acked = time.perf_counter() - started
        return {"backend": name, "p50_ms": statistics.median(latencies) * 1000,
                "p95_ms": sorted(latencies)[int(len(latencies) * 0.95) - 1] * 1000,
                "max_ms": max(latencies) * 1000, "publish_s": published,
                "rate": commands / delivered, "acked_s": acked}
    finally:
        device.close()
        gw.stop()
        for close in reversed(cloud.cleanup):
            await close()
        local.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", action="append", choices=BACKENDS)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--commands", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="downlink-bench-") as tmp:
        fixtures = Fixtures(Path(tmp))
        try:
            for name in args.backend or BACKENDS:
                r = await bench(name, fixtures, Path(tmp), args.samples, args.commands)
                acked = "-" if r["acked_s"] is None else f"{r['acked_s']:.2f}s"
                print(f"{name:16s} latency p50 {r['p50_ms']:6.1f} ms  p95 {r['p95_ms']:6.1f} ms  "
                      f"max {r['max_ms']:6.1f} ms   {args.commands} commands: "
                      f"{r['rate']:7.0f}/s at the device (cloud publish {r['publish_s']:.2f}s, "
                      f"all acknowledged at {acked})", flush=True)
        finally:
            fixtures.close()


if __name__ == "__main__":
    asyncio.run(main())
