"""Soak benchmark: a steady QoS 1 load through the real daemon while the uplink flaps.

    python benchmarks/soak_bench.py [--rate 1000] [--minutes 10] [--flap-seconds 30]
                                    [--ack-when stored|uplinked_or_stored|both]
                                    [--max-bytes-mb 64] [--svg docs/soak.svg] [--json out.json]

A private mosquitto and redis-server start on free loopback ports; the gateway daemon
(``python -m gateway run``, durability full) uplinks to Redis through tests/faultproxy.py,
which alternates ``--flap-seconds`` up and ``--flap-seconds`` cut (RST); with
``--flap-seconds 0`` the proxy stays up and the uplink is never cut. A paho publisher
sends ``--rate`` QoS 1 messages per second (~100-byte JSON carrying its publish time) over
10 topics; a reader does ``XREAD BLOCK`` on the stream. Sampled every second from /proc: the
daemon's RSS, CPU seconds (utime+stime) and bytes written to disk (``write_bytes``), and the
store file size (db + WAL).

Reported: RSS first/max/last and the slope over the second half (flat = no leak), the
largest store size against store.max_bytes, end-to-end latency (publish time in the payload
to arrival at the reader) for messages published while the link was up as p50/p99/max
(excluded: the first 2 s of the run; after each reconnect 2 s, or until 0.5 s after the
catch-up when the backlog took longer to deliver; the 2 s before each cut; i.e. warm-up and
catch-up; with ``--flap-seconds 0`` only the first 2 s), catch-up time
after each outage, CPU per message, disk bytes written per payload byte, lost and duplicated,
and from the daemon's /metrics (at the end, when it has them) the messages acknowledged
without a store write, offered from memory then stored, and uplinked from memory, the ingress
payload bytes, the store's append commits and the batches sent to the uplink.

Write-avoidance (issue #16): ``--ack-when`` sets the uplink's ``forwarder.ack_when``.
``stored`` writes no key (the Redis backend's default, ``stored``: the same daemon config as
before the setting existed); ``uplinked_or_stored`` writes it. ``both`` (the default) runs the
whole soak twice in one invocation, ``stored`` first, each with fresh servers, a fresh store
and its own floor, and then compares them: bytes written per payload byte
(uplinked_or_stored / stored; target <= 0.5 with the uplink flapping) and p99 latency
(uplinked_or_stored / stored). With ``--flap-seconds 0`` (never cut) the targets are
<= 0.3 bytes written per payload byte with ``uplinked_or_stored``, a p99 ratio <= 1.2 and
0 lost. Targets are printed with a check mark (met) or a cross (missed) after the figures.

The floor, measured in each run (twice with ``both``) by a child process on the same file
system, alongside the soak: the same records (16-byte id, 8-byte time, topic, payload, with
their lengths) appended to a plain file at the same rate, one ``fdatasync`` per commit
interval (``store.commit_interval_ms``). A partly filled 4 KiB block is written again at
every sync, so no store that syncs that often can write less; the ratio of the gateway's bytes
per payload byte to the floor's is reported. Payloads are sensor readings (~75 bytes of JSON
with varying numbers), not padding.

Output: the figures as JSON (without the per-second samples; ``both``: one object per mode
and a ``comparison``), then a table and the targets. ``--json`` writes the same with the
samples; ``--svg`` plots a run (``both``: one file per mode, the mode before the suffix).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
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
MODES = ("stored", "uplinked_or_stored")
#: seconds of a link-up phase not counted for the online latency: at the start of the run
#: (warm-up), after each reconnect (catch-up) and before each cut
SETTLE = 2.0
#: after a reconnect, latency counts again this long after the backlog was delivered
CATCH_UP_MARGIN = 0.5
#: the /metrics counters read at the end of a run (absent before the daemon has them)
#: (a counter with labels, such as one per uplink, is summed over them)
METRICS = {"acked_without_write": "openhqm_gateway_acked_without_write_total",
           "stored_after_offer": "openhqm_gateway_stored_after_offer_total",
           "uplinked_from_memory": "openhqm_gateway_uplinked_from_memory_total",
           "ingress_payload_bytes": "openhqm_gateway_ingress_payload_bytes_total",
           "store_commits": "openhqm_gateway_store_commits_total",
           "uplink_batches": "openhqm_gateway_batches_total"}


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


def run(args: argparse.Namespace, ack_when: str) -> dict[str, Any]:
    """One soak with ``forwarder.ack_when`` = ``ack_when`` (``stored``: the key is not
    written, the backend's default); fresh servers, store and floor."""
    tmp = Path(tempfile.mkdtemp(prefix=f"soak-{ack_when}-"))
    broker = mosquitto_server(tmp / "mosquitto")
    redis = redis_server(tmp / "redis")
    broker.start()
    redis.start()
    root, stream = f"soak/{uuid.uuid4().hex[:6]}", "soak-stream"
    duration = args.minutes * 60
    proxy = FaultProxy(redis.port, lifetime=duration + 600).start()
    queue = {"type": "redis", "redis_url": f"redis://127.0.0.1:{proxy.port}/0",
             "request_queue_name": stream, "redis_socket_timeout": "2s", "redis_maxlen": 200_000}
    forwarder: dict[str, Any] = {"retry_max_delay": "1s"}
    if ack_when != "stored":
        forwarder["ack_when"] = ack_when
    config = gateway_config(tmp, broker.port, root, queue, logging={"level": "INFO"},
                            store={"max_bytes": f"{args.max_bytes_mb}MB",
                                   "compression": args.compression,
                                   "commit_interval_ms": args.commit_interval_ms},
                            ingress={"reconnect_max_delay": "1s"},
                            forwarder=forwarder)
    gw = GatewayProcess(config, tmp)
    try:
        gw.start()
        observed = measure(args, gw, proxy, tmp, broker_port=broker.port,
                           redis_port=redis.port, root=root, stream=stream)
        return summarize(args, ack_when, observed)
    finally:
        gw.stop()
        proxy.stop()
        broker.stop()
        redis.stop()


def measure(args: argparse.Namespace, gw: GatewayProcess, proxy: FaultProxy, tmp: Path, *,
            broker_port: int, redis_port: int, root: str, stream: str) -> Observed:
    """The load, the reader, the floor and the samples, while the proxy flaps (or not)."""
    assert gw.proc is not None
    pid, store = gw.proc.pid, tmp / "state" / "store.db"
    duration = args.minutes * 60
    reader = Reader(redis_port, stream)
    reader.start()
    load = Load(broker_port, root, args.rate)
    floor: subprocess.Popen[str] | None = None
    try:
        base = proc_sample(pid)
        started = time.time()
        floor = subprocess.Popen([sys.executable, __file__, "--floor-child", str(tmp / "floor.log"),
                                  "--rate", str(args.rate), "--minutes", str(args.minutes),
                                  "--commit-interval-ms", str(args.commit_interval_ms)],
                                 stdout=subprocess.PIPE, text=True)
        load.start()
        samples: list[dict[str, float]] = []
        phases: list[tuple[float, bool]] = [(0.0, True)]  # (start offset, link up)
        if args.flap_seconds > 0:
            proxy.set_mode("flapping", up_seconds=args.flap_seconds,
                           down_seconds=args.flap_seconds)
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
        wait_until(lambda: len({n for _, _, n in reader.arrivals}) >= load.sent, 300,
                   "all delivered")
        end = proc_sample(pid)
        metrics = read_metrics(gw)
        floor_out, _ = floor.communicate(timeout=120)
        floor_result = json.loads(floor_out.strip().splitlines()[-1])
    finally:
        if floor is not None and floor.poll() is None:
            floor.kill()
            floor.wait(10)
        load.halt.set()
        load.client.loop_stop()
        load.client.disconnect()
        reader.halt.set()
        reader.join(5)
    return Observed(load, reader, samples, phases, started, base, end, floor_result, metrics)


def read_metrics(gw: GatewayProcess) -> dict[str, float | None]:
    """The METRICS counters from the daemon's /metrics (loopback); None for one it lacks."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no http_proxy
    try:
        with opener.open(f"{gw.http_url()}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    except (OSError, AssertionError) as exc:
        print(f"(no /metrics: {exc})", file=sys.stderr)
        text = ""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            name = name.split("{", 1)[0]
            values[name] = values.get(name, 0.0) + float(value)
    return {key: values.get(full) for key, full in METRICS.items()}


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
    metrics: dict[str, float | None]


def summarize(args: argparse.Namespace, ack_when: str, obs: Observed) -> dict[str, Any]:
    load, reader, samples, phases = obs.load, obs.reader, obs.samples, obs.phases
    started, base, end = obs.started, obs.base, obs.end
    duration = args.minutes * 60
    bounds = [(t0, phases[i + 1][0] if i + 1 < len(phases) else duration, up)
              for i, (t0, up) in enumerate(phases)]
    catch_up = []
    settle_after: dict[int, float] = {0: SETTLE}  # phase index -> seconds excluded after it began
    for i, (t0, _, up) in enumerate(bounds):
        if up and i:  # first arrival of a message published after the link came back
            firsts = [t_arr - started - t0 for t_pub, t_arr, _ in reader.arrivals
                      if t_pub - started >= t0]
            if firsts:
                catch_up.append(round(min(firsts), 1))
            # what was published before the backlog was delivered waited behind it
            settle_after[i] = max(SETTLE, min(firsts, default=0.0) + CATCH_UP_MARGIN)
    # online: SETTLE s after the start; after each reconnect SETTLE s or until the backlog was
    # delivered (catch-up + CATCH_UP_MARGIN), whichever is longer; SETTLE s before each cut
    # (the last phase ends with the run, not with a cut: nothing excluded there)
    windows = [(t0 + settle_after.get(i, SETTLE), t1 - SETTLE if i + 1 < len(bounds) else t1)
               for i, (t0, t1, up) in enumerate(bounds) if up]
    online: list[float] = []
    for t_pub, t_arr, _ in reader.arrivals:
        offset = t_pub - started
        if any(w0 <= offset <= w1 for w0, w1 in windows):
            online.append((t_arr - t_pub) * 1000)
    half = [s for s in samples if s["t"] >= duration / 2]
    rss_slope = ((half[-1]["rss_mb"] - half[0]["rss_mb"]) / ((half[-1]["t"] - half[0]["t"]) / 60)
                 if len(half) > 1 else 0.0)
    delivered = len({n for _, _, n in reader.arrivals})
    written_bytes = end["write_bytes"] - base["write_bytes"]
    written = written_bytes / max(1, load.payload_bytes)
    floor_bpb = obs.floor["written"] / max(1, obs.floor["payload"])
    cpu_s = end["cpu_s"] - base["cpu_s"]
    return {
        "ack_when": ack_when,
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
        "latency_online_excludes": latency_excludes(args.flap_seconds),
        "catch_up_seconds": catch_up,
        "cpu_ms_per_message": round(cpu_s * 1000 / max(1, delivered), 3),
        "disk_bytes_per_payload_byte": round(written, 2),
        "floor_bytes_per_payload_byte": round(floor_bpb, 2),
        "ratio_to_floor": round(written / floor_bpb, 2) if floor_bpb else None,
        "compression": args.compression, "commit_interval_ms": args.commit_interval_ms,
        "disk_bytes_written": int(written_bytes), "payload_bytes": load.payload_bytes,
        "floor": obs.floor,
        "outages": sum(1 for _, _, up in bounds if not up),
        # from the daemon's /metrics at the end (None: the daemon has no such counter)
        **{key: (int(v) if v is not None else None) for key, v in obs.metrics.items()},
        "samples": samples, "phases": bounds,
    }


def latency_excludes(flap_seconds: float) -> str:
    if flap_seconds > 0:
        return (f"messages published in the first {SETTLE:g} s, after each reconnect for "
                f"{SETTLE:g} s or until {CATCH_UP_MARGIN:g} s after the catch-up (whichever is "
                f"longer), in the {SETTLE:g} s before each cut, and during outages")
    return f"messages published in the first {SETTLE:g} s (warm-up)"


def bytes_per_payload_byte(result: dict[str, Any]) -> float:
    return float(result["disk_bytes_written"]) / max(1, result["payload_bytes"])


def ratio(a: float, b: float) -> float | None:
    return None if not b or math.isnan(a) or math.isnan(b) else a / b


def targets(runs: dict[str, dict[str, Any]], flap_seconds: float) -> list[dict[str, Any]]:
    """issue #16's targets that these runs can judge: {what, value, target, met}."""
    out: list[dict[str, Any]] = []
    stored, fast = runs.get("stored"), runs.get("uplinked_or_stored")

    def add(what: str, value: float | None, target: str, met: bool | None) -> None:
        out.append({"what": what, "value": None if value is None else round(value, 3),
                    "target": target, "met": met})

    if stored and fast:
        bpb = ratio(bytes_per_payload_byte(fast), bytes_per_payload_byte(stored))
        p99 = ratio(fast["latency_online_ms"]["p99"], stored["latency_online_ms"]["p99"])
        if flap_seconds > 0:
            add("bytes written per payload byte, uplinked_or_stored / stored", bpb, "<= 0.5",
                None if bpb is None else bpb <= 0.5)
            add("p99 latency online, uplinked_or_stored / stored", p99, "(no target while flapping)",
                None)
        else:
            add("bytes written per payload byte, uplinked_or_stored / stored", bpb,
                "(no target when never cut)", None)
            add("p99 latency, uplinked_or_stored / stored", p99, "<= 1.2",
                None if p99 is None else p99 <= 1.2)
    if fast and flap_seconds <= 0:
        value = bytes_per_payload_byte(fast)
        add("bytes written per payload byte, uplinked_or_stored", value, "<= 0.3", value <= 0.3)
    for mode, result in runs.items():
        add(f"lost, {mode}", result["lost"], "0", result["lost"] == 0)
    return out


def report(runs: dict[str, dict[str, Any]], flap_seconds: float) -> str:
    """The runs side by side, then the targets, each with a check mark or a cross."""
    first = next(iter(runs.values()))
    link = (f"uplink cut every {flap_seconds:g} s for {flap_seconds:g} s" if flap_seconds > 0
            else "uplink never cut")
    lines = [f"soak: {first['rate']} msg/s QoS 1 for {first['minutes']:g} min, {link}, "
             f"commit_interval_ms {first['commit_interval_ms']}, compression "
             f"{first['compression']}; each run has fresh servers, a fresh store and its own "
             "floor (measured alongside it)"]

    def num(v: Any, fmt: str = ",") -> str:
        return "n/a" if v is None else format(v, fmt)

    rows: list[tuple[str, list[str]]] = [
        ("published / acknowledged / delivered", [
            f"{r['published']:,} / {r['acknowledged']:,} / {r['delivered_unique']:,}"
            for r in runs.values()]),
        ("lost / duplicates", [f"{r['lost']} / {r['duplicates']}" for r in runs.values()]),
        ("disk bytes written per payload byte", [
            f"{bytes_per_payload_byte(r):.3f}" for r in runs.values()]),
        ("floor (plain file, fdatasync per commit)", [
            f"{r['floor_bytes_per_payload_byte']:.2f} (x{r['ratio_to_floor']})"
            for r in runs.values()]),
        ("disk MB written / payload MB", [
            f"{r['disk_bytes_written'] / 1e6:.1f} / {r['payload_bytes'] / 1e6:.1f}"
            for r in runs.values()]),
        ("acked without a write (/metrics)", [num(r["acked_without_write"]) for r in runs.values()]),
        ("offered, then stored (/metrics)", [num(r["stored_after_offer"]) for r in runs.values()]),
        ("uplinked from memory (/metrics)", [num(r["uplinked_from_memory"]) for r in runs.values()]),
        ("store append commits (/metrics)", [num(r["store_commits"]) for r in runs.values()]),
        ("batches sent to the uplink (/metrics)", [num(r["uplink_batches"]) for r in runs.values()]),
        ("latency online p50 / p99 / max (ms)", [
            "{p50} / {p99} / {max}".format(**r["latency_online_ms"]) for r in runs.values()]),
        ("  messages counted", [f"{r['latency_online_ms']['count']:,}" for r in runs.values()]),
        ("catch-up after outages (s)", [
            ", ".join(map(str, r["catch_up_seconds"])) or "-" for r in runs.values()]),
        ("CPU per message (us)", [f"{r['cpu_ms_per_message'] * 1000:.0f}" for r in runs.values()]),
        ("RSS first / max / last (MB)", [
            "{first} / {max} / {last}".format(**r["rss_mb"]) for r in runs.values()]),
        ("store file max, db + WAL (MB)", [f"{r['store_mb_max']}" for r in runs.values()]),
    ]
    width = max(len(label) for label, _ in rows) + 2
    col = max(20, *(len(v) + 2 for _, values in rows for v in values))
    lines.append(f"{'':{width}s}" + "".join(f"{mode:>{col}s}" for mode in runs))
    lines.extend(f"{label:{width}s}" + "".join(f"{v:>{col}s}" for v in values)
                 for label, values in rows)
    lines.append(f"latency online excludes {first['latency_online_excludes']}")
    checks = targets(runs, flap_seconds)
    if checks:
        lines.append("issue #16 targets:")
    for c in checks:
        mark = {True: "✓", False: "✗", None: " "}[c["met"]]
        value = "n/a" if c["value"] is None else f"{c['value']:g}"
        lines.append(f"  {mark} {c['what']}: {value}  (target {c['target']})"
                     if not c["target"].startswith("(") else
                     f"  {mark} {c['what']}: {value}  {c['target']}")
    return "\n".join(lines)


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
    link = (f'shaded: uplink cut (flapping every {result["flap_seconds"]} s)'
            if result["flap_seconds"] > 0 else "uplink never cut")
    mode = f', ack_when {result["ack_when"]}' if "ack_when" in result else ""
    out.append(f'<text x="{left}" y="{bottom}">time (s), 0..{t_max:.0f}; {link}, '
               f'{result["rate"]} msg/s QoS 1{mode}</text>')
    out.append("</svg>")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=int, default=1000, help="messages per second")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--flap-seconds", type=float, default=30.0,
                   help="up this long, then cut this long; 0: never cut")
    p.add_argument("--ack-when", choices=[*MODES, "both"], default="both",
                   help="forwarder.ack_when of the uplink (stored: the key is not written); "
                        "both: a run with each, stored first, then their ratios")
    p.add_argument("--max-bytes-mb", type=int, default=64, help="store.max_bytes in MB")
    p.add_argument("--svg", help="write a plot here (both: one per mode, the mode before the suffix)")
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
    modes = list(MODES) if args.ack_when == "both" else [args.ack_when]
    runs: dict[str, dict[str, Any]] = {}
    for mode in modes:
        if len(modes) > 1:
            print(f"run {len(runs) + 1}/{len(modes)}: ack_when {mode}", file=sys.stderr, flush=True)
        runs[mode] = run(args, mode)
        if args.svg:
            path = Path(args.svg)
            if len(modes) > 1:
                path = path.with_name(f"{path.stem}.{mode}{path.suffix}")
            path.write_text(svg(runs[mode]))
    checks = targets(runs, args.flap_seconds)
    result: dict[str, Any]
    if len(modes) == 1:
        result = {**runs[modes[0]], "targets": checks}
    else:
        stored, fast = runs["stored"], runs["uplinked_or_stored"]
        result = {**runs, "comparison": {
            "bytes_per_payload_byte_ratio": round_or_none(
                ratio(bytes_per_payload_byte(fast), bytes_per_payload_byte(stored))),
            "p99_latency_ratio": round_or_none(
                ratio(fast["latency_online_ms"]["p99"], stored["latency_online_ms"]["p99"])),
            "targets": checks}}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(without_samples(result), indent=1))
    print(report(runs, args.flap_seconds))


def round_or_none(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def without_samples(result: dict[str, Any]) -> dict[str, Any]:
    return {k: without_samples(v) if isinstance(v, dict) and "samples" in v else v
            for k, v in result.items() if k not in ("samples", "phases")}


if __name__ == "__main__":
    main()
