"""Logging set-up: plain text for a terminal, one JSON object per line for collectors, and
journald's native protocol when systemd connected stdout to the journal (``logging.journald``).

Structured fields travel as ``extra=``: ``log.warning("...", extra={"uplink": "redis"})``
adds ``"uplink": "redis"`` to the JSON line and ``OPENHQM_UPLINK=redis`` to the journal entry.
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
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(cfg.level)
    return handler
