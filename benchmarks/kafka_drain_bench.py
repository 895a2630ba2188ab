"""Kafka drain benchmark: N buffered messages drained to Kafka by the gateway, against
``kcat -P`` producing the same messages to the same broker in the same run.

    python benchmarks/kafka_drain_bench.py [--messages 100000] [--partitions 3]
                                           [--batch-size 2000] [--durability full|normal]
                                           [--compression none|gzip|lz4|zstd]
                                           [--bootstrap HOST:PORT]

What happens:

1. A private single-node Kafka 3.9 broker (KRaft, the jars of scripts/kafka/fetch-jars.sh)
   starts on free loopback ports in a temp dir, unless --bootstrap names a running one.
2. N messages of ~80 bytes of JSON over 10 MQTT topics (``bench/dev-<k>/temp``) are made
   once. Two topics with the same partition count are created: one for kcat, one for the
   gateway. The broker is warmed up first on a throw-away topic: ``--warm-up`` seconds of
   batches of 1,024 records, each waited for (the gateway's request pattern), then one kcat
   run. A cold JVM answers the first few hundred produce requests several times slower.
3. kcat -P reads the N messages as ``key<TAB>value`` lines (key = the device, as the
   gateway's ``{topic[1]}`` template gives) with acks=all and the idempotent producer,
   like the gateway. Timed from process start to exit (it exits after the last delivery
   report).
4. The gateway: a Store (gateway.store.store.Store) is filled with the N messages (not
   timed), then the Forwarder (gateway.forwarder.Forwarder) drains it through KafkaQueue
   with ``drain_once`` until the store is empty: lease a batch, publish_batch, settle it
   in SQLite (with the chosen durability). Timed from uplink connect to the last settle.
   Each gateway record also carries the message id, MQTT topic and gateway id as headers
   (the store stamps the gateway id as the daemon's does), which kcat cannot vary per
   message: the gateway sends ~100 more bytes per message.
5. Both topics' high watermarks are checked against N.

Three ceilings are measured in the same run, each alone, to show where the gateway's time
goes (none of them does the gateway's whole job):

- ``librdkafka from Python``: confluent-kafka's Producer (the client the uplink uses)
  producing the same N messages with the gateway's keys and headers (message id, MQTT
  topic, gateway id), a delivery report each, in batches of the forwarder's size each
  waited for; keys and headers are built before the clock starts. Run just before and just
  after the gateway (the broker keeps warming up): the ratio is against their mean.
- ``forwarder + store, no network``: the same Forwarder draining N stored messages into an
  uplink that accepts everything at once: lease + settle in SQLite and the Python around it.
- ``store alone``: ``StoreDb.lease`` + ``settle`` of the same messages in batches of the
  forwarder's size, on the store thread's own API with no event loop (store format 2: read
  frames from the log, move the cursor, free segments).

Prints the rates, each against kcat, and the ratios gateway / kcat (target >= 0.30) and
gateway / librdkafka from Python (target >= 0.7).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from gateway.config import Config, ForwarderConfig, QueueConfig, StoreConfig
from gateway.forwarder import UPLINK_QUEUE, Forwarder
from gateway.message import (
    ATTR_GATEWAY_ID,
    ATTR_MESSAGE_ID,
    ATTR_MQTT_TOPIC,
    QueueMessage,
    new_message_id,
)
from gateway.queue.interface import PublishResult
from gateway.store.db import Limits, StoreDb
from gateway.store.records import NewMessage, Settlement
from gateway.store.store import Store
from gateway.uplinks.kafka.settings import KafkaSettings
from gateway.uplinks.kafka.uplink import KafkaQueue
from tests.kafka_read import end_offsets
from tests.kafka_server import kafka_server, missing_requirements

DEVICES = 10
#: the gateway id header every record carries (the daemon's store stamps gateway.id)
BENCH_GATEWAY_ID = "bench-gateway-01"
#: records per batch of the warm-up and the librdkafka ceiling (the gateway's batch size)
BATCH = 2000


def make_messages(n: int) -> list[NewMessage]:
    now = time.time()
    out = []
    for i in range(n):
        device = f"dev-{i % DEVICES}"
        body = (f'{{"device":"{device}","seq":{i},"temp":{20 + i % 7}.5,'
                f'"ts":{now + i / 1000:.3f}}}').encode()
        topic = f"bench/{device}/temp"
        out.append(NewMessage("", topic, body, {"mqtt_topic": topic, "mqtt_qos": "1"},
                              received_at=now))
    return out


def write_kcat_input(path: Path, messages: list[NewMessage]) -> None:
    """``key<TAB>value`` lines, the key being the device (what ``{topic[1]}`` gives)."""
    with open(path, "wb") as fh:
        for m in messages:
            fh.write(m.topic.split("/")[1].encode() + b"\t" + m.payload + b"\n")


def settings(bootstrap: str, args: argparse.Namespace) -> KafkaSettings:
    return KafkaSettings(kafka_bootstrap_servers=bootstrap, kafka_message_key="{topic[1]}",
                         kafka_compression=args.compression, kafka_linger=args.linger)


def run_kcat(bootstrap: str, topic: str, lines: Path, compression: str,
             linger_ms: float) -> float:
    kcat = shutil.which("kcat") or shutil.which("kafkacat")
    if kcat is None:
        sys.exit("kcat is not installed (apt-get install kcat)")
    argv = [kcat, "-P", "-b", bootstrap, "-t", topic, "-K", "\t", "-l", str(lines),
            "-X", "acks=all", "-X", "enable.idempotence=true", "-X", f"linger.ms={linger_ms:g}",
            "-X", f"compression.codec={compression}"]
    started = time.perf_counter()
    subprocess.run(argv, check=True)
    return time.perf_counter() - started


async def high_watermark(bootstrap: str, topic: str) -> int:
    return sum((await asyncio.to_thread(end_offsets, bootstrap, topic)).values())


async def create_topics(bootstrap: str, args: argparse.Namespace, *topics: str) -> None:
    async with KafkaQueue(settings(bootstrap, args)) as admin:
        for topic in topics:
            await admin.create_queue(topic, partitions=args.partitions)


def run_librdkafka(bootstrap: str, topic: str, messages: list[NewMessage],
                   args: argparse.Namespace) -> float:
    """confluent-kafka's Producer alone: the gateway's keys and headers, a delivery report
    each, batches of the forwarder's size each waited for, inputs built before the clock
    starts. What the client can do from Python, with no gateway around it."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all",
                         "enable.idempotence": True, "linger.ms": args.linger * 1000,
                         "compression.type": args.compression,
                         "partitioner": "murmur2_random"})
    records = [(m.payload, m.topic.split("/")[1].encode(),
                [(ATTR_MESSAGE_ID, new_message_id().encode()), (ATTR_MQTT_TOPIC, m.topic.encode()),
                 (ATTR_GATEWAY_ID, BENCH_GATEWAY_ID.encode())])
               for m in messages]
    delivered = [0]

    def report(err: object, _msg: object) -> None:
        if err is None:
            delivered[0] += 1

    batch = args.batch_size
    started = time.perf_counter()
    for start in range(0, len(records), batch):
        for value, key, headers in records[start:start + batch]:
            producer.produce(topic, value, key, headers=headers, on_delivery=report)
        producer.flush(60)
    elapsed = time.perf_counter() - started
    if delivered[0] != len(messages):
        sys.exit(f"librdkafka delivered {delivered[0]} of {len(messages)}")
    return elapsed


