"""Store benchmark (format 2): the store alone, no network, no event loop.

    python benchmarks/store_bench.py [--messages 1000000] [--compression zlib|none]
                                     [--read-batch 2000] [--skip-backlog]

1. **Read-and-free.** ``--messages`` 80-byte sensor readings (JSON, 10 topics) are appended in
   commits of 2,000, then drained by ``StoreDb.lease`` + ``settle(delivered)`` in batches of
   ``--read-batch`` until empty, the cursors written and the segments freed as the daemon does.
   References in the same run: the statements format 1 had to run for the same messages (SELECT
   the next rows in delivery order, DELETE them), with no Python objects around them; and the
   **Python floor**: for the same payloads held in memory in blocks of ``--read-batch``, one
   payload slice and one six-field slotted object per record, nothing read, decoded, counted or
   freed. Any store that hands a consumer one Python object per message pays at least that, so
   it bounds read-and-free on the machine and day of the run (it moved 1.7x between two days
   on the same VM).
2. **Offline backlog.** In a fresh process, ``--messages`` readings are stored through the async
   ``Store`` at full speed (group commit, ``durability: full``) as an ingress would while the
   uplink is down; bytes written to disk (``/proc/self/io`` write_bytes, which counts what
   reaches the block layer including the WAL, checkpoints and fsync'd metadata) per payload byte
   are reported. In another fresh process the backlog is drained (lease + settle, batches of
   500): the drain time and the process's peak RSS (VmHWM) during it.

Prints one line per figure; ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from gateway.config import StoreConfig
from gateway.store.db import Limits, StoreDb
from gateway.store.records import NewMessage, Settlement

TOPICS = 10
COMMIT = 2000


def readings(n: int, start: int = 0) -> list[NewMessage]:
    """``n`` sensor readings of about 80 bytes, as the ingress hands them to the store."""
    rnd = random.Random(start)
    now = time.time()
    out = []
    for i in range(start, start + n):
        dev = i % TOPICS
        topic = f"sensors/dev-{dev}/telemetry"
        body = orjson.dumps({"dev": f"dev-{dev}", "seq": i, "ts": round(now + i / 1000, 3),
                             "temp": round(rnd.uniform(15, 30), 2),
                             "hum": round(rnd.uniform(30, 70), 1)})
        out.append(NewMessage("", topic, body, {"mqtt_topic": topic, "mqtt_qos": "1"}, now))
    return out


def io_written() -> int:
    with open("/proc/self/io") as fh:
        for line in fh:
            if line.startswith("write_bytes"):
                return int(line.split()[1])
    return 0


def vm_hwm_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return 0.0


def store_config(compression: str) -> StoreConfig:
    return StoreConfig(max_bytes=4 * 1024**3, max_messages=50_000_000, compression=compression)


# -- 1: read-and-free ---------------------------------------------------------------------------


def fill_db(db: StoreDb, n: int) -> int:
    payload = 0
    for start in range(0, n, COMMIT):
        batch = readings(min(COMMIT, n - start), start)
        payload += sum(len(m.payload) for m in batch)
        db.append([("default", batch)])
    return payload


def read_and_free(path: str, n: int, compression: str, batch: int) -> dict[str, float]:
    db = StoreDb(path, Limits.from_config(store_config(compression)))
    db.open()
    fill_db(db, n)
    db.sync_cursors(force=True)
    db.checkpoint()
    started = time.perf_counter()
    got = 0
    while True:
        msgs = db.lease("default", batch, 60.0, time.time())
        if not msgs:
            break
        db.settle(Settlement(delivered=[m.seq for m in msgs]), time.time())
        got += len(msgs)
    db.sync_cursors(force=True)
    seconds = time.perf_counter() - started
    assert got == n, (got, n)
    db.close()
    return {"messages": got, "seconds": seconds, "rate": got / seconds}


V1_SCHEMA = """
CREATE TABLE messages(seq INTEGER PRIMARY KEY, id TEXT NOT NULL, queue TEXT NOT NULL,
    topic TEXT NOT NULL, payload BLOB NOT NULL, attributes BLOB, size INTEGER NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0, received_at REAL NOT NULL,
    not_before REAL NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
    lease_until REAL NOT NULL DEFAULT 0, last_error TEXT);
