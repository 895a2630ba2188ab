"""Soak benchmark: a steady QoS 1 load through the real daemon while the uplink flaps.

    python benchmarks/soak_bench.py [--rate 1000] [--minutes 10] [--flap-seconds 30]
                                    [--max-bytes-mb 64] [--svg docs/soak.svg] [--json out.json]

A private mosquitto and redis-server start on free loopback ports; the gateway daemon
(``python -m gateway run``, durability full) uplinks to Redis through tests/faultproxy.py,
which alternates ``--flap-seconds`` up and ``--flap-seconds`` cut (RST). A paho publisher
sends ``--rate`` QoS 1 messages per second (~100-byte JSON carrying its publish time) over
10 topics; a reader does ``XREAD BLOCK`` on the stream. Sampled every second from /proc: the
daemon's RSS, CPU seconds (utime+stime) and bytes written to disk (``write_bytes``), and the
store file size (db + WAL).

Reported: RSS first/max/last and the slope over the second half (flat = no leak), the
largest store size against store.max_bytes, end-to-end latency (publish time in the payload
to arrival at the reader) for messages published while the link was up (2 s after it came
up, 2 s before it went down: catch-up excluded) as p50/p99/max, catch-up time after each
outage, CPU seconds per message, disk bytes written per payload byte, lost and duplicated.

The floor, measured in the same run by a child process on the same file system: the same
records (16-byte id, 8-byte time, topic, payload, with their lengths) appended to a plain
file at the same rate, one ``fdatasync`` per commit interval (``store.commit_interval_ms``).
A partly filled 4 KiB block is written again at every sync, so no store that syncs that often
can write less; the ratio of the gateway's bytes per payload byte to the floor's is reported.
Payloads are sensor readings (~75 bytes of JSON with varying numbers), not padding.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
import paho.mqtt.client as paho
import redis as redis_py

from tests.faultproxy import FaultProxy
from tests.gateway_process import GatewayProcess, gateway_config
from tests.servers import mosquitto_server, redis_server, wait_until

TOPICS = 10
CLK_TCK = os.sysconf("SC_CLK_TCK")


_rnd = random.Random(7)


def reading(n: int) -> bytes:
    """A sensor reading of ~75 bytes: counter, publish time, three measurements."""
    return orjson.dumps({"n": n, "t": time.time(), "temp": round(_rnd.uniform(15, 30), 2),
                         "hum": round(_rnd.uniform(30, 70), 1),
                         "bat": round(_rnd.uniform(3.3, 4.2), 2)})


def floor_writer(path: str, rate: int, seconds: float, commit_ms: int, topic_root: str) -> None:
    """The floor (child process): the records appended to a plain file, one fdatasync per
    commit interval; prints its bytes written and payload bytes as JSON."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    before = proc_sample(os.getpid())["write_bytes"]
    started = time.monotonic()
    sent = payload = 0
    while (elapsed := time.monotonic() - started) < seconds:
        due = int(elapsed * rate)
        chunk = []
        while sent < due:
            body = reading(sent)
            topic = f"{topic_root}/dev{sent % TOPICS}".encode()
            chunk.append(os.urandom(16) + struct.pack("<dH", time.time(), len(topic)) + topic
                         + struct.pack("<I", len(body)) + body)
            payload += len(body)
            sent += 1
        if chunk:
            os.write(fd, b"".join(chunk))
            os.fdatasync(fd)
        time.sleep(commit_ms / 1000)
    os.close(fd)
    written = proc_sample(os.getpid())["write_bytes"] - before
    print(json.dumps({"written": written, "payload": payload, "messages": sent}))


