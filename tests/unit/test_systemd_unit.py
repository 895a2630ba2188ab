"""The shipped unit passes `systemd-analyze verify`, and the notify helpers speak the protocol."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from gateway.observability.systemd import sd_notify, watchdog_interval
from tests.servers import require_binary

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "openhqm-gateway.service"


def test_unit_verifies(tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze", "apt-get install systemd")
    # verify also checks that ExecStart exists: point it at a stand-in of the installed path.
    exe = tmp_path / "openhqm-gateway"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    text = UNIT.read_text()
    assert "/opt/openhqm-gateway/bin/openhqm-gateway" in text
    unit = tmp_path / "openhqm-gateway.service"
    unit.write_text(text.replace("/opt/openhqm-gateway/bin/openhqm-gateway", str(exe)))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          check=False, timeout=60)
    problems = [line for line in (done.stdout + done.stderr).splitlines()
                if "openhqm-gateway.service" in line]
    assert done.returncode == 0 and not problems, done.stdout + done.stderr
    for key in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "StateDirectory=",
                "ConfigurationDirectory=", "ProtectSystem=strict", "NoNewPrivileges=yes",
                "PrivateTmp=yes", "LoadCredential=", "User=openhqm-gateway",
                "ExecReload=/bin/kill -HUP $MAINPID"):
        assert key in text


def test_sd_notify_sends_datagrams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sd_notify("READY=1") is True
        assert sock.recv(64) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sd_notify("READY=1") is False


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None  # meant for another process