CREATE INDEX messages_ready ON messages(queue, priority DESC, seq);
CREATE INDEX messages_retrying ON messages(queue, topic) WHERE attempts > 0;
"""


def v1_floor(path: str, n: int, batch: int) -> dict[str, float]:
    """Format 1's statements for the same messages: SELECT the next rows in delivery order,
    DELETE them in one transaction. No Python objects beyond the rows."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA page_size=1024")
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(V1_SCHEMA)
    for start in range(0, n, COMMIT):
        rows = [(f"{i:032x}", "default", m.topic, m.payload, orjson.dumps(m.attributes), 100,
                 m.received_at) for i, m in enumerate(readings(min(COMMIT, n - start), start),
                                                      start)]
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO messages(id, queue, topic, payload, attributes, size,"
                         " received_at) VALUES (?,?,?,?,?,?,?)", rows)
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    started = time.perf_counter()
    got = 0
    while True:
        rows = conn.execute("SELECT seq, id, queue, topic, payload, attributes, received_at,"
                            " priority, attempts FROM messages WHERE queue = 'default'"
                            " AND not_before <= ? ORDER BY priority DESC, seq LIMIT ?",
                            (time.time(), batch)).fetchall()
        if not rows:
            break
        conn.execute("BEGIN")
        conn.execute("DELETE FROM messages WHERE seq <= ?", (rows[-1][0],))
        conn.execute("COMMIT")
        got += len(rows)
    seconds = time.perf_counter() - started
    conn.close()
    return {"messages": got, "seconds": seconds, "rate": got / seconds}


class _Handed:
    """The least a handed-out message can be: its seq, topic, payload, where it came from,
    its index there and its lease deadline (StoredMessage has these six and two caches)."""

    __slots__ = ("frame", "index", "payload", "seq", "topic", "until")

    def __init__(self, seq: int, topic: str, payload: bytes, frame: object, index: int,  # noqa: PLR0917
                 until: float) -> None:
        self.seq = seq
        self.topic = topic
        self.payload = payload
        self.frame = frame
        self.index = index
        self.until = until


def python_floor(n: int, batch: int) -> dict[str, float]:
    """One payload slice and one ``_Handed`` per record, from blocks of ``batch`` payloads
    already in memory: what handing out one Python object per message costs at the least."""
    blocks = []
    for start in range(0, n, batch):
        payloads = [m.payload for m in readings(min(batch, n - start), start)]
        offsets = [0]
        for p in payloads:
            offsets.append(offsets[-1] + len(p))
        topics = [f"sensors/dev-{i % TOPICS}/telemetry" for i in range(start, start + len(payloads))]
        blocks.append((start, b"".join(payloads), offsets, topics))
    started = time.perf_counter()
    got = 0
    until = time.monotonic() + 60
    for first, body, offsets, topics in blocks:
        handed = [_Handed(first + k, topics[k], body[offsets[k]:offsets[k + 1]], body, k, until)
                  for k in range(len(topics))]
        got += len(handed)
    seconds = time.perf_counter() - started
    assert got == n, (got, n)
    return {"messages": got, "seconds": seconds, "rate": got / seconds}


# -- 2: offline backlog (child processes) ----------------------------------------------------


async def _store_backlog(path: str, n: int, compression: str) -> dict[str, float]:
    from gateway.store.store import Store

    store = Store(path, store_config(compression))
    await store.open()
    before = io_written()
    payload = 0
    started = time.perf_counter()
    pending: list[asyncio.Task[Any]] = []
    for start in range(0, n, 500):  # an ingress hands over a socket read's worth at a time
        batch = readings(min(500, n - start), start)
        payload += sum(len(m.payload) for m in batch)
        pending.append(asyncio.create_task(store.append("default", batch)))
        if len(pending) >= 8:  # a receive window's worth in flight, like the ingress
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    seconds = time.perf_counter() - started
    commits = store.commits
    await store.close()
    written = io_written() - before
    return {"messages": n, "payload_bytes": payload, "seconds": seconds, "rate": n / seconds,
            "written_bytes": written, "bytes_per_payload_byte": written / payload,
            "commits": commits}


