"""The daemon's HTTP endpoint and its systemd protocol, against real servers."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.gateway_process import GatewayProcess, Publisher, gateway_config
from tests.servers import ServerProcess, wait_until

pytestmark = pytest.mark.integration


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def test_metrics_health_readiness_and_status_page(tmp_path: Path, mosquitto: ServerProcess,
                                                  redis: ServerProcess) -> None:
    root = f"obs/{uuid.uuid4().hex[:8]}"
    queue = {"type": "redis", "redis_url": f"redis://127.0.0.1:{redis.port}/0",
             "request_queue_name": f"{root}-stream"}
    config = gateway_config(tmp_path, mosquitto.port, root, queue,
                            observability={"stuck_no_ack": "2s"})
    gw = GatewayProcess(config, tmp_path)
    gw.start()
    base = gw.http_url()
    assert get(f"{base}/healthz") == (200, "ok\n")
    wait_until(lambda: get(f"{base}/readyz")[0] == 200, 10, "ready")
    pub = Publisher(mosquitto.port)
    for n in range(50):
        pub.publish(f"{root}/t", b"%d" % n)
    pub.wait_all_acked(50)
    wait_until(lambda: metric(get(f"{base}/metrics")[1],
                              'openhqm_gateway_uplinked_total{uplink="default"}') == 50,
               20, "50 uplinked")
    text = get(f"{base}/metrics")[1]
    assert metric(text, "openhqm_gateway_ingress_received_total") == 50
    assert metric(text, 'openhqm_gateway_backlog_messages{uplink="default"}') == 0
    assert 'openhqm_gateway_uplink_state{uplink="default",type="redis",state="online"} 1' in text
    # The uplink goes away while messages keep coming: connected is not ready.
    redis.stop()
    for n in range(10):
        pub.publish(f"{root}/t", b"late%d" % n)
    pub.wait_all_acked(60)
    wait_until(lambda: get(f"{base}/readyz")[0] == 503, 20, "readyz reports stuck")
    status, body = get(f"{base}/readyz")
    assert "uplink redis stuck" in body and "messages waiting" in body
    status, page = get(f"{base}/")
    assert status == 200 and "OpenHQM Edge Gateway" in page and "ATTENTION" in page
    assert get(f"{base}/nope")[0] == 404
    redis.start()
    wait_until(lambda: get(f"{base}/readyz")[0] == 200, 30, "ready again after the outage")
    assert gw.stop() == 0
    pub.close()


def test_sd_notify_ready_watchdog_stopping(tmp_path: Path, mosquitto: ServerProcess,
                                           redis: ServerProcess) -> None:
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(15)
    root = f"sd/{uuid.uuid4().hex[:8]}"
    queue = {"type": "redis", "redis_url": f"redis://127.0.0.1:{redis.port}/0"}
    config = gateway_config(tmp_path, mosquitto.port, root, queue)
    gw = GatewayProcess(config, tmp_path, env={"NOTIFY_SOCKET": str(notify_path),
                                               "WATCHDOG_USEC": "400000"})
    gw.start()
    seen: list[str] = []
    try:
        while not ("READY=1" in seen and seen.count("WATCHDOG=1") >= 3):
            seen.append(sock.recv(256).decode())
        assert gw.stop() == 0
        while "STOPPING=1" not in seen:
            seen.append(sock.recv(256).decode())
    finally:
        sock.close()
    assert seen.index("READY=1") < seen.index("STOPPING=1")