def store_alone(messages: list[NewMessage], args: argparse.Namespace, workdir: Path) -> float:
    """The store's own work for the drain, with no event loop and no uplink: lease a batch,
    settle it delivered, until empty (cursor writes and segment frees included)."""
    db = StoreDb(str(workdir / "alone.db"), Limits.from_config(
        store_config(workdir, "alone.db", len(messages), args)))
    db.open()
    try:
        for start in range(0, len(messages), 5000):
            db.append([(UPLINK_QUEUE, messages[start:start + 5000])])
        started = time.perf_counter()
        while batch := db.lease(UPLINK_QUEUE, args.batch_size, 60.0, time.time()):
            db.settle(Settlement(delivered=[m.seq for m in batch]), time.time())
        db.sync_cursors(force=True)
        return time.perf_counter() - started
    finally:
        db.close()


def warm_broker(bootstrap: str, topic: str, seconds: float) -> int:
    """Keep the broker busy with the gateway's request pattern (batches of BATCH records,
    each waited for) until its JIT has compiled the produce path. A broker fresh from start
    answers the first few hundred produce requests several times slower, which costs a
    one-batch-on-the-wire gateway far more than kcat's stream. Returns the records sent."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all",
                         "enable.idempotence": True, "linger.ms": 0})
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for i in range(BATCH):
            producer.produce(topic, b"warm-up %d" % i, b"k%d" % (i % DEVICES))
        producer.flush(30)
        sent += BATCH
    return sent


class AcceptAll:
    """An uplink that accepts every message at once: the forwarder and store alone."""

    backend_name = "accept-all"
    target = "nowhere (accepts every message at once)"

    async def publish_batch(self, queue_name: str,
                            messages: list[QueueMessage]) -> list[PublishResult]:
        return [PublishResult(m.id) for m in messages]


def store_config(workdir: Path, name: str, n: int, args: argparse.Namespace) -> StoreConfig:
    return StoreConfig(path=str(workdir / name), durability=args.durability,
                       max_messages=n * 2, max_bytes=1024**3)


async def fill(store: Store, messages: list[NewMessage]) -> None:
    for start in range(0, len(messages), 5000):
        await store.append(UPLINK_QUEUE, messages[start:start + 5000])
    assert await store.depth(UPLINK_QUEUE) == len(messages)


async def store_only_drain(messages: list[NewMessage], args: argparse.Namespace,
                           workdir: Path) -> float:
    config = Config(store=store_config(workdir, "store-only.db", len(messages), args),
                    forwarder=ForwarderConfig(batch_size=args.batch_size),
                    queue=QueueConfig(type="kafka", request_queue_name="none"))
    store = Store(config.store_path, config.store, stamp={ATTR_GATEWAY_ID: BENCH_GATEWAY_ID})
    await store.open()
    try:
        await fill(store, messages)
        forwarder = Forwarder(store, AcceptAll(), config)  # type: ignore[arg-type]
        started = time.perf_counter()
        while await forwarder.drain_once():
            pass
        await forwarder.flush()
        elapsed = time.perf_counter() - started
        assert await store.depth(UPLINK_QUEUE) == 0
        return elapsed
    finally:
        await store.close()


async def gateway_drain(bootstrap: str, topic: str, messages: list[NewMessage],
                        args: argparse.Namespace, workdir: Path) -> tuple[float, Forwarder]:
    config = Config(
        store=store_config(workdir, "store.db", len(messages), args),
        forwarder=ForwarderConfig(batch_size=args.batch_size),
        queue=QueueConfig(type="kafka", request_queue_name=topic,
                          settings=settings(bootstrap, args)))
    store = Store(config.store_path, config.store, stamp={ATTR_GATEWAY_ID: BENCH_GATEWAY_ID})
    await store.open()
    try:
        await fill(store, messages)
        uplink = KafkaQueue.from_config(config)
        forwarder = Forwarder(store, uplink, config)
        started = time.perf_counter()
        await uplink.connect()
        try:
            while await forwarder.drain_once():
                pass
            await forwarder.flush()
            elapsed = time.perf_counter() - started
            assert await store.depth(UPLINK_QUEUE) == 0
        finally:
            await uplink.disconnect()
        return elapsed, forwarder
    finally:
        await store.close()


async def bench(bootstrap: str, args: argparse.Namespace, workdir: Path) -> None:
    run = uuid.uuid4().hex[:8]
    kcat_topic, gw_topic, warm_topic = f"bench-kcat-{run}", f"bench-gw-{run}", f"warm-{run}"
    rd_topics = f"bench-rd-{run}", f"bench-rd2-{run}"
    await create_topics(bootstrap, args, kcat_topic, gw_topic, warm_topic, *rd_topics)
    messages = make_messages(args.messages)
    lines = workdir / "messages.tsv"
    write_kcat_input(lines, messages)
    # The benchmark's own N message objects are not the gateway's: a daemon never holds
    # them in memory, so they must not make every garbage collection walk them.
    gc.collect()
    gc.freeze()
    linger_ms = args.linger * 1000
    await asyncio.to_thread(warm_broker, bootstrap, warm_topic, args.warm_up)
    run_kcat(bootstrap, warm_topic, lines, args.compression, linger_ms)  # and page cache
    kcat_seconds = run_kcat(bootstrap, kcat_topic, lines, args.compression, linger_ms)
    # the reference runs just before and just after the gateway (the broker still warms up
    # over these minutes): the ratio is against the mean of the two
    rd_before = await asyncio.to_thread(run_librdkafka, bootstrap, rd_topics[0], messages, args)
    gw_seconds, forwarder = await gateway_drain(bootstrap, gw_topic, messages, args, workdir)
    rd_after = await asyncio.to_thread(run_librdkafka, bootstrap, rd_topics[1], messages, args)
    rd_seconds = (rd_before + rd_after) / 2
    store_seconds = await store_only_drain(messages, args, workdir)
    alone_seconds = store_alone(messages, args, workdir)
    kcat_count = await high_watermark(bootstrap, kcat_topic)
    gw_count = await high_watermark(bootstrap, gw_topic)
    n = args.messages
    kcat_rate, gw_rate = n / kcat_seconds, n / gw_seconds

    def line(name: str, seconds: float, note: str = "") -> None:
        print(f"{name:34s} {seconds:6.2f} s {n / seconds:11,.0f} msg/s "
              f"{kcat_seconds / seconds:5.2f} of kcat  {note}")

    print(f"messages: {n} (~{len(messages[0].payload)} B JSON, {DEVICES} keys), "
          f"{args.partitions} partitions, compression {args.compression}, linger "
          f"{linger_ms:g} ms, forwarder batch {args.batch_size}, store durability "
          f"{args.durability}")
    line("kcat -P", kcat_seconds, f"(topic holds {kcat_count})")
    line("gateway", gw_seconds, f"(topic holds {gw_count}, {forwarder.stats.batches} "
         f"batches, {forwarder.stats.dead_lettered} dead-lettered)")
    print("ceilings, each alone:")
    line("  librdkafka from Python", rd_seconds, f"(inputs prebuilt, a report each; mean of "
         f"{n / rd_before:,.0f} before and {n / rd_after:,.0f} msg/s after the gateway)")
    line("  forwarder + store, no network", store_seconds, "(lease, settle, no uplink)")
    line("  store alone", alone_seconds, "(lease + settle, no event loop, no uplink)")
    print(f"ratio gateway / kcat: {gw_rate / kcat_rate:.2f}  (target >= 0.30); "
          f"gateway / librdkafka from Python: {rd_seconds / gw_seconds:.2f}  (target >= 0.7)")
    if kcat_count != n or gw_count != n:
        sys.exit(f"count mismatch: kcat {kcat_count}, gateway {gw_count}, expected {n}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2000,
                        help="forwarder.batch_size (messages per lease/publish_batch/settle)")
    parser.add_argument("--durability", choices=["full", "normal"], default="full")
    parser.add_argument("--compression", choices=["none", "gzip", "lz4", "zstd"], default="none")
    parser.add_argument("--linger", type=float, default=0.005,
                        help="seconds; queue.kafka_linger for the gateway, linger.ms for the "
                             "others (default: the gateway's default, 0.005)")
    parser.add_argument("--bootstrap", help="use this running broker instead of starting one")
    parser.add_argument("--warm-up", type=float, default=10.0,
                        help="seconds of produce requests before anything is timed (JIT)")
    args = parser.parse_args()
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kafka-bench-")))
        bootstrap = args.bootstrap
        if bootstrap is None:
            why = missing_requirements()
            if why is not None:
                sys.exit(why)
            broker = kafka_server(workdir / "kafka")
            broker.start()
            stack.callback(broker.stop)
            bootstrap = broker.bootstrap
        asyncio.run(bench(bootstrap, args, workdir))


if __name__ == "__main__":
    main()
