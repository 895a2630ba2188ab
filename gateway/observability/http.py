"""The local HTTP endpoint: Prometheus metrics, liveness, readiness and a status page.

Routes (GET only, loopback by default — ``observability.listen``):

- ``/metrics``  Prometheus text format 0.0.4.
- ``/healthz``  200 while the event loop answers (liveness).
- ``/readyz``   200 when the ingress is connected, the store answers, and the uplink is not
                stuck: with messages waiting, the oldest is younger than
                ``stuck_backlog_age`` and the uplink acknowledged something within
                ``stuck_no_ack``. 503 with the failing checks otherwise. "Connected" alone
                is not "ready": a link that accepts nothing is reported.
- ``/``         a small status page for a technician on site (refreshes itself).

The server is a few dozen lines on ``asyncio.start_server``: one request per connection,
bounded header size and read time, no third-party web framework on a 1 GB device.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import orjson

from gateway.config import ObservabilityConfig

log = logging.getLogger("gateway.http")

MAX_REQUEST_BYTES = 8192
READ_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the endpoint reports, taken at one moment."""

    taken_at: float
    started_at: float
    ingress_connected: bool
    store_ok: bool
    uplink_type: str
    uplink_state: str
    depth: int
    in_flight: int
    oldest_age_seconds: float | None
    dead_letter: int
    store_messages: int
    store_bytes: int
    store_file_bytes: int
    last_ack_at: float | None
    commits: int
    commit_seconds_total: float
    #: name -> value of monotonically growing counters
    counters: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)


SnapshotSource = Callable[[], Awaitable[Snapshot]]


def readiness(s: Snapshot, cfg: ObservabilityConfig) -> list[str]:
    """The failing readiness checks; empty when ready."""
    failures = []
    if not s.ingress_connected:
        failures.append("ingress: not connected to the broker")
    if not s.store_ok:
        failures.append("store: not answering")
    if s.depth > 0:
        if s.oldest_age_seconds is not None and s.oldest_age_seconds > cfg.stuck_backlog_age:
            failures.append(f"uplink stuck: oldest buffered message is {s.oldest_age_seconds:.0f}s "
                            f"old (> {cfg.stuck_backlog_age:.0f}s)")
        since_ack = s.taken_at - (s.last_ack_at or s.started_at)
        if since_ack > cfg.stuck_no_ack:
            failures.append(f"uplink stuck: no acknowledgement for {since_ack:.0f}s with "
                            f"{s.depth} messages waiting (> {cfg.stuck_no_ack:.0f}s)")
    return failures


_HELP = {
    "ingress_received": "MQTT PUBLISH packets received",
    "ingress_acked": "QoS 1/2 messages acknowledged to the broker after commit",
    "ingress_dead_lettered": "messages dead-lettered on arrival (too large)",
    "ingress_dropped": "messages refused on arrival (store full, reject_new)",
    "ingress_duplicates": "QoS 2 redeliveries recognised and not stored twice",
    "uplinked": "messages the uplink acknowledged",
    "retried": "message deliveries scheduled for a retry",
    "dead_lettered": "messages dead-lettered by the forwarder",
    "batches": "batches sent to the uplink",
}


def render_metrics(s: Snapshot) -> str:
    out: list[str] = []

    def metric(name: str, kind: str, help_text: str, value: float,
               labels: str = "") -> None:
        full = f"openhqm_gateway_{name}"
        out.append(f"# HELP {full} {help_text}\n# TYPE {full} {kind}")
        out.append(f"{full}{labels} {value}")

    for name, value in sorted(s.counters.items()):
        metric(f"{name}_total", "counter", _HELP.get(name, name), value)
    full = "openhqm_gateway_dropped_total"
    out.append(f"# HELP {full} messages dropped by a retention policy, by reason\n# TYPE {full} counter")
    for reason, n in sorted(s.dropped.items()):
        out.append(f'{full}{{reason="{reason}"}} {n}')
    metric("backlog_messages", "gauge", "messages waiting for the uplink", s.depth)
    metric("in_flight_messages", "gauge", "messages leased to the uplink", s.in_flight)
    metric("backlog_oldest_age_seconds", "gauge", "age of the oldest waiting message",
           s.oldest_age_seconds or 0.0)
    metric("dead_letter_messages", "gauge", "entries in the dead-letter table", s.dead_letter)
    metric("store_bytes", "gauge", "bytes counted against store.max_bytes", s.store_bytes)
    metric("store_file_bytes", "gauge", "size of the store file and its WAL", s.store_file_bytes)
    metric("store_commits_total", "counter", "append transactions committed", s.commits)
    metric("store_commit_seconds_total", "counter", "time spent in append commits",
           round(s.commit_seconds_total, 6))
    metric("ingress_connected", "gauge", "1 when connected to the broker",
           int(s.ingress_connected))
    full = "openhqm_gateway_uplink_state"
    out.append(f"# HELP {full} 1 for the uplink's current state\n# TYPE {full} gauge")
    for state in ("connecting", "online", "backing_off", "stopped"):
        out.append(f'{full}{{type="{s.uplink_type}",state="{state}"}} {int(state == s.uplink_state)}')
    metric("uplink_last_ack_timestamp_seconds", "gauge", "when the uplink last acknowledged",
           s.last_ack_at or 0.0)
    return "\n".join(out) + "\n"


