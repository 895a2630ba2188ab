"""Real servers for tests, started as child processes on free loopback ports.

Each server gets its own config and data directory under the test's tmp dir, is waited for
until it really answers (not just a TCP connect), and is stopped afterwards. A missing
binary skips the test locally and fails it when CI=true: CI must never pass by skipping.
"""

from __future__ import annotations

import contextlib
import ctypes
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Protocol, TypeVar

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def require_binary(name: str, hint: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None)
    if path is None:
        message = f"{name} is not installed ({hint})"
        if IN_CI:
            pytest.fail(f"CI must run integration tests: {message}")
        pytest.skip(message)
    return path


try:
    _prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl  # loaded before any fork
except (OSError, AttributeError):
    _prctl = None


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the test process dies, even by SIGKILL or
    an outer `timeout`, so no server outlives its test run. Only one syscall runs here."""
    if _prctl is not None:
        _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout}s")


@dataclass
class ServerProcess:
    name: str
    argv: list[str]
    workdir: Path
    port: int
    ready: Callable[[ServerProcess], bool]
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.workdir / f"{self.name}.log"

    def start(self, timeout: float = 20.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(self.argv, cwd=self.workdir, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent)  # noqa: PLW1509
        log.close()
        try:
            wait_until(lambda: self._alive() and self.ready(self), timeout, self.name)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"{self.name} did not start; log:\n{self.log_text()}") from None

    def _alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited; log:\n{self.log_text()}")
        return True

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return "<no log>"


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def mosquitto_server(workdir: Path, port: int | None = None, extra_conf: str = "") -> ServerProcess:
    binary = require_binary("mosquitto", "apt-get install mosquitto")
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence true\n"
        f"persistence_location {workdir}/\n"
        "autosave_interval 1\n"
        "max_queued_messages 0\n"
        "max_inflight_messages 0\n"
        "max_packet_size 16777216\n"
        "message_size_limit 0\n"
        "log_type error\nlog_type warning\n"
        # As root mosquitto drops to the user 'mosquitto', which cannot write its persistence
        # file into this test's private directory: a restarted broker then forgot every queued
        # message ("Error: Permission denied" every autosave), and restart tests flaked. It
        # stays the test's user (a user line in extra_conf would be a duplicate: an error).
        + f"user {getpass.getuser()}\n"
        + extra_conf)
    server = ServerProcess("mosquitto", [binary, "-c", str(conf)], workdir, port,
                           lambda s: _mqtt_ready(s.port))
    return server


def _mqtt_ready(port: int) -> bool:
    if not _port_open(port):
        return False
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            # MQTT 3.1.1 CONNECT, clean session, client id "ready"
            s.sendall(bytes([0x10, 17, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 10, 0, 5]) + b"ready")
            return s.recv(4)[:1] == b"\x20"
    except OSError:
        return False


def redis_server(workdir: Path, port: int | None = None) -> ServerProcess:
    binary = require_binary("redis-server", "apt-get install redis-server")
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
            "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
            "--protected-mode", "yes", "--daemonize", "no"]
    return ServerProcess("redis", argv, workdir, port, lambda s: _redis_ready(s.port))


def _redis_ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def running(server: ServerProcess) -> Iterator[ServerProcess]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


class _Startable(Protocol):
    def start(self, timeout: float = ...) -> None: ...
    def stop(self, sig: int = ...) -> None: ...


S = TypeVar("S", bound=_Startable)


class SharedServer(Generic[S]):
    """One server per test session, however many fixtures ask for it; the last user to
    leave stops it."""

    def __init__(self, make: Callable[[Path], S], name: str) -> None:
        self.make = make
        self.name = name
        self.server: S | None = None
        self.users = 0

    @contextlib.contextmanager
    def use(self, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S]:
        if self.server is None:
            server = self.make(tmp_path_factory.mktemp(self.name))
            server.start()
            self.server = server
        self.users += 1
        try:
            yield self.server
        finally:
            self.users -= 1
            if self.users == 0 and self.server is not None:
                self.server.stop()
                self.server = None