class Load(threading.Thread):
    """Publishes ``rate`` msg/s in 10 ms slices until ``stop``; counts broker acks."""

    def __init__(self, port: int, root: str, rate: int) -> None:
        super().__init__(daemon=True, name="load")
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2,
                                  client_id=f"soak-pub-{uuid.uuid4().hex[:6]}", protocol=paho.MQTTv5)
        self.client.max_inflight_messages_set(0)
        self.client.max_queued_messages_set(0)
        self.client.on_publish = self._acked
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.root, self.rate = root, rate
        self.sent = self.acked = 0
        self.payload_bytes = 0
        self.halt = threading.Event()

    def _acked(self, *args: Any) -> None:
        self.acked += 1

    def run(self) -> None:
        started = time.monotonic()
        while not self.halt.is_set():
            due = int((time.monotonic() - started) * self.rate)
            while self.sent < due:
                body = reading(self.sent)
                self.client.publish(f"{self.root}/dev{self.sent % TOPICS}", body, qos=1)
                self.payload_bytes += len(body)
                self.sent += 1
            self.halt.wait(0.01)


class Reader(threading.Thread):
    """XREAD BLOCK on the stream; records (publish time, arrival time, n) per entry."""

    def __init__(self, port: int, stream: str) -> None:
        super().__init__(daemon=True, name="reader")
        self.client = redis_py.Redis(host="127.0.0.1", port=port)
        self.stream = stream
        self.arrivals: list[tuple[float, float, int]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        last = "0-0"
        while not self.halt.is_set():
            reply = self.client.xread({self.stream: last}, count=5000, block=500)
            now = time.time()
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    msg = orjson.loads(fields[b"body"])
                    self.arrivals.append((msg["t"], now, msg["n"]))


def proc_sample(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(stat[11]) + int(stat[12])) / CLK_TCK  # utime, stime (fields 14, 15)
    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return {"rss_mb": rss_kb / 1024, "cpu_s": cpu, "write_bytes": float(io["write_bytes"])}


def sample(pid: int, store: Path, reader: Reader, samples: list[dict[str, float]], *,
           elapsed: float, up: bool) -> dict[str, float]:
    """One second's figures: the daemon's /proc counters, the store's size, deliveries and
    the worst publish-to-arrival latency of the messages that arrived since the last one."""
    seen = len(reader.arrivals)
    fresh = reader.arrivals[int(samples[-1]["delivered"]) if samples else 0:seen]
    worst = max((arr - pub for pub, arr, _ in fresh), default=0.0) * 1000
    return {"t": elapsed, "up": float(up), "store_mb": store_mb(store), "delivered": float(seen),
            "latency_max_ms": round(worst, 1), **proc_sample(pid)}


def store_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists()) / 1024**2


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    broker = mosquitto_server(tmp / "mosquitto")
    redis = redis_server(tmp / "redis")
    broker.start()
    redis.start()
    root, stream = f"soak/{uuid.uuid4().hex[:6]}", "soak-stream"
    duration = args.minutes * 60
    proxy = FaultProxy(redis.port, lifetime=duration + 600).start()
    queue = {"type": "redis", "redis_url": f"redis://127.0.0.1:{proxy.port}/0",
             "request_queue_name": stream, "redis_socket_timeout": "2s", "redis_maxlen": 200_000}
    config = gateway_config(tmp, broker.port, root, queue, logging={"level": "INFO"},
                            store={"max_bytes": f"{args.max_bytes_mb}MB",
                                   "compression": args.compression,
                                   "commit_interval_ms": args.commit_interval_ms},
                            ingress={"reconnect_max_delay": "1s"},
                            forwarder={"retry_max_delay": "1s"})
    gw = GatewayProcess(config, tmp)
    gw.start()
    assert gw.proc is not None
    pid, store = gw.proc.pid, tmp / "state" / "store.db"
    reader = Reader(redis.port, stream)
    reader.start()
    load = Load(broker.port, root, args.rate)
    base = proc_sample(pid)
    started = time.time()
    floor = subprocess.Popen([sys.executable, __file__, "--floor-child", str(tmp / "floor.log"),
                              "--rate", str(args.rate), "--minutes", str(args.minutes),
                              "--commit-interval-ms", str(args.commit_interval_ms)],
                             stdout=subprocess.PIPE, text=True)
    load.start()
    samples: list[dict[str, float]] = []
    phases: list[tuple[float, bool]] = [(0.0, True)]  # (start offset, link up)
    proxy.set_mode("flapping", up_seconds=args.flap_seconds, down_seconds=args.flap_seconds)
    try:
        while (elapsed := time.time() - started) < duration:
            up = not proxy.link_down
            if up != phases[-1][1]:
                phases.append((elapsed, up))
            samples.append(sample(pid, store, reader, samples, elapsed=elapsed, up=up))
            time.sleep(1.0)
    finally:
        load.halt.set()
        load.join(10)
    proxy.set_mode("up")
    wait_until(lambda: load.acked >= load.sent, 60, "every publish acknowledged")
    wait_until(lambda: len({n for _, _, n in reader.arrivals}) >= load.sent, 300, "all delivered")
    end = proc_sample(pid)
    floor_out, _ = floor.communicate(timeout=120)
    floor_result = json.loads(floor_out.strip().splitlines()[-1])
    gw.stop()
    reader.halt.set()
    reader.join(5)
    proxy.stop()
    broker.stop()
    redis.stop()
    return summarize(args, Observed(load, reader, samples, phases, started, base, end,
                                    floor_result))


