"""Logging set-up: plain text for a terminal, one JSON object per line for collectors, and
journald's native protocol when systemd connected stdout to the journal (``logging.journald``).

Structured fields travel as ``extra=``: ``log.warning("...", extra={"uplink": "redis"})``
adds ``"uplink": "redis"`` to the JSON line and ``OPENHQM_UPLINK=redis`` to the journal entry.

Client libraries (librdkafka, paho, botocore, azure, google, grpc, redis ...) log every
refused connection, some at ERROR: 50-77 lines per Kafka outage. Their records are detail:
``LibraryDetail`` shows them at DEBUG (``logging.level: DEBUG``) and drops them otherwise.
What the operator needs, one line per change of the uplink's state with the library's
reason in it, is the forwarder's (gateway/linkstate.py).
"""

from __future__ import annotations

import logging
import sys
import time

import orjson

from gateway.config import LoggingConfig
from gateway.observability.journald import JournaldHandler, extra_fields, stdout_is_journal


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


#: loggers whose records keep their level: the gateway's own, asyncio (a task that died with
#: an exception), warnings
OWN_LOGGERS = ("gateway", "asyncio", "py.warnings")
#: under ``gateway.`` but a client library's output passed through
LIBRARY_LOGGERS = ("gateway.uplinks.kafka.librdkafka", "gateway.uplinks.mqtt.paho")


def is_library_logger(name: str) -> bool:
    def under(prefixes: tuple[str, ...]) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)
    return under(LIBRARY_LOGGERS) or not (name == "root" or under(OWN_LOGGERS))


class LibraryDetail(logging.Filter):
    """Client-library records become DEBUG: shown only when the gateway logs at DEBUG."""

    def __init__(self, level: str) -> None:
        super().__init__()
        self.show = level == "DEBUG"

    def filter(self, record: logging.LogRecord) -> bool:
        if not is_library_logger(record.name):
            return True
        if not self.show:
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def setup_logging(cfg: LoggingConfig) -> logging.Handler:
    """Install the root handler; returns it."""
    stream = logging.StreamHandler(sys.stdout)
    if cfg.format == "json":
        stream.setFormatter(JsonFormatter())
    else:
        stream.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler: logging.Handler = stream
    if cfg.journald == "on" or (cfg.journald == "auto" and stdout_is_journal()):
        handler = JournaldHandler(cfg.journal_socket, fallback=stream)
    handler.addFilter(LibraryDetail(cfg.level))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(cfg.level)
    return handler


def set_level(level: str) -> None:
    """Change the level at run time (a reload): the root logger's and what the installed
    handlers' LibraryDetail filters show."""
    root = logging.getLogger()
    root.setLevel(level)
    for handler in root.handlers:
        for flt in handler.filters:
            if isinstance(flt, LibraryDetail):
                flt.show = level == "DEBUG"
