"""``parked``: messages off a destination's main path (format 2), and the dead letters.

A parked row belongs to one cursor (destination). ``chain = 1`` marks a row in its topic's
order chain (waiting for a retry, or parked behind one): while a topic has chain rows, the
cursor parks that topic's log records behind them (invariant 6). ``chain = 0`` rows (delayed,
prioritised, replayed) wait only for their own ``not_before``.

Every function here runs inside a transaction the caller opened; counts and sizes are
returned so the caller keeps its totals.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.store.records import DeadLetter, StoredMessage

SCHEMA = """
CREATE TABLE IF NOT EXISTS parked(
    pid INTEGER PRIMARY KEY,
    cursor TEXT NOT NULL,
    seq INTEGER NOT NULL,
    id TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    attributes BLOB,
    size INTEGER NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    received_at REAL NOT NULL,
    not_before REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    chain INTEGER NOT NULL DEFAULT 1,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS parked_order ON parked(cursor, priority DESC, seq);
CREATE TABLE IF NOT EXISTS dead_letters(
    dl_seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    queue TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    attributes BLOB,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL,
    failed_at REAL NOT NULL,
    attempts INTEGER NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_queue ON dead_letters(queue, dl_seq);
"""

_COLUMNS = "pid, cursor, seq, id, topic, payload, attributes, priority, received_at, attempts"


def attrs_blob(attributes: dict[str, str] | None) -> bytes | None:
    return orjson.dumps(attributes) if attributes else None


def _attrs(blob: bytes | None) -> dict[str, str]:
    return orjson.loads(blob) if blob else {}


def _message(row: Sequence[Any], queue: str,
             stamp: Mapping[str, str] | None = None) -> StoredMessage:
    pid, _, seq, msg_id, topic, payload, attributes, priority, received_at, attempts = row
    return StoredMessage.detached(-pid, queue, topic, payload, received_at, order=seq,
                                  priority=priority, attempts=attempts, msg_id=msg_id,
                                  attributes=_attrs(attributes), stamp=stamp)


@dataclass(frozen=True, slots=True)
class ParkedRow:
    """A message to park: the log record (or new message) and why."""

    message: StoredMessage
    attempts: int = 0
    not_before: float = 0.0
    chain: int = 1
    last_error: str | None = None


def park(c: sqlite3.Connection, cursor: str, rows: Iterable[ParkedRow]) -> tuple[int, int]:
    """Insert rows; returns (count, counted bytes)."""
    values = []
    total = 0
    for r in rows:
        m = r.message
        size = m.size
        total += size
        values.append((cursor, m.order, m.id, m.topic, m.payload, attrs_blob(m.stored_attributes or None),
                       size, m.priority, m.received_at, r.not_before, r.attempts, r.chain,
                       r.last_error))
    c.executemany("INSERT INTO parked(cursor, seq, id, topic, payload, attributes, size, priority,"
                  " received_at, not_before, attempts, chain, last_error)"
                  " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", values)
    return len(values), total


def ready(c: sqlite3.Connection, cursor: str, queue: str, now: float, limit: int, *,
          held: list[int], blocked: list[str],
          stamp: Mapping[str, str] | None = None) -> list[StoredMessage]:
    """Ready parked messages in delivery order: not held, not due later, and not behind a
    retry that is backing off or in flight on the same topic (``blocked``)."""
    rows = c.execute(
        f"""SELECT {_COLUMNS} FROM parked
            WHERE cursor = :c AND not_before <= :now
              AND pid NOT IN (SELECT value FROM json_each(:held))
              AND topic NOT IN (SELECT value FROM json_each(:blocked))
              AND topic NOT IN (SELECT topic FROM parked
                                WHERE cursor = :c AND attempts > 0 AND not_before > :now)
            ORDER BY priority DESC, seq LIMIT :limit""",
        {"c": cursor, "now": now, "limit": limit, "held": orjson.dumps(held),
         "blocked": orjson.dumps(blocked)}).fetchall()
    return [_message(r, queue, stamp) for r in rows]


def delete(c: sqlite3.Connection, pids: Sequence[int]) -> list[tuple[str, str, int, int]]:
    """Delete parked rows; returns (cursor, topic, size, chain) of each."""
    rows = c.execute("DELETE FROM parked WHERE pid IN (SELECT value FROM json_each(?)) "
                     "RETURNING cursor, topic, size, chain", (orjson.dumps(list(pids)),)).fetchall()
    return [(r[0], r[1], r[2], r[3]) for r in rows]


def attempts_of(c: sqlite3.Connection, pid: int) -> int | None:
    row = c.execute("SELECT attempts FROM parked WHERE pid = ?", (pid,)).fetchone()
    return None if row is None else int(row[0])


def retry(c: sqlite3.Connection, items: Sequence[tuple[int, float, str]]) -> None:
    """(pid, not_before, error): one more failed attempt."""
    c.executemany("UPDATE parked SET attempts = attempts + 1, not_before = ?, last_error = ?, "
                  "chain = 1 WHERE pid = ?", [(nb, err[:1000], pid) for pid, nb, err in items])


def next_due(c: sqlite3.Connection, cursor: str, now: float) -> float | None:
    row = c.execute("SELECT min(not_before) FROM parked WHERE cursor = ? AND not_before > ?",
                    (cursor, now)).fetchone()
    return float(row[0]) if row and row[0] is not None else None


def totals(c: sqlite3.Connection) -> dict[str, tuple[int, int, dict[str, int]]]:
    """Per cursor: (count, bytes, chain rows per topic)."""
    out: dict[str, tuple[int, int, dict[str, int]]] = {}
    for cursor, topic, n, size, chain in c.execute(
            "SELECT cursor, topic, count(*), sum(size), sum(chain) FROM parked "
            "GROUP BY cursor, topic"):
        count, nbytes, chains = out.get(cursor, (0, 0, {}))
        if chain:
            chains[topic] = int(chain)
        out[cursor] = (count + int(n), nbytes + int(size), chains)
    return out


def expire(c: sqlite3.Connection, cutoff: float) -> list[tuple[str, str, int, int]]:
    """Delete parked rows received before ``cutoff``: (cursor, topic, size, chain) each."""
    return [(r[0], r[1], r[2], r[3]) for r in c.execute(
        "DELETE FROM parked WHERE received_at < ? RETURNING cursor, topic, size, chain",
        (cutoff,)).fetchall()]


# -- dead letters ---------------------------------------------------------------------------


def insert_dead(c: sqlite3.Connection, queue: str, m: StoredMessage, attempts: int, reason: str,
                *, now: float) -> int:
    size = m.size
    c.execute("INSERT INTO dead_letters(id, queue, topic, payload, attributes, size, received_at,"
              " failed_at, attempts, reason) VALUES (?,?,?,?,?,?,?,?,?,?)",
              (m.id, queue, m.topic, m.payload, attrs_blob(m.stored_attributes or None), size,
               m.received_at, now, attempts, reason))
    return size


def list_dead(c: sqlite3.Connection, queue: str | None, limit: int) -> list[DeadLetter]:
    sql = ("SELECT dl_seq, id, queue, topic, payload, attributes, received_at, failed_at, "
           "attempts, reason FROM dead_letters")
    args: tuple[Any, ...] = ()
    if queue is not None:
        sql += " WHERE queue = ?"
        args = (queue,)
    rows = c.execute(sql + " ORDER BY dl_seq LIMIT ?", (*args, limit)).fetchall()
    return [DeadLetter(r[0], r[1], r[2], r[3], r[4], _attrs(r[5]), r[6], r[7], r[8], r[9])
            for r in rows]


def dead_filter(queue: str | None, ids: Sequence[str] | None) -> tuple[str, tuple[Any, ...]]:
    clauses: list[str] = []
    args: list[Any] = []
    if queue is not None:
        clauses.append("queue = ?")
        args.append(queue)
    if ids is not None:
        clauses.append(f"id IN ({','.join('?' * len(ids))})" if ids else "0")
        args.extend(ids)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(args)


def replay_dead(c: sqlite3.Connection, queue: str | None, ids: Sequence[str] | None,
                seq: int) -> list[tuple[str, int]]:
    """Move dead letters into ``parked`` (ready, attempts reset, outside any topic chain) of
    the cursor named like their queue; returns (queue, size) of each."""
    where, args = dead_filter(queue, ids)
    rows = c.execute("DELETE FROM dead_letters" + where + " RETURNING id, queue, topic, "
                     "payload, attributes, size, received_at", args).fetchall()
    c.executemany("INSERT INTO parked(cursor, seq, id, topic, payload, attributes, size,"
                  " received_at, chain) VALUES (?,?,?,?,?,?,?,?,0)",
                  [(r[1], seq, r[0], r[2], r[3], r[4], r[5], r[6]) for r in rows])
    return [(r[1], r[5]) for r in rows]


def purge_dead(c: sqlite3.Connection, queue: str | None, ids: Sequence[str] | None) -> list[int]:
    where, args = dead_filter(queue, ids)
    return [r[0] for r in c.execute("DELETE FROM dead_letters" + where + " RETURNING size",
                                    args).fetchall()]


def trim_dead(c: sqlite3.Connection) -> tuple[str, int] | None:
    """Delete the oldest dead letter: (queue, size), or None when there is none."""
    row = c.execute("DELETE FROM dead_letters WHERE dl_seq = (SELECT min(dl_seq) FROM "
                    "dead_letters) RETURNING queue, size").fetchone()
    return None if row is None else (row[0], int(row[1]))
