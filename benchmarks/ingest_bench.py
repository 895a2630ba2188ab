"""Ingest benchmark: drain a persistent-session QoS 1 backlog with `mosquitto_sub` and with the
gateway (MqttIngress + Store, ack after durable commit), on the same broker in the same run.

    python benchmarks/ingest_bench.py [--messages 100000] [--durability full|normal]
                                      [--protocol 5|3.1.1] [--receive-maximum 2000]

What happens:

1. A private mosquitto starts on a free loopback port in a temp dir (persistence on, no
   queue or in-flight limits, autosave only at exit so periodic snapshots do not disturb
   the timing).
2. Each round (``--rounds``, default 3) creates two persistent sessions (client A_r for
   mosquitto_sub, client B_r for the gateway): connect with clean start false and a long
   session expiry, subscribe to ``bench/<run>/<r>/#`` with QoS 1, disconnect.
3. N QoS 1 messages of ~80 bytes of JSON over 10 topics are published (paho) and the script
   waits until every one is PUBACKed: both sessions now hold a backlog of N.
4. mosquitto_sub drains A_r, measured from process start
   to process exit (includes its process start, connect and subscribe; it acks on receipt,
   stores nothing); then the gateway drains B_r into a fresh store, measured from
   ``MqttIngress.run()`` start (connect included) until the N-th PUBACK was written, i.e.
   until all N are committed in the SQLite store with the chosen durability and acknowledged.

Prints both rates per round, the ratio gateway / mosquitto_sub per round and their median,
and the store's commit figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.config import IngressConfig, StoreConfig, Subscription
from gateway.ingress import MqttIngress
from gateway.store.store import Store
from tests.servers import mosquitto_server

SESSION_EXPIRY = 3600
TOPICS = 10


def _paho(client_id: str, protocol: str) -> paho.Client:
    version = paho.MQTTv5 if protocol == "5" else paho.MQTTv311
    kwargs = {} if protocol == "5" else {"clean_session": False}
    return paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                       protocol=version, **kwargs)


def _connect(client: paho.Client, port: int, protocol: str) -> None:
    if protocol == "5":
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY
        client.connect("127.0.0.1", port, clean_start=False, properties=props)
    else:
        client.connect("127.0.0.1", port)


def create_session(port: int, client_id: str, topic_filter: str, protocol: str) -> None:
    client = _paho(client_id, protocol)
    subscribed = threading.Event()
    client.on_subscribe = lambda *args: subscribed.set()
    _connect(client, port, protocol)
    client.loop_start()
    client.subscribe(topic_filter, qos=1)
    if not subscribed.wait(10):
        raise RuntimeError(f"no SUBACK for {client_id}")
    client.disconnect()
    client.loop_stop()


def publish_backlog(port: int, prefix: str, count: int) -> float:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}",
                         protocol=paho.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    done = threading.Event()
    # paho keys unacknowledged messages by packet id: keep well under 65535 outstanding
    window = threading.BoundedSemaphore(5000)
    acked = 0

    def on_publish(*_: object) -> None:
        nonlocal acked
        acked += 1
        window.release()
        if acked == count:
            done.set()

    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    client.loop_start()
    started = time.monotonic()
    for i in range(count):
        payload = (f'{{"sensor":"s-{i % TOPICS:02d}","seq":{i:08d},"t":{time.time():.3f},'
                   f'"temp":21.5,"hum":40.25}}').encode()
        window.acquire()
        client.publish(f"{prefix}/sensor/{i % TOPICS}", payload, qos=1)
    if not done.wait(300):
        raise RuntimeError(f"only {acked} of {count} publishes acknowledged")
    elapsed = time.monotonic() - started
    client.disconnect()
    client.loop_stop()
    return elapsed


def drain_with_mosquitto_sub(port: int, client_id: str, topic_filter: str, count: int,
                             protocol: str) -> float:
    binary = shutil.which("mosquitto_sub")
    if binary is None:
        raise SystemExit("mosquitto_sub is not installed (apt-get install mosquitto-clients)")
    version = "mqttv5" if protocol == "5" else "mqttv311"
    argv = [binary, "-h", "127.0.0.1", "-p", str(port), "-c", "-i", client_id, "-q", "1",
            "-t", topic_filter, "-C", str(count), "-V", version]
    if protocol == "5":
        argv += ["-x", str(SESSION_EXPIRY)]
    started = time.monotonic()
    subprocess.run(argv, stdout=subprocess.DEVNULL, check=True, timeout=600)
    return time.monotonic() - started


async def drain_with_gateway(port: int, client_id: str, topic_filter: str, count: int, *,
                             args: argparse.Namespace, workdir: Path) -> tuple[float, Store, int]:
    store = Store(str(workdir / f"store-{uuid.uuid4().hex[:6]}.db"),
                  StoreConfig(durability=args.durability))
    await store.open()
    cfg = IngressConfig(host="127.0.0.1", port=port, protocol=args.protocol,
                        subscriptions=[Subscription(topic_filter, 1)],
                        receive_maximum=args.receive_maximum)
    ingress = MqttIngress(cfg, client_id, lambda msgs: store.append("default", msgs))
    started = time.monotonic()
    task = asyncio.create_task(ingress.run(), name="ingress")
    # A harness check every 2 ms; the ingress itself never polls.
    while ingress.acked < count:
        if task.done():
            task.result()
            raise RuntimeError("the ingress stopped")
        await asyncio.sleep(0.002)
    elapsed = time.monotonic() - started
    await ingress.stop()
    depth = await store.depth("default")
    await store.close()
    return elapsed, store, depth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--durability", choices=["full", "normal"], default="full")
    parser.add_argument("--protocol", choices=["5", "3.1.1"], default="5")
    parser.add_argument("--receive-maximum", type=int, default=IngressConfig().receive_maximum)
    parser.add_argument("--max-inflight", type=int, default=0,
                        help="mosquitto max_inflight_messages (0 = unlimited; its default "
                             "is 20, which caps an MQTT 3.1.1 subscriber's window)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", metavar="FILE", help="cProfile the gateway drain into FILE")
    args = parser.parse_args()
    count = args.messages
    run_id = uuid.uuid4().hex[:8]
    prefix = f"bench/{run_id}"
    topic_filter = f"{prefix}/#"
    rounds: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        workdir = Path(tmp)
        server = mosquitto_server(workdir / "mosquitto", extra_conf=(
            f"autosave_interval 0\nmax_inflight_messages {args.max_inflight}\n"))
        server.start()
        try:
            for r in range(args.rounds):
                client_a, client_b = f"bench-sub-{run_id}-{r}", f"bench-gw-{run_id}-{r}"
                topic_filter = f"{prefix}/{r}/#"
                create_session(server.port, client_a, topic_filter, args.protocol)
                create_session(server.port, client_b, topic_filter, args.protocol)
                pub_seconds = publish_backlog(server.port, f"{prefix}/{r}", count)
                print(f"published {count} QoS 1 messages in {pub_seconds:.2f}s "
                      f"({count / pub_seconds:,.0f} msg/s); backlog of {count} for each session")
                sub_seconds = drain_with_mosquitto_sub(server.port, client_a, topic_filter,
                                                       count, args.protocol)
                if args.profile:
                    import cProfile
                    profiler = cProfile.Profile()
                    profiler.enable()
                gw_seconds, store, depth = asyncio.run(
                    drain_with_gateway(server.port, client_b, topic_filter, count, args=args,
                                       workdir=workdir))
                if args.profile:
                    profiler.disable()
                    profiler.dump_stats(args.profile)
                if depth != count:
                    raise SystemExit(f"expected {count} stored messages, found {depth}")
                rounds.append((sub_seconds, gw_seconds))
                print(f"round {len(rounds)}: mosquitto_sub {count / sub_seconds:10,.0f} msg/s, "
                      f"gateway {count / gw_seconds:10,.0f} msg/s, ratio "
                      f"{sub_seconds / gw_seconds:.2f}; {store.commits} commits")
        finally:
            server.stop()
    ratios = sorted(sub / gw for sub, gw in rounds)
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}")
    print(f"protocol MQTT {args.protocol}, durability={args.durability}, "
          f"commit_interval_ms={store.cfg.commit_interval_ms}, "
          f"commit_batch_size={store.cfg.commit_batch_size}, "
          f"receive_maximum={args.receive_maximum}, "
          f"broker max_inflight_messages={args.max_inflight}")
    print(f"median ratio gateway/mosquitto_sub over {len(ratios)} rounds: "
          f"{ratios[len(ratios) // 2]:.2f} (all: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
