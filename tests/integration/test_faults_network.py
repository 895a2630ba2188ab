"""Network faults on both links, through tests/faultproxy.py: gateway <-> Redis (the uplink)
and broker <-> gateway (the ingress). Modes: cut (RST), blackhole (silence, no RST), slow
(latency and a bandwidth cap) and flapping (up/cut on a period).

Every test publishes steadily before, during and after the fault and then checks: every
message the broker acknowledged reaches Redis, per-topic order holds, nothing is dropped or
dead-lettered, and the daemon is still running.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.faultproxy import FaultProxy, Mode
from tests.gateway_process import GatewayProcess, Publisher, gateway_config
from tests.integration.test_end_to_end import read_stream
from tests.integration.test_faults_crash import SteadyPublisher, delivered_report_wait
from tests.servers import ServerProcess, wait_until

pytestmark = pytest.mark.integration

FAULT_SECONDS = 2.0
RATE = 300

SCENARIOS: dict[str, dict[str, Any]] = {
    "cut": {},
    "blackhole": {},
    "slow": {"delay": 0.05, "rate": 20_000},
    "flapping": {"up_seconds": 0.4, "down_seconds": 0.4},
}


@dataclass
class Owned:
    """Proxies and daemons of one test, stopped at teardown even when the test failed."""

    proxies: list[FaultProxy] = field(default_factory=list)
    gateways: list[GatewayProcess] = field(default_factory=list)

    def proxy(self, port: int) -> FaultProxy:
        proxy = FaultProxy(port, lifetime=120).start()
        self.proxies.append(proxy)
        return proxy

    def gateway(self, gw: GatewayProcess) -> GatewayProcess:
        self.gateways.append(gw)
        return gw


@pytest.fixture
def owned() -> Iterator[Owned]:
    things = Owned()
    yield things
    for gw in things.gateways:
        if gw.proc is not None:
            gw.kill()
    for proxy in things.proxies:
        proxy.stop()


def make_gateway(tmp_path: Path, ingress_port: int, redis_port: int, root: str) -> GatewayProcess:
    queue = {"type": "redis", "redis_url": f"redis://127.0.0.1:{redis_port}/0",
             "request_queue_name": f"{root}-stream", "redis_socket_timeout": "1s"}
    config = gateway_config(tmp_path, ingress_port, root, queue,
                            ingress={"keepalive": "1s"},
                            forwarder={"publish_timeout": "2s", "retry_max_delay": "500ms"})
    return GatewayProcess(config, tmp_path)


def run_with_fault(gw: GatewayProcess, mosquitto: ServerProcess, proxy: FaultProxy, root: str,
                   mode: Mode) -> Publisher:
    """Steady publishing: 0.5 s healthy, FAULT_SECONDS with the fault, 0.5 s healthy again."""
    pub = Publisher(mosquitto.port)
    steady = SteadyPublisher(pub, root, rate=RATE)
    steady.start()
    try:
        time.sleep(0.5)
        proxy.set_mode(mode, **SCENARIOS[mode])
        time.sleep(FAULT_SECONDS)
        proxy.set_mode("up")
        time.sleep(0.5)
    finally:
        steady.halt()
    pub.wait_all_acked(steady.sent)
    return pub


def check_outcome(gw: GatewayProcess, pub: Publisher, redis_port: int, root: str, *,
                  mode: Mode, proxy: FaultProxy) -> None:
    report = delivered_report_wait(redis_port, f"{root}-stream", pub.acked)
    status = gw.status()["uplinks"]["default"]
    print(f"\n{mode}: {len(pub.acked)} acknowledged, {report}, proxy {proxy.stats}")
    assert status["dropped"] == {} and status["dead_letter"] == 0
    assert gw.proc is not None and gw.proc.poll() is None, "the daemon keeps running"
    assert gw.stop() == 0
    pub.close()


@pytest.mark.parametrize("mode", list(SCENARIOS))
def test_uplink_fault(tmp_path: Path, mosquitto: ServerProcess, redis: ServerProcess,
                      owned: Owned, mode: Mode) -> None:
    root = f"upl/{mode}/{uuid.uuid4().hex[:8]}"
    proxy = owned.proxy(redis.port)
    gw = owned.gateway(make_gateway(tmp_path, mosquitto.port, proxy.port, root))
    gw.start()
    stream = f"{root}-stream"
    if mode in ("cut", "blackhole"):
        # while the uplink is gone, ingest goes on into the store
        pub = Publisher(mosquitto.port)
        proxy.set_mode(mode)
        for n in range(100):
            pub.publish(f"{root}/held", orjson.dumps({"n": n, "held": True}))
        pub.wait_all_acked(100)
        wait_until(lambda: gw.status()["uplinks"]["default"]["depth"] >= 100, 20,
                   "buffered while the uplink is down")
        assert read_stream(redis.port, stream) == []
        proxy.set_mode("up")
        wait_until(lambda: len(read_stream(redis.port, stream)) >= 100, 30, "caught up")
        pub.close()
    pub = run_with_fault(gw, mosquitto, proxy, root, mode)
    check_outcome(gw, pub, redis.port, root, mode=mode, proxy=proxy)


@pytest.mark.parametrize("mode", ["cut", "blackhole", "flapping"])
def test_ingress_fault(tmp_path: Path, mosquitto: ServerProcess, redis: ServerProcess,
                       owned: Owned, mode: Mode) -> None:
    root = f"ing/{mode}/{uuid.uuid4().hex[:8]}"
    proxy = owned.proxy(mosquitto.port)
    gw = owned.gateway(make_gateway(tmp_path, proxy.port, redis.port, root))
    gw.start()
    pub = run_with_fault(gw, mosquitto, proxy, root, mode)
    check_outcome(gw, pub, redis.port, root, mode=mode, proxy=proxy)
