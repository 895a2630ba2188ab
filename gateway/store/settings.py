"""Settings of ``type: sqlite``: the local store used as a queue backend in its own right."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SqliteQueueSettings:
    #: the SQLite file; '' = the gateway's own store file (store.path)
    sqlite_path: str = ""
