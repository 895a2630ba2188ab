"""Log records to journald over its native protocol, so structured fields survive.

When systemd connects the daemon's stdout to the journal, a line on stdout becomes one
MESSAGE and nothing else. Sent as a datagram to journald's socket instead, a record keeps
its fields: ``MESSAGE``, ``PRIORITY`` (from the level), ``SYSLOG_IDENTIFIER``,
``CODE_FILE``/``CODE_LINE``/``CODE_FUNC``, ``OPENHQM_LOGGER`` and every structured field
the record carries (``log.info(..., extra={"uplink": "redis"})`` -> ``OPENHQM_UPLINK=redis``),
so ``journalctl -u openhqm-gateway OPENHQM_UPLINK=redis`` or ``-p warning`` work.

The protocol (systemd's "Native Journal Protocol") is a datagram of ``KEY=value\\n`` lines; a
value holding a newline is sent as ``KEY\\n``, its length as 64-bit little endian, the bytes
and ``\\n``. A datagram too large for the socket goes as a sealed memfd passed with
SCM_RIGHTS. This is written here rather than taken from systemd-python: that package needs
libsystemd-dev and a compiler to install into a virtualenv, and a handler that exists only on
some installs is a path the tests do not cover. Any socket error sends the record to stdout
instead (never lost), with one notice when that starts.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import socket
import struct
import sys
from collections.abc import Mapping
from typing import IO, Any

import orjson

IDENTIFIER = "openhqm-gateway"
FIELD_PREFIX = "OPENHQM_"
#: LogRecord attributes that are not structured fields
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}
_BAD_NAME_CHARS = re.compile(r"[^A-Z0-9_]")
SEND_TIMEOUT = 1.0


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's structured fields: what ``extra=`` added to it."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def field_name(key: str) -> str:
    """A journal field name for a structured field: ``message_id`` -> ``OPENHQM_MESSAGE_ID``
    (upper case, digits and ``_`` only, at most 64 characters)."""
    return (FIELD_PREFIX + _BAD_NAME_CHARS.sub("_", key.upper()))[:64]


def priority(levelno: int) -> int:
    """syslog priority for a logging level: CRITICAL 2, ERROR 3, WARNING 4, INFO 6, DEBUG 7."""
    for threshold, value in ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
                             (logging.INFO, 6)):
        if levelno >= threshold:
            return value
    return 7


def _value(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace")
    if isinstance(value, (bool, int, float)) or value is None:
        return str(value).encode()
    return orjson.dumps(value, default=str, option=orjson.OPT_SORT_KEYS)


def encode(fields: list[tuple[str, Any]]) -> bytes:
    """One datagram of the native protocol."""
    out = bytearray()
    for name, value in fields:
        data = _value(value)
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


def stdout_is_journal(stream: IO[Any] | None = None,
                      environ: Mapping[str, str] | None = None) -> bool:
    """True when systemd connected ``stream`` (stdout) to the journal: ``$JOURNAL_STREAM``
    names its device and inode. A redirected stdout (a pipe, a file) does not match."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat((sys.stdout if stream is None else stream).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


class JournaldHandler(logging.Handler):
    """Sends each record to journald; on a socket error hands it to ``fallback``."""

    def __init__(self, socket_path: str, fallback: logging.Handler,
                 identifier: str = IDENTIFIER) -> None:
        super().__init__()
        self.path = socket_path
        self.fallback = fallback
        self.identifier = identifier
        self.failing = False
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.settimeout(SEND_TIMEOUT)

    def fields(self, record: logging.LogRecord) -> list[tuple[str, Any]]:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
        if record.stack_info:
            message += "\n" + record.stack_info
        out: list[tuple[str, Any]] = [
            ("MESSAGE", message), ("PRIORITY", priority(record.levelno)),
            ("SYSLOG_IDENTIFIER", self.identifier), ("CODE_FILE", record.pathname),
            ("CODE_LINE", record.lineno), ("CODE_FUNC", record.funcName),
            (field_name("logger"), record.name)]
        out += [(field_name(k), v) for k, v in sorted(extra_fields(record).items())]
        return out

    def emit(self, record: logging.LogRecord) -> None:
        try:
            datagram = encode(self.fields(record))
        except Exception:
            self.handleError(record)
            return
        try:
            self._send(datagram)
        except OSError as exc:
            if not self.failing:
                self.failing = True
                self.fallback.emit(logging.makeLogRecord({
                    "name": __name__, "levelno": logging.WARNING, "levelname": "WARNING",
                    "msg": "cannot log to journald at %s (%s); logging to stdout until it answers",
                    "args": (self.path, exc)}))
            self.fallback.emit(record)
            return
        self.failing = False

    def _send(self, datagram: bytes) -> None:
        try:
            self._sock.sendto(datagram, self.path)
        except OSError as exc:
            if exc.errno not in {errno.EMSGSIZE, errno.ENOBUFS}:  # too large for a datagram
                raise
            self._send_memfd(datagram)

    def _send_memfd(self, datagram: bytes) -> None:
        """What sd_journal_send does with a large entry: a sealed memfd, passed by fd."""
        fd = os.memfd_create("openhqm-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(datagram)
            while view:
                view = view[os.write(fd, view):]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                        | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            self._sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                     struct.pack("i", fd))], 0, self.path)
        finally:
            os.close(fd)

    def setFormatter(self, fmt: logging.Formatter | None) -> None:
        """The formatter is the fallback's: journald gets fields, not a formatted line."""
        self.fallback.setFormatter(fmt)

    def close(self) -> None:
        self._sock.close()
        self.fallback.close()
        super().close()
