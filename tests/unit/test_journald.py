"""journald's native protocol, against a unix datagram socket the test listens on."""

from __future__ import annotations

import array
import fcntl
import io
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.config import LoggingConfig
from gateway.observability.journald import (
    JournaldHandler,
    encode,
    field_name,
    stdout_is_journal,
)
from gateway.observability.logs import JsonFormatter, setup_logging
from tests.servers import free_port

REPO = Path(__file__).resolve().parents[2]
HERE = __file__


def parse(datagram: bytes) -> list[tuple[str, bytes]]:
    """The receiving side of the protocol, written from systemd's description."""
    fields: list[tuple[str, bytes]] = []
    pos = 0
    while pos < len(datagram):
        end = datagram.index(b"\n", pos)
        line = datagram[pos:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            fields.append((name.decode(), value))
            pos = end + 1
        else:
            (size,) = struct.unpack("<Q", datagram[end + 1:end + 9])
            value = datagram[end + 9:end + 9 + size]
            assert datagram[end + 9 + size:end + 10 + size] == b"\n"
            fields.append((line.decode(), value))
            pos = end + 10 + size
    return fields


class Journal:
    """A stand-in journald socket: receives datagrams, and memfds passed with SCM_RIGHTS."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(5)
        self.sealed: list[int] = []

    def receive(self) -> dict[str, str]:
        fields = self.receive_raw()
        names = [name for name, _ in fields]
        assert len(names) == len(set(names)), names
        return {name: value.decode() for name, value in fields}

    def receive_raw(self) -> list[tuple[str, bytes]]:
        fds = array.array("i")
        data, ancdata, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(fds.itemsize))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        if fds:
            assert data == b"" and len(fds) == 1
            try:
                self.sealed.append(fcntl.fcntl(fds[0], fcntl.F_GET_SEALS))
                data = os.pread(fds[0], os.fstat(fds[0]).st_size, 0)
            finally:
                os.close(fds[0])
        return parse(data)

    def nothing_waiting(self) -> bool:
        self.sock.settimeout(0.2)
        try:
            self.sock.recv(1)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(5)
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "journal.sock")
    yield j
    j.close()


@pytest.fixture
def logger(journal: Journal) -> Iterator[tuple[logging.Logger, io.StringIO]]:
    out = io.StringIO()
    fallback = logging.StreamHandler(out)
    fallback.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler = JournaldHandler(str(journal.path), fallback=fallback)
    log = logging.getLogger("gateway.test_journald")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    log.handlers[:] = [handler]
    yield log, out
    log.handlers[:] = []
    handler.close()


def expected(message: str, priority: int, line: int, func: str, **extra: str) -> dict[str, str]:
    fields = {"MESSAGE": message, "PRIORITY": str(priority),
              "SYSLOG_IDENTIFIER": "openhqm-gateway", "CODE_FILE": HERE,
              "CODE_LINE": str(line), "CODE_FUNC": func,
              "OPENHQM_LOGGER": "gateway.test_journald"}
    fields.update({f"OPENHQM_{k.upper()}": v for k, v in extra.items()})
    return fields


def lineno() -> int:
    frame = sys._getframe(1)
    return frame.f_lineno


def test_encode_plain_and_binary_length_form() -> None:
    assert encode([("MESSAGE", "hello"), ("PRIORITY", 6)]) == b"MESSAGE=hello\nPRIORITY=6\n"
    assert encode([("MESSAGE", "a\nb"), ("X", "é")]) == (
        b"MESSAGE\n\x03\x00\x00\x00\x00\x00\x00\x00a\nb\n" + "X=é\n".encode())


def test_field_names() -> None:
    assert field_name("message_id") == "OPENHQM_MESSAGE_ID"
    assert field_name("uplink") == "OPENHQM_UPLINK"
    assert field_name("queue-name.x") == "OPENHQM_QUEUE_NAME_X"
    assert len(field_name("k" * 100)) == 64


def test_record_fields_exactly(journal: Journal,
                               logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, out = logger
    log.info("uplink %s connected", "redis", extra={"uplink": "redis", "message_id": "m-17"})
    line = lineno() - 1
    assert journal.receive() == expected("uplink redis connected", 6, line,
                                         "test_record_fields_exactly",
                                         uplink="redis", message_id="m-17")
    log.warning("buffering", extra={"depth": 25, "rates": {"in": 1.5}})
    line = lineno() - 1
    assert journal.receive() == expected("buffering", 4, line, "test_record_fields_exactly",
                                         depth="25", rates='{"in":1.5}')
    for level, priority in ((logging.DEBUG, 7), (logging.ERROR, 3), (logging.CRITICAL, 2)):
        log.log(level, "level %d", level)
        assert journal.receive()["PRIORITY"] == str(priority)
    assert out.getvalue() == ""


def test_multiline_and_non_ascii(journal: Journal,
                                 logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, _ = logger
    text = "Température 21,5 °C — capteur «nord» ✓\nzweite Zeile: Grüße 温度"
    log.error(text, extra={"topic": "site/Küche/1"})
    line = lineno() - 1
    raw = journal.receive_raw()
    data = text.encode()
    assert ("MESSAGE", data) in raw
    assert journal.sealed == []  # a plain datagram
    fields = {name: value.decode() for name, value in raw}
    assert fields == expected(text, 3, line, "test_multiline_and_non_ascii",
                              topic="site/Küche/1")
    # On the wire: the binary length form for the multi-line value, KEY=value for the rest.
    log.error(text)
    datagram, _ = journal.sock.recvfrom(1 << 16)
    assert datagram.startswith(b"MESSAGE\n" + struct.pack("<Q", len(data)) + data + b"\n")
    assert b"\nPRIORITY=3\n" in datagram


def test_exception_goes_into_the_message(journal: Journal,
                                         logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, _ = logger
    try:
        raise ValueError("bad reading")
    except ValueError:
        log.exception("handler failed")
    message = journal.receive()["MESSAGE"]
    assert message.startswith("handler failed\nTraceback (most recent call last):\n")
    assert message.endswith("ValueError: bad reading")


def test_large_entry_goes_as_a_sealed_memfd(journal: Journal,
                                            logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, out = logger
    big = "x" * 4_000_000  # beyond any datagram the socket takes
    log.info("big", extra={"payload": big})
    fields = journal.receive()
    assert fields["MESSAGE"] == "big" and fields["OPENHQM_PAYLOAD"] == big
    seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
    assert len(journal.sealed) == 1 and journal.sealed[0] & seals == seals
    assert out.getvalue() == ""


def test_socket_errors_fall_back_to_stdout_without_losing_a_record(tmp_path: Path) -> None:
    out = io.StringIO()
    fallback = logging.StreamHandler(out)
    fallback.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    path = tmp_path / "later.sock"
    handler = JournaldHandler(str(path), fallback=fallback)
    log = logging.getLogger("gateway.test_journald.fallback")
    log.propagate = False
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    try:
        log.info("first")
        log.info("second\nline")
        lines = out.getvalue().splitlines()
        assert lines[0].startswith(f"WARNING gateway.observability.journald: cannot log to "
                                   f"journald at {path} (")
        assert lines[1:] == ["INFO gateway.test_journald.fallback: first",
                             "INFO gateway.test_journald.fallback: second", "line"]
        journal = Journal(path)  # journald is back
        try:
            log.info("third")
            assert journal.receive()["MESSAGE"] == "third"
            assert out.getvalue().count("\n") == 4  # nothing more on stdout
        finally:
            journal.close()
        log.info("fourth")  # gone again: a fresh notice, and the record on stdout
        assert out.getvalue().splitlines()[-2].startswith("WARNING")
        assert out.getvalue().splitlines()[-1] == "INFO gateway.test_journald.fallback: fourth"
    finally:
        log.handlers[:] = []
        handler.close()


def test_stdout_is_journal_only_when_the_inode_matches(tmp_path: Path) -> None:
    with open(tmp_path / "out", "w") as stream, open(tmp_path / "other", "w") as other:
        st = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert stdout_is_journal(stream, env)
        assert not stdout_is_journal(other, env)
        assert not stdout_is_journal(stream, {})
        assert not stdout_is_journal(stream, {"JOURNAL_STREAM": "garbage"})
        assert not stdout_is_journal(io.StringIO(), env)


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_root")
def test_setup_logging_modes(journal: Journal, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = replace(LoggingConfig(), journal_socket=str(journal.path), format="json")
    with open(tmp_path / "stdout", "w") as stream:
        monkeypatch.setattr(sys, "stdout", stream)
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        handlers = [setup_logging(cfg)]  # auto, and stdout is the journal
        assert isinstance(handlers[-1], JournaldHandler)
        logging.getLogger("gateway.x").info("to the journal", extra={"uplink": "kafka"})
        fields = journal.receive()
        assert fields["MESSAGE"] == "to the journal" and fields["OPENHQM_UPLINK"] == "kafka"
        handlers.append(setup_logging(replace(cfg, journald="off")))
        assert not isinstance(handlers[-1], JournaldHandler)
        assert isinstance(handlers[-1].formatter, JsonFormatter)
        monkeypatch.setenv("JOURNAL_STREAM", "1:2")  # stdout redirected elsewhere
        handlers.append(setup_logging(cfg))
        assert not isinstance(handlers[-1], JournaldHandler)
        handlers.append(setup_logging(replace(cfg, journald="on")))
        assert isinstance(handlers[-1], JournaldHandler)
        for handler in handlers:
            handler.close()
    assert journal.nothing_waiting()


def test_json_lines_carry_the_structured_fields() -> None:
    record = logging.makeLogRecord({"name": "gateway.forwarder", "levelno": 30,
                                    "levelname": "WARNING", "msg": "uplink %s down",
                                    "args": ("redis",), "uplink": "redis"})
    line = JsonFormatter().format(record)
    assert '"msg":"uplink redis down"' in line and '"uplink":"redis"' in line


def test_the_daemon_logs_to_the_journal_when_stdout_is_the_journal(journal: Journal,
                                                                   tmp_path: Path) -> None:
    """The real daemon, stdout a file whose inode $JOURNAL_STREAM names: its records come
    over the socket with fields, not as lines on stdout. No broker or uplink answers: the
    daemon only has to start and say so."""
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"gateway:\n  state_dir: {tmp_path / 'state'}\n"
        f"ingress:\n  port: {free_port()}\n"
        f"queue:\n  type: redis\n  redis_url: redis://127.0.0.1:{free_port()}/0\n"
        f"observability:\n  listen: ''\n"
        f"logging:\n  journal_socket: {journal.path}\n")
    stdout_path = tmp_path / "stdout"
    with open(stdout_path, "wb") as stdout:
        st = os.fstat(stdout.fileno())
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENHQM_")}
        env |= {"PYTHONPATH": str(REPO), "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "-c", str(config), "run"],
                                stdout=stdout, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        entries = [journal.receive()]
        while entries[-1]["PRIORITY"] != "4":  # until the broker it cannot reach is reported
            entries.append(journal.receive())
        assert all(e["SYSLOG_IDENTIFIER"] == "openhqm-gateway" for e in entries)
        info = next(e for e in entries if e["OPENHQM_LOGGER"] == "gateway.service")
        assert info["PRIORITY"] == "6"
        assert info["CODE_FILE"].endswith("gateway/service.py") and info["CODE_LINE"].isdigit()
        assert entries[-1]["OPENHQM_LOGGER"] == "gateway.ingress"
        assert "broker" in entries[-1]["MESSAGE"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    assert stdout_path.read_bytes() == b""