def render_page(s: Snapshot, failures: list[str], rates: list[tuple[float, float]]) -> str:
    age = "—" if s.oldest_age_seconds is None else f"{s.oldest_age_seconds:.1f} s"
    verdict = "OK" if not failures else "ATTENTION"
    rows = [
        ("Broker (ingress)", "connected" if s.ingress_connected else "NOT connected"),
        (f"Uplink ({html.escape(s.uplink_type)})", html.escape(s.uplink_state)),
        ("Buffered messages", f"{s.depth} ({s.in_flight} in flight)"),
        ("Oldest buffered", age),
        ("Dead letters", str(s.dead_letter)),
        ("Store file", f"{s.store_file_bytes / 1e6:.1f} MB"),
        ("Received / uplinked", f"{s.counters.get('ingress_received', 0)} / "
                                f"{s.counters.get('uplinked', 0)}"),
        ("Dropped", ", ".join(f"{k}: {v}" for k, v in sorted(s.dropped.items())) or "none"),
    ]
    table = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    problems = "".join(f"<li>{html.escape(f)}</li>" for f in failures)
    return f"""<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>OpenHQM gateway — {verdict}</title><style>
body{{font-family:sans-serif;margin:2em;max-width:46em}} th{{text-align:left;padding-right:2em}}
td,th{{padding:.3em}} .ok{{color:#1a7f37}} .bad{{color:#cf222e}} svg{{border:1px solid #ccc}}
</style></head><body>
<h1>OpenHQM Edge Gateway — <span class="{'ok' if not failures else 'bad'}">{verdict}</span></h1>
<ul class="bad">{problems}</ul><table>{table}</table>
<h2>Messages per second, last {len(rates) * 10 // 60 or 1} min</h2>{_sparkline(rates)}
<p><small>received (blue) and uplinked (green), 10 s steps; page refreshes every 5 s.
<a href="/metrics">metrics</a> · <a href="/readyz">readyz</a></small></p></body></html>"""


def _sparkline(rates: list[tuple[float, float]], width: int = 600, height: int = 120) -> str:
    if len(rates) < 2:
        return f'<svg width="{width}" height="{height}"><text x="10" y="60">collecting…</text></svg>'
    top = max(max(r, u) for r, u in rates) or 1.0
    step = width / (len(rates) - 1)

    def line(index: int, color: str) -> str:
        points = " ".join(f"{i * step:.1f},{height - 5 - (v[index] / top) * (height - 20):.1f}"
                          for i, v in enumerate(rates))
        return f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{points}"/>'

    return (f'<svg width="{width}" height="{height}">{line(0, "#0969da")}{line(1, "#1a7f37")}'
            f'<text x="4" y="12" font-size="11">{top:.0f}/s</text></svg>')


class ObservabilityServer:
    def __init__(self, cfg: ObservabilityConfig, source: SnapshotSource) -> None:
        self.cfg = cfg
        self.source = source
        host, _, port = cfg.listen.rpartition(":")
        self.host, self.port = host, int(port)
        self.bound_port = 0
        #: (received/s, uplinked/s) per 10 s, newest last; 30 minutes at most
        self.rates: list[tuple[float, float]] = []

    async def run(self) -> None:
        server = await asyncio.start_server(self._handle, self.host, self.port)
        self.bound_port = server.sockets[0].getsockname()[1]
        log.info("metrics and health on http://%s:%d/", self.host, self.bound_port)
        async with server:
            await self._sample_rates()

    async def _sample_rates(self) -> None:
        previous: tuple[float, int, int] | None = None
        while True:
            snap = await self.source()
            now = (snap.taken_at, snap.counters.get("ingress_received", 0),
                   snap.counters.get("uplinked", 0))
            if previous is not None:
                dt = max(1e-3, now[0] - previous[0])
                self.rates.append(((now[1] - previous[1]) / dt, (now[2] - previous[2]) / dt))
                del self.rates[:-180]
            previous = now
            await asyncio.sleep(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            status, ctype, body = await self._route(head)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            status, ctype, body = 400, "text/plain", b"bad request\n"
        except Exception:  # a broken snapshot must not kill the server; it is reported
            log.exception("observability request failed")
            status, ctype, body = 500, "text/plain", b"internal error\n"
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  500: "Internal Server Error", 503: "Service Unavailable"}[status]
        writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def _route(self, head: bytes) -> tuple[int, str, bytes]:
        if len(head) > MAX_REQUEST_BYTES:
            raise ValueError("request too large")
        method, path, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
        path = path.split("?", 1)[0]
        if method != "GET":
            return 405, "text/plain", b"GET only\n"
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path not in ("/metrics", "/readyz", "/", "/status.json"):
            return 404, "text/plain", b"not found\n"
        snap = await self.source()
        failures = readiness(snap, self.cfg)
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4", render_metrics(snap).encode()
        if path == "/readyz":
            body = ("ready\n" if not failures else "\n".join(failures) + "\n").encode()
            return (200 if not failures else 503), "text/plain", body
        if path == "/status.json":
            return 200, "application/json", orjson.dumps(
                {"ready": not failures, "failures": failures, "rates": self.rates,
                 "snapshot": snap})
        return 200, "text/html; charset=utf-8", render_page(snap, failures, self.rates).encode()

