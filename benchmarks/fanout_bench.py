"""Fan-out benchmark: a backlog drained to two uplinks from one store, against the same backlog
drained to one uplink, and against two stores (what a second gateway would cost).

    python benchmarks/fanout_bench.py [--messages 100000] [--batch-size 500]
                                      [--uplink redis|none|both]

Three cases, each in a fresh directory with the same ``--messages`` 80-byte sensor readings
(JSON, 10 topics):

- **one uplink**: one store, one cursor, one forwarder.
- **two uplinks, one store**: one stored copy, two cursors (``Store.register``), two
  forwarders draining at the same time, as the daemon runs them.
- **two stores** (the reference a second copy is compared with): two store files, each with
  the whole backlog and one forwarder, draining at the same time.

Each case fills its store(s) through the async ``Store`` (group commits of 5,000,
``durability: full``), as an ingress would while the uplinks are down, then drains. Per case:
bytes written to disk while filling and while draining (``/proc/self/io`` write_bytes, which
counts what reaches the block layer including the WAL and checkpoints), the store file's size
with the backlog in it, the drain's wall time and this process's CPU time during the drain.

Uplinks: ``redis`` (a private redis-server on a free loopback port, one stream per uplink:
the uplink's client is part of the cost) and ``none`` (an uplink that accepts every batch at
once: the store and forwarder alone). Prints a line per case and the ratios two-uplinks / one
and two-stores / one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.store_bench import io_written, readings
from gateway.config import Config, parse_config
from gateway.forwarder import UPLINK_QUEUE, Forwarder
from gateway.queue.interface import MessageQueueInterface, PublishResult, QueueMessage
from gateway.queue.registry import create_backend
from gateway.store.db import Destination
from gateway.store.records import NewMessage
from gateway.store.store import Store
from tests.servers import redis_server, running

FILL_COMMIT = 5000


class AcceptAll:
    """An uplink that accepts every message at once: the store and forwarder alone."""

    backend_name = "accept-all"
    target = "nowhere (accepts every message at once)"

    async def connect(self) -> None:
        return None

    async def disconnect(self) -> None:
        return None

    async def publish_batch(self, queue_name: str,
                            messages: Sequence[QueueMessage]) -> list[PublishResult]:
        return [PublishResult(m.id) for m in messages]


@dataclass
class Case:
    name: str
    fill_bytes: int
    store_bytes: int
    drain_seconds: float
    drain_cpu: float
    drain_bytes: int


def config(workdir: Path, name: str, redis_port: int | None, batch: int, n: int) -> Config:
    uplinks = {}
    for u in ("a", "b"):
        if redis_port is None:
            uplinks[u] = {"type": "redis", "request_queue_name": f"unused-{u}"}
        else:
            uplinks[u] = {"type": "redis", "redis_url": f"redis://127.0.0.1:{redis_port}/0",
                          "request_queue_name": f"fanout-{uuid.uuid4().hex[:8]}-{u}"}
    return parse_config({
        "store": {"path": str(workdir / f"{name}.db"), "max_messages": n * 2,
                  "max_bytes": "4GB"},
        "forwarder": {"batch_size": batch},
        "uplinks": uplinks}, "<fanout_bench>")


def file_bytes(path: str) -> int:
    return sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))


async def fill(store: Store, messages: list[NewMessage]) -> None:
    for start in range(0, len(messages), FILL_COMMIT):
        await store.append(UPLINK_QUEUE, messages[start:start + FILL_COMMIT])


async def drain(forwarder: Forwarder) -> None:
    await forwarder.uplink.connect()
    while await forwarder.drain_once():
        pass
    await forwarder.flush()


async def run_case(name: str, stores: int, cursors: int, args: argparse.Namespace, *,
                   workdir: Path, redis_port: int | None) -> Case:
    messages = readings(args.messages)
    opened: list[tuple[Store, list[Forwarder], Config]] = []
    fill_before = io_written()
    for i in range(stores):
        cfg = config(workdir, f"{name}-{i}", redis_port, args.batch_size, args.messages)
        store = Store(cfg.store_path, cfg.store)
        await store.open()
        chosen = cfg.uplinks[:cursors]
        await store.register(UPLINK_QUEUE, [Destination(u.name, (), 0) for u in chosen])
        await fill(store, messages)
        forwarders = []
        for u in chosen:
            view = cfg.uplink_view(u)
            uplink: MessageQueueInterface = (create_backend(view) if redis_port is not None
                                             else AcceptAll())  # type: ignore[assignment]
            forwarders.append(Forwarder(store, uplink, view, queue=u.name))
        opened.append((store, forwarders, cfg))
    fill_bytes = io_written() - fill_before
    store_bytes = sum(file_bytes(cfg.store_path) for _, _, cfg in opened)
    drain_before, cpu_before, started = io_written(), time.process_time(), time.perf_counter()
    await asyncio.gather(*(drain(f) for _, fs, _ in opened for f in fs))
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_before
    drain_bytes = io_written() - drain_before
    for store, forwarders, _ in opened:
        for f in forwarders:
            left = await store.depth(f.queue)
            assert left == 0, f"{f.queue} has {left} left"
            assert f.stats.delivered == args.messages, (f.queue, f.stats.delivered)
            await f.uplink.disconnect()
        await store.close()
    return Case(name, fill_bytes, store_bytes, seconds, cpu, drain_bytes)


def report(kind: str, cases: list[Case], n: int) -> None:
    one = cases[0]
    print(f"uplinks: {kind}, backlog {n:,} messages of ~80 B")
    print(f"{'case':26s} {'fill written':>13s} {'store file':>11s} {'drain':>8s} "
          f"{'drain CPU':>10s} {'CPU/msg/uplink':>15s} {'drain written':>14s}")
    for c in cases:
        copies = 1 if c is one else 2
        print(f"{c.name:26s} {c.fill_bytes / 1e6:10.1f} MB {c.store_bytes / 1e6:8.1f} MB "
              f"{c.drain_seconds:6.2f} s {c.drain_cpu:8.2f} s "
              f"{c.drain_cpu / n / copies * 1e6:12.1f} µs {c.drain_bytes / 1e6:11.2f} MB")
    two, stores = cases[1], cases[2]
    print(f"second uplink, one store: fill written x{two.fill_bytes / one.fill_bytes:.2f}, "
          f"store file x{two.store_bytes / one.store_bytes:.2f}, drain CPU "
          f"x{two.drain_cpu / one.drain_cpu:.2f}, drain time x{two.drain_seconds / one.drain_seconds:.2f}")
    print(f"second store (reference): fill written x{stores.fill_bytes / one.fill_bytes:.2f}, "
          f"store file x{stores.store_bytes / one.store_bytes:.2f}, drain CPU "
          f"x{stores.drain_cpu / one.drain_cpu:.2f}, drain time "
          f"x{stores.drain_seconds / one.drain_seconds:.2f}")


async def bench(kind: str, args: argparse.Namespace, workdir: Path,
                redis_port: int | None) -> None:
    where = {"workdir": workdir, "redis_port": redis_port}
    cases = [await run_case("one uplink", 1, 1, args, **where),
             await run_case("two uplinks, one store", 1, 2, args, **where),
             await run_case("two stores, one uplink each", 2, 1, args, **where)]
    report(kind, cases, args.messages)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--uplink", choices=["redis", "none", "both"], default="both")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fanout-bench-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        if args.uplink in ("none", "both"):
            asyncio.run(bench("none (accept every batch at once)", args, workdir, None))
        if args.uplink in ("redis", "both"):
            redis = stack.enter_context(running(redis_server(workdir / "redis")))
            if args.uplink == "both":
                print()
            asyncio.run(bench(f"redis-server on 127.0.0.1:{redis.port}, a stream each", args,
                              workdir, redis.port))


if __name__ == "__main__":
    main()