@dataclass
class Observed:
    load: Load
    reader: Reader
    samples: list[dict[str, float]]
    phases: list[tuple[float, bool]]
    started: float
    base: dict[str, float]
    end: dict[str, float]
    floor: dict[str, float]


def summarize(args: argparse.Namespace, obs: Observed) -> dict[str, Any]:
    load, reader, samples, phases = obs.load, obs.reader, obs.samples, obs.phases
    started, base, end = obs.started, obs.base, obs.end
    duration = args.minutes * 60
    bounds = [(t0, phases[i + 1][0] if i + 1 < len(phases) else duration, up)
              for i, (t0, up) in enumerate(phases)]
    online: list[float] = []
    for t_pub, t_arr, _ in reader.arrivals:
        offset = t_pub - started
        if any(up and t0 + 2 <= offset <= t1 - 2 for t0, t1, up in bounds):
            online.append((t_arr - t_pub) * 1000)
    catch_up = []
    for t0, _, up in bounds[1:]:
        if up:  # first arrival of a message published after the link came back
            firsts = [t_arr - started - t0 for t_pub, t_arr, _ in reader.arrivals
                      if t_pub - started >= t0]
            if firsts:
                catch_up.append(round(min(firsts), 1))
    half = [s for s in samples if s["t"] >= duration / 2]
    rss_slope = ((half[-1]["rss_mb"] - half[0]["rss_mb"]) / ((half[-1]["t"] - half[0]["t"]) / 60)
                 if len(half) > 1 else 0.0)
    delivered = len({n for _, _, n in reader.arrivals})
    written = (end["write_bytes"] - base["write_bytes"]) / max(1, load.payload_bytes)
    floor_bpb = obs.floor["written"] / max(1, obs.floor["payload"])
    return {
        "rate": args.rate, "minutes": args.minutes, "flap_seconds": args.flap_seconds,
        "published": load.sent, "acknowledged": load.acked, "delivered_unique": delivered,
        "lost": load.sent - delivered, "duplicates": len(reader.arrivals) - delivered,
        "rss_mb": {"first": round(samples[0]["rss_mb"], 1),
                   "max": round(max(s["rss_mb"] for s in samples), 1),
                   "last": round(samples[-1]["rss_mb"], 1),
                   "slope_second_half_mb_per_min": round(rss_slope, 2)},
        "store_mb_max": round(max(s["store_mb"] for s in samples), 1),
        "max_bytes_mb": args.max_bytes_mb,
        "latency_online_ms": {"count": len(online), "p50": round(percentile(online, 0.5), 1),
                              "p99": round(percentile(online, 0.99), 1),
                              "max": round(max(online, default=float("nan")), 1)},
        "catch_up_seconds": catch_up,
        "cpu_ms_per_message": round((end["cpu_s"] - base["cpu_s"]) * 1000 / max(1, delivered), 3),
        "disk_bytes_per_payload_byte": round(written, 2),
        "floor_bytes_per_payload_byte": round(floor_bpb, 2),
        "ratio_to_floor": round(written / floor_bpb, 2) if floor_bpb else None,
        "compression": args.compression, "commit_interval_ms": args.commit_interval_ms,
        "samples": samples, "phases": bounds,
    }


