"""Run the real daemon (``python -m gateway run``) as a child process, and an MQTT publisher
that records which messages the broker acknowledged."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from tests.servers import wait_until

REPO = Path(__file__).resolve().parents[1]


def gateway_config(tmp: Path, mqtt_port: int, topic_root: str, queue: dict[str, Any] | None,
                   **sections: dict[str, Any]) -> Path:
    """A daemon's config file: the given ``queue:`` section (None: pass ``uplinks=...``
    instead) and any other sections' keys over the test defaults."""
    cfg: dict[str, Any] = {
        "gateway": {"id": f"test-{uuid.uuid4().hex[:8]}", "state_dir": str(tmp / "state")},
        "ingress": {"port": mqtt_port, "subscriptions": [{"topic": f"{topic_root}/#", "qos": 1}],
                    "reconnect_min_delay": "100ms", "reconnect_max_delay": "1s"},
        "forwarder": {"retry_min_delay": "100ms", "retry_max_delay": "1s",
                      "publish_timeout": "5s"},
        **({"queue": queue} if queue is not None else {}),
        "logging": {"level": "INFO"},
        "observability": {"listen": "127.0.0.1:0"},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


#: daemons started and not stopped yet: a failing test's are killed at teardown (conftest)
LIVE: set[GatewayProcess] = set()


def reap() -> None:
    """Kill every daemon a test left running (it failed before stopping it)."""
    for gw in list(LIVE):
        if gw.proc is not None and gw.proc.poll() is None:
            gw.proc.kill()
            gw.proc.wait(10)
        gw.proc = None
    LIVE.clear()


class GatewayProcess:
    def __init__(self, config: Path, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log_path = workdir / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra_env = env or {}

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "gateway", "-c", str(self.config), *args],
                                cwd=REPO, capture_output=True, text=True, timeout=60,
                                env=_env(), check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"{args} exited {result.returncode}: {result.stderr}")
        return result

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = orjson.loads(self.cli("status", "--json").stdout)
        return data

    def start(self, wait_ready: bool = True) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "-c", str(self.config), "run"],
                                     cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                     env={**_env(), **self.extra_env})
        LIVE.add(self)
        log.close()
        if wait_ready:
            wait_until(lambda: self._alive() and "ready: subscribed" in self.log(), 20,
                       "gateway ready")

    def http_url(self) -> str:
        """The base URL of the daemon's observability endpoint (from its start-up log)."""
        match = re.findall(r"metrics and health on (https?://[0-9.:]+)/", self.log())
        if not match:
            raise AssertionError(f"no observability endpoint in the log:\n{self.log()}")
        return str(match[-1])

    def _alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"gateway exited early:\n{self.log()}")
        return True

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None
        LIVE.discard(self)

    def stop(self, timeout: float = 30) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"gateway did not stop within {timeout}s:\n{self.log()}") from None
        self.proc = None
        LIVE.discard(self)
        return code

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENHQM_")}
    env["PYTHONPATH"] = str(REPO)
    return env


@dataclass
class Publisher:
    """paho publisher at QoS 1; ``acked`` holds the payloads the broker acknowledged."""

    port: int
    acked: list[bytes] = field(default_factory=list)
    _pending: dict[int, bytes] = field(default_factory=dict)
    _early: set[int] = field(default_factory=set)  # acks that beat publish() returning
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        if reason.is_failure:
            return
        with self._lock:
            payload = self._pending.pop(mid, None)
            if payload is None:
                self._early.add(mid)
            else:
                self.acked.append(payload)

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        # paho calls on_publish from its network thread while holding its own locks: never
        # hold ours across client.publish().
        info = self.client.publish(topic, payload, qos=qos)
        with self._lock:
            if info.mid in self._early:
                self._early.discard(info.mid)
                self.acked.append(payload)
            else:
                self._pending[info.mid] = payload

    def wait_all_acked(self, n: int, timeout: float = 30) -> None:
        wait_until(lambda: len(self.acked) >= n, timeout, f"{n} PUBACKs")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
