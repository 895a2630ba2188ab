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
   gateway. kcat first warms the broker up with a throw-away topic.
3. kcat -P reads the N messages as ``key<TAB>value`` lines (key = the device, as the
   gateway's ``{topic[1]}`` template gives) with acks=all and the idempotent producer,
   like the gateway. Timed from process start to exit (it exits after the last delivery
   report).
4. The gateway: a Store (gateway.store.store.Store) is filled with the N messages (not
   timed), then the Forwarder (gateway.forwarder.Forwarder) drains it through KafkaQueue
   with ``drain_once`` until the store is empty: lease a batch, publish_batch, settle it
   in SQLite (with the chosen durability). Timed from uplink connect to the last settle.
   Each gateway record also carries the message id and MQTT topic as headers, which kcat
   cannot vary per message: the gateway sends ~70 more bytes per message.
5. Both topics' high watermarks are checked against N.

Two ceilings are measured in the same run, to show where the gateway's time goes:

- ``librdkafka``: confluent-kafka's Producer alone (the client the uplink uses) producing
  the same N messages with the gateway's keys and headers (message id, MQTT topic) and a
  delivery report per message, from Python, to a third topic.
- ``store only``: the same Forwarder draining N stored messages into an uplink that
  accepts everything at once (no network): the cost of lease + settle in SQLite.

Prints the rates and the ratio gateway / kcat (target >= 0.5).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from gateway.config import Config, ForwarderConfig, QueueConfig, StoreConfig
from gateway.forwarder import UPLINK_QUEUE, Forwarder
from gateway.message import ATTR_MESSAGE_ID, ATTR_MQTT_TOPIC, QueueMessage, new_message_id
from gateway.queue.interface import PublishResult
from gateway.store.records import NewMessage
from gateway.store.store import Store
from gateway.uplinks.kafka.settings import KafkaSettings
from gateway.uplinks.kafka.uplink import KafkaQueue
from tests.kafka_server import kafka_server, missing_requirements

DEVICES = 10


def make_messages(n: int) -> list[NewMessage]:
    now = time.time()
    out = []
    for i in range(n):
        device = f"dev-{i % DEVICES}"
        body = (f'{{"device":"{device}","seq":{i},"temp":{20 + i % 7}.5,'
                f'"ts":{now + i / 1000:.3f}}}').encode()
        out.append(NewMessage(new_message_id(), f"bench/{device}/temp", body, {},
                              received_at=now))
    return out


def write_kcat_input(path: Path, messages: list[NewMessage]) -> None:
    """``key<TAB>value`` lines, the key being the device (what ``{topic[1]}`` gives)."""
    with open(path, "wb") as fh:
        for m in messages:
            fh.write(m.topic.split("/")[1].encode() + b"\t" + m.payload + b"\n")


def settings(bootstrap: str, args: argparse.Namespace) -> KafkaSettings:
    return KafkaSettings(kafka_bootstrap_servers=bootstrap, kafka_message_key="{topic[1]}",
                         kafka_compression=args.compression, kafka_linger=0.005)


def run_kcat(bootstrap: str, topic: str, lines: Path, compression: str) -> float:
    kcat = shutil.which("kcat") or shutil.which("kafkacat")
    if kcat is None:
        sys.exit("kcat is not installed (apt-get install kcat)")
    argv = [kcat, "-P", "-b", bootstrap, "-t", topic, "-K", "\t", "-l", str(lines),
            "-X", "acks=all", "-X", "enable.idempotence=true", "-X", "linger.ms=5",
            "-X", f"compression.codec={compression}"]
    started = time.perf_counter()
    subprocess.run(argv, check=True)
    return time.perf_counter() - started


async def high_watermark(bootstrap: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        return sum((await consumer.end_offsets(tps)).values())
    finally:
        await consumer.stop()


async def create_topics(bootstrap: str, args: argparse.Namespace, *topics: str) -> None:
    async with KafkaQueue(settings(bootstrap, args)) as admin:
        for topic in topics:
            await admin.create_queue(topic, partitions=args.partitions)


def run_librdkafka(bootstrap: str, topic: str, messages: list[NewMessage],
                   compression: str) -> float:
    """confluent-kafka's Producer alone: the gateway's keys and headers, a report each."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all",
                         "enable.idempotence": True, "linger.ms": 5,
                         "compression.type": compression, "partitioner": "murmur2_random"})
    delivered = [0]

    def report(err: object, _msg: object) -> None:
        if err is None:
            delivered[0] += 1

    started = time.perf_counter()
    for i, m in enumerate(messages):
        headers = [(ATTR_MESSAGE_ID, m.id.encode()), (ATTR_MQTT_TOPIC, m.topic.encode())]
        producer.produce(topic, m.payload, m.topic.split("/")[1].encode(), headers=headers,
                         on_delivery=report)
        if i % 1000 == 999:
            producer.poll(0)
    producer.flush(60)
    elapsed = time.perf_counter() - started
    if delivered[0] != len(messages):
        sys.exit(f"librdkafka delivered {delivered[0]} of {len(messages)}")
    return elapsed


class AcceptAll:
    """An uplink that accepts every message at once: the forwarder and store alone."""

    backend_name = "accept-all"

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
    store = Store(config.store_path, config.store)
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
    store = Store(config.store_path, config.store)
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
    rd_topic = f"bench-rd-{run}"
    await create_topics(bootstrap, args, kcat_topic, gw_topic, warm_topic, rd_topic)
    messages = make_messages(args.messages)
    lines = workdir / "messages.tsv"
    write_kcat_input(lines, messages)
    run_kcat(bootstrap, warm_topic, lines, args.compression)  # JIT and page cache warm-up
    kcat_seconds = run_kcat(bootstrap, kcat_topic, lines, args.compression)
    gw_seconds, forwarder = await gateway_drain(bootstrap, gw_topic, messages, args, workdir)
    rd_seconds = await asyncio.to_thread(run_librdkafka, bootstrap, rd_topic, messages,
                                         args.compression)
    store_seconds = await store_only_drain(messages, args, workdir)
    kcat_count = await high_watermark(bootstrap, kcat_topic)
    gw_count = await high_watermark(bootstrap, gw_topic)
    n = args.messages
    kcat_rate, gw_rate = n / kcat_seconds, n / gw_seconds
    print(f"messages: {n} (~{len(messages[0].payload)} B JSON, {DEVICES} keys), "
          f"{args.partitions} partitions, compression {args.compression}, "
          f"forwarder batch {args.batch_size}, store durability {args.durability}")
    print(f"kcat -P : {kcat_seconds:7.2f} s  {kcat_rate:10,.0f} msg/s  (topic holds {kcat_count})")
    print(f"gateway : {gw_seconds:7.2f} s  {gw_rate:10,.0f} msg/s  (topic holds {gw_count}, "
          f"{forwarder.stats.batches} batches, {forwarder.stats.dead_lettered} dead-lettered)")
    print(f"ceilings: librdkafka from Python {n / rd_seconds:10,.0f} msg/s "
          f"({kcat_seconds / rd_seconds:.2f} of kcat); store lease+settle alone "
          f"{n / store_seconds:10,.0f} msg/s ({kcat_seconds / store_seconds:.2f} of kcat)")
    print(f"ratio gateway / kcat: {gw_rate / kcat_rate:.2f}  (target >= 0.5)")
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
    parser.add_argument("--bootstrap", help="use this running broker instead of starting one")
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