async def _drain_backlog(path: str, compression: str) -> dict[str, float]:
    from gateway.store.store import Store

    store = Store(path, store_config(compression))
    await store.open()
    rss_open = vm_hwm_mb()
    started = time.perf_counter()
    got = 0
    while True:
        msgs = await store.lease("default", 500)
        if not msgs:
            break
        await store.settle(Settlement(delivered=[m.seq for m in msgs]))
        got += len(msgs)
    seconds = time.perf_counter() - started
    await store.close()
    return {"messages": got, "seconds": seconds, "rate": got / seconds,
            "rss_after_open_mb": rss_open, "peak_rss_mb": vm_hwm_mb()}


def child(args: argparse.Namespace) -> None:
    if args.child == "store":
        result = asyncio.run(_store_backlog(args.path, args.messages, args.compression))
        result["file_bytes"] = os.path.getsize(args.path)
    else:
        result = asyncio.run(_drain_backlog(args.path, args.compression))
    print(json.dumps(result))


def run_child(what: str, path: str, args: argparse.Namespace) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", what, "--path", path,
                          "--messages", str(args.messages), "--compression", args.compression],
                         check=True, capture_output=True, text=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--compression", choices=["zlib", "none"], default="zlib")
    ap.add_argument("--read-batch", type=int, default=2000)
    ap.add_argument("--skip-backlog", action="store_true")
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    results: dict[str, Any] = {"messages": args.messages, "compression": args.compression}
    with tempfile.TemporaryDirectory(prefix="store-bench-") as tmp:
        floors = [python_floor(args.messages, args.read_batch)]
        ref = v1_floor(os.path.join(tmp, "v1.db"), args.messages, args.read_batch)
        print(f"format 1 floor (SELECT + DELETE, no Python objects): {ref['rate']:,.0f} msg/s")
        rf = read_and_free(os.path.join(tmp, "rf.db"), args.messages, args.compression,
                           args.read_batch)
        print(f"read-and-free, format 2 (lease + settle + cursor + free): {rf['rate']:,.0f} msg/s"
              f" ({rf['rate'] / ref['rate']:.1f}x the format 1 floor)")
        floors += [python_floor(args.messages, args.read_batch) for _ in range(2)]
        py = sorted(floors, key=lambda f: f["rate"])[1]  # the median of before, after, after
        print(f"Python floor (a payload slice and a 6-field object per record, in memory, "
              f"median of 3): {py['rate']:,.0f} msg/s (runs: "
              f"{', '.join(format(f['rate'], ',.0f') for f in floors)}); "
              f"read-and-free is {rf['rate'] / py['rate']:.2f} of it")
        results["v1_floor"], results["read_and_free"], results["python_floor"] = ref, rf, py
        if not args.skip_backlog:
            path = os.path.join(tmp, "backlog.db")
            stored = run_child("store", path, args)
            print(f"offline backlog: {stored['messages']:,} stored in {stored['seconds']:.1f} s "
                  f"({stored['rate']:,.0f} msg/s, {stored['commits']} commits), "
                  f"{stored['bytes_per_payload_byte']:.2f} bytes written per payload byte, "
                  f"file {stored['file_bytes'] / 1e6:.1f} MB")
            drained = run_child("drain", path, args)
            print(f"drain of the backlog: {drained['seconds']:.1f} s ({drained['rate']:,.0f} msg/s),"
                  f" peak RSS {drained['peak_rss_mb']:.1f} MB "
                  f"(after open {drained['rss_after_open_mb']:.1f} MB)")
            results["backlog_store"], results["backlog_drain"] = stored, drained
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