def svg(result: dict[str, Any]) -> str:
    """Three stacked charts over time (RSS, store size, delivered/s), outages shaded."""
    samples, phases = result["samples"], result["phases"]
    width, height, left, top = 720, 150, 60, 24
    t_max = max(s["t"] for s in samples) or 1
    rates = [0.0] + [b["delivered"] - a["delivered"] for a, b in itertools.pairwise(samples)]
    panels = [("gateway RSS (MB)", [s["rss_mb"] for s in samples]),
              ("store file, db + WAL (MB)", [s["store_mb"] for s in samples]),
              ("delivered to Redis (msg/s)", rates)]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + left + 20}" '
           f'height="{len(panels) * (height + top + 20) + 30}" font-family="sans-serif" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>']
    for i, (title, values) in enumerate(panels):
        y0 = i * (height + top + 20) + top
        v_max = max(*values, 1e-9) * 1.1

        def x(t: float) -> float:
            return left + t / t_max * width

        def y(v: float, y0: float = y0, v_max: float = v_max) -> float:
            return y0 + height - v / v_max * height

        for t0, t1, up in phases:
            if not up:
                out.append(f'<rect x="{x(t0):.1f}" y="{y0}" width="{x(min(t1, t_max)) - x(t0):.1f}" '
                           f'height="{height}" fill="#f3d6d6"/>')
        out.append(f'<rect x="{left}" y="{y0}" width="{width}" height="{height}" fill="none" stroke="#888"/>')
        out.append(f'<text x="{left}" y="{y0 - 6}" font-weight="bold">{title}</text>')
        out.append(f'<text x="{left - 4}" y="{y0 + 10}" text-anchor="end">{v_max / 1.1:.0f}</text>')
        out.append(f'<text x="{left - 4}" y="{y0 + height}" text-anchor="end">0</text>')
        points = " ".join(f"{x(s['t']):.1f},{y(v):.1f}" for s, v in zip(samples, values, strict=True))
        out.append(f'<polyline fill="none" stroke="#1f5fa8" stroke-width="1.5" points="{points}"/>')
    bottom = len(panels) * (height + top + 20) + 10
    out.append(f'<text x="{left}" y="{bottom}">time (s), 0..{t_max:.0f}; shaded: uplink cut '
               f'(flapping every {result["flap_seconds"]} s), {result["rate"]} msg/s QoS 1</text>')
    out.append("</svg>")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=int, default=1000, help="messages per second")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--flap-seconds", type=float, default=30.0, help="up this long, then cut this long")
    p.add_argument("--max-bytes-mb", type=int, default=64, help="store.max_bytes in MB")
    p.add_argument("--svg", help="write a plot here")
    p.add_argument("--json", help="write the full result (with samples) here")
    p.add_argument("--compression", choices=["zlib", "none"], default="zlib",
                   help="store.compression of the gateway")
    p.add_argument("--commit-interval-ms", type=int, default=20,
                   help="store.commit_interval_ms, and the floor's sync interval")
    p.add_argument("--floor-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.floor_child:
        floor_writer(args.floor_child, args.rate, args.minutes * 60, args.commit_interval_ms,
                     "soak/floor")
        return
    result = run(args)
    if args.svg:
        Path(args.svg).write_text(svg(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("samples", "phases")}, indent=1))


if __name__ == "__main__":
    main()
