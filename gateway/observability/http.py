"""The local HTTP endpoint: Prometheus metrics, liveness, readiness and a status page.

Routes (GET only, loopback by default — ``observability.listen``):

- ``/metrics``  Prometheus text format 0.0.4.
- ``/healthz``  200 while the event loop answers (liveness).
- ``/readyz``   200 when the ingress is connected, the store answers, and no uplink is
                stuck: with messages waiting for it, the oldest is younger than
                ``stuck_backlog_age`` and it acknowledged something within
                ``stuck_no_ack``. 503 with the failing checks otherwise, each naming its
                uplink. "Connected" alone is not "ready": a link that accepts nothing is
                reported. A refused config reload is a note after the verdict, not a
                failure: the last good config runs on (gateway/service.py).
- ``/``         a status page for a technician on site: a card per uplink (state, backlog
                and its age), the broker, message rates over the last minutes. Its script
                keeps it current from
- ``/status.json`` the same figures as JSON: snapshot, readiness failures, rates.

The server is a few dozen lines on ``asyncio.start_server``: one request per connection,
bounded header size and read time, no third-party web framework on a 1 GB device.

Protection (``observability.token``, ``tls_cert_file``/``tls_key_file``; config.py refuses
to listen beyond loopback without a token unless ``allow_unauthenticated``): with a token,
every route but ``/healthz`` needs it, on loopback too — 401 with ``WWW-Authenticate``
without it, 429 with ``Retry-After`` for an address that failed too often (auth.py). With
the TLS pair the same routes are served over HTTPS only.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import orjson

from gateway.config import ObservabilityConfig, observability_tls_context
from gateway.downlink.downlink import DownlinkStats
from gateway.observability.auth import BearerAuth

log = logging.getLogger("gateway.http")

MAX_REQUEST_BYTES = 8192
READ_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class UplinkSnapshot:
    """One uplink's figures: its state and what waits for it."""

    name: str
    type: str
    state: str
    depth: int
    in_flight: int
    oldest_age_seconds: float | None
    dead_letter: int
    last_ack_at: float | None
    #: uplinked, retried, dead_lettered, batches (since start)
    counters: dict[str, int] = field(default_factory=dict)
    #: messages it never got, dropped by a retention policy, by reason
    dropped: dict[str, int] = field(default_factory=dict)
    #: the programming error the uplink's code raised ("TypeError: ..."); '' when none
    defect: str = ""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the endpoint reports, taken at one moment."""

    taken_at: float
    started_at: float
    ingress_connected: bool
    store_ok: bool
    store_messages: int
    store_bytes: int
    store_file_bytes: int
    commits: int
    commit_seconds_total: float
    uplinks: list[UplinkSnapshot]
    #: name -> value of the ingress's monotonically growing counters
    counters: dict[str, int] = field(default_factory=dict)

    #: one per uplink with ``downlink.enabled``
    downlinks: tuple[DownlinkStats, ...] = ()
    #: why the last config reload (SIGHUP) was refused; '' when it succeeded or none was made
    config_reload_error: str = ""
    #: bytes the process caused to be written to disk since it started (/proc/self/io
    #: write_bytes); None where the kernel does not say
    disk_write_bytes: int | None = None
    #: ``disk_write_bytes`` when the gateway became ready (store open, its disk reserve
    #: written, subscribed): what start-up wrote is not the messages' cost
    disk_write_base: int = 0

    @property
    def written_per_payload_byte(self) -> float | None:
        """Disk bytes written since ready per payload byte received (None before any)."""
        payload = self.counters.get("ingress_payload_bytes", 0)
        if self.disk_write_bytes is None or not payload:
            return None
        return (self.disk_write_bytes - self.disk_write_base) / payload

    def total(self, counter: str) -> int:
        """An uplink counter summed over the uplinks."""
        return sum(u.counters.get(counter, 0) for u in self.uplinks)


SnapshotSource = Callable[[], Awaitable[Snapshot]]


def readiness(s: Snapshot, cfg: ObservabilityConfig) -> list[str]:
    """The failing readiness checks, each naming its uplink; empty when ready."""
    failures = []
    if not s.ingress_connected:
        failures.append("ingress: not connected to the broker")
    if not s.store_ok:
        failures.append("store: not answering")
    for u in s.uplinks:
        failures.extend(_uplink_failures(s, u, cfg))
    for dl in s.downlinks:
        if dl.state == "failed":
            failures.append(f"downlink of uplink {dl.uplink} failed: {dl.last_error}")
    return failures


def readiness_notes(s: Snapshot) -> list[str]:
    """What /readyz reports without failing: the gateway runs, but an operator should know."""
    if s.config_reload_error:
        return [f"config reload refused, the last good config still runs: "
                f"{s.config_reload_error}"]
    return []


def _uplink_failures(s: Snapshot, u: UplinkSnapshot, cfg: ObservabilityConfig) -> list[str]:
    failures = []
    # as the logs name it: the single uplink by its type, one of several by name and type
    who = f"uplink {u.type}" if u.name == "default" else f"uplink {u.name} ({u.type})"
    if u.defect:
        failures.append(f"{who} has a defect: {u.defect} (a bug in its code, not an outage; "
                        "messages stay buffered; see the log)")
    if u.depth > 0:
        if u.oldest_age_seconds is not None and u.oldest_age_seconds > cfg.stuck_backlog_age:
            failures.append(f"{who} stuck: oldest buffered message is "
                            f"{u.oldest_age_seconds:.0f}s old (> {cfg.stuck_backlog_age:.0f}s)")
        since_ack = s.taken_at - (u.last_ack_at or s.started_at)
        if since_ack > cfg.stuck_no_ack:
            failures.append(f"{who} stuck: no acknowledgement for {since_ack:.0f}s with "
                            f"{u.depth} messages waiting (> {cfg.stuck_no_ack:.0f}s)")
    return failures


_HELP = {
    "ingress_received": "MQTT PUBLISH packets received",
    "ingress_acked": "QoS 1/2 messages acknowledged to the broker after commit",
    "ingress_dead_lettered": "messages dead-lettered on arrival (too large)",
    "ingress_dropped": "messages refused on arrival (store full, reject_new)",
    "ingress_duplicates": "QoS 2 redeliveries recognised and not stored twice",
    "ingress_payload_bytes": "payload bytes of the messages received",
    "acked_without_write": "messages acknowledged to the broker without a store write: every "
                           "uplink they are routed to accepted them first (forwarder.ack_when)",
    "stored_after_offer": "messages offered to their uplinks from memory, then stored (too "
                          "slow, failed, or their uplink went the stored way)",
    "uplinked_from_memory": "of uplinked: messages the uplink accepted before any store write",
    "uplinked": "messages the uplink acknowledged",
    "retried": "message deliveries scheduled for a retry",
    "dead_lettered": "messages dead-lettered by the forwarder",
    "batches": "batches sent to the uplink",
    "config_reloads": "config reloads (SIGHUP) accepted",
    "config_reload_failures": "config reloads (SIGHUP) refused: the last good config runs on",
}


def render_metrics(s: Snapshot) -> str:
    out: list[str] = []

    def head(name: str, kind: str, help_text: str) -> str:
        full = f"openhqm_gateway_{name}"
        out.append(f"# HELP {full} {help_text}\n# TYPE {full} {kind}")
        return full

    def metric(name: str, kind: str, help_text: str, value: float) -> None:
        out.append(f"{head(name, kind, help_text)} {_num(value)}")

    def per_uplink(name: str, kind: str, help_text: str,
                   values: list[tuple[UplinkSnapshot, float]]) -> None:
        full = head(name, kind, help_text)
        out.extend(f'{full}{{uplink="{u.name}"}} {_num(v)}' for u, v in values)

    for name, value in sorted(s.counters.items()):
        metric(f"{name}_total", "counter", _HELP.get(name, name), value)
    for name in ("uplinked", "uplinked_from_memory", "retried", "dead_lettered", "batches"):
        per_uplink(f"{name}_total", "counter", _HELP[name],
                   [(u, u.counters.get(name, 0)) for u in s.uplinks])
    full = head("dropped_total", "counter", "messages an uplink never got, dropped by a "
                "retention policy, by reason")
    out.extend(f'{full}{{uplink="{u.name}",reason="{reason}"}} {n}'
               for u in s.uplinks for reason, n in sorted(u.dropped.items()))
    per_uplink("backlog_messages", "gauge", "messages waiting for the uplink",
               [(u, u.depth) for u in s.uplinks])
    per_uplink("in_flight_messages", "gauge", "messages handed to the uplink, not settled",
               [(u, u.in_flight) for u in s.uplinks])
    # NaN, not 0, when nothing waits (Prometheus' advice where 0 would mislead); status.json
    # says null
    per_uplink("backlog_oldest_age_seconds", "gauge", "age of the oldest message waiting for "
               "the uplink (NaN when nothing waits)",
               [(u, math.nan if u.oldest_age_seconds is None else u.oldest_age_seconds)
                for u in s.uplinks])
    per_uplink("dead_letter_messages", "gauge", "the uplink's entries in the dead-letter table",
               [(u, u.dead_letter) for u in s.uplinks])
    per_uplink("uplink_last_ack_timestamp_seconds", "gauge", "when the uplink last "
               "acknowledged", [(u, u.last_ack_at or 0.0) for u in s.uplinks])
    full = head("uplink_state", "gauge", "1 for the uplink's current state")
    out.extend(f'{full}{{uplink="{u.name}",type="{u.type}",state="{state}"}} '
               f"{int(state == u.state)}" for u in s.uplinks for state in UPLINK_STATES)
    metric("store_messages", "gauge", "messages the store holds (every uplink's)",
           s.store_messages)
    metric("store_bytes", "gauge", "bytes counted against store.max_bytes", s.store_bytes)
    metric("store_file_bytes", "gauge", "size of the store file and its WAL", s.store_file_bytes)
    metric("store_commits_total", "counter", "append transactions committed", s.commits)
    metric("store_commit_seconds_total", "counter", "time spent in append commits",
           round(s.commit_seconds_total, 6))
    metric("ingress_connected", "gauge", "1 when connected to the broker",
           int(s.ingress_connected))
    if s.disk_write_bytes is not None:
        metric("disk_write_bytes_total", "counter", "bytes the gateway process caused to be "
               "written to disk (/proc/self/io write_bytes)", s.disk_write_bytes)
        ratio = s.written_per_payload_byte
        metric("disk_written_per_payload_byte", "gauge", "disk bytes written since the gateway "
               "became ready per payload byte received (NaN before any)", math.nan if ratio is None else
               round(ratio, 4))
    metric("config_last_reload_success", "gauge", "0 while the last config reload was "
           "refused, else 1", int(not s.config_reload_error))
    if s.downlinks:
        out.extend(render_downlink_metrics(s.downlinks))
    return "\n".join(out) + "\n"


def _num(value: float) -> str:
    return "NaN" if math.isnan(value) else str(value)


UPLINK_STATES = ("connecting", "online", "backing_off", "defective", "stopped")

_DOWNLINK_COUNTERS = {
    "received": "commands consumed at the uplink's backend",
    "delivered": "commands the local broker acknowledged (then acknowledged at the backend)",
    "expired": "commands dropped because their expires_at passed before delivery",
    "dead_lettered": "commands sent to the backend's dead-letter destination",
    "retried": "commands the local broker refused, handed back for another attempt",
    "redelivered": "commands the backend delivered again (possible duplicates)",
    "republished": "commands published again after a lost PUBACK (possible duplicates)",
    "settle_failures": "acknowledge/reject calls the backend refused (delivered again)",
}
DOWNLINK_STATES = ("starting", "online", "local_broker_down", "backend_unavailable", "failed",
                   "stopped")


def render_downlink_metrics(downlinks: tuple[DownlinkStats, ...]) -> list[str]:
    out: list[str] = []
    for name, help_text in _DOWNLINK_COUNTERS.items():
        full = f"openhqm_gateway_downlink_{name}_total"
        out.append(f"# HELP {full} {help_text}\n# TYPE {full} counter")
        out.extend(f'{full}{{uplink="{d.uplink}"}} {getattr(d, name)}' for d in downlinks)
    full = "openhqm_gateway_downlink_state"
    out.append(f"# HELP {full} 1 for the downlink's current state\n# TYPE {full} gauge")
    out.extend(f'{full}{{uplink="{d.uplink}",state="{state}"}} {int(state == d.state)}'
               for d in downlinks for state in DOWNLINK_STATES)
    full = "openhqm_gateway_downlink_last_delivery_timestamp_seconds"
    out.append(f"# HELP {full} when the local broker last took a command\n# TYPE {full} gauge")
    out.extend(f'{full}{{uplink="{d.uplink}"}} {d.last_delivered_at or 0.0}' for d in downlinks)
    return out


# --- the status page ------------------------------------------------------------------------
# Rendered complete on the server (it works without JavaScript: it then reloads every 5 s),
# then kept current by a few lines of JavaScript that fetch /status.json every 5 s and fill
# the same elements with the same formatting. No external assets: it must work on a site
# without internet access.

RATE_STEP = 10  # seconds per rate sample (ObservabilityServer._sample_rates)
STATE_TEXT = {"online": "online", "connecting": "connecting", "backing_off": "offline, retrying",
              "defective": "defect in the uplink's code", "stopped": "stopped"}
STATE_CLASS = {"online": "ok", "connecting": "warn", "backing_off": "bad", "defective": "bad",
               "stopped": "warn"}
DOWNLINK_TEXT = {"starting": "starting", "online": "online",
                 "local_broker_down": "local broker unreachable",
                 "backend_unavailable": "backend unreachable", "failed": "failed",
                 "stopped": "stopped"}
DOWNLINK_CLASS = {"online": "ok", "starting": "warn", "stopped": "warn"}
#: verdict -> header class: ready and online; ready but the uplink is not online (messages are
#: buffered, not yet past the stuck thresholds); not ready
VERDICT_CLASS = {"OK": "", "BUFFERING": "buffering", "ATTENTION": "down"}


def verdict(s: Snapshot, failures: list[str]) -> str:
    if failures:
        return "ATTENTION"
    return "OK" if all(u.state == "online" for u in s.uplinks) else "BUFFERING"


def fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"
    return f"{int(seconds // 86400)} d {int(seconds % 86400 // 3600)} h"


def mean_rates(rates: list[tuple[float, float]], minutes: int) -> tuple[float, float] | None:
    """Average (received/s, uplinked/s) over the newest ``minutes`` of samples."""
    window = rates[-(minutes * 60 // RATE_STEP):]
    if not window:
        return None
    return sum(r for r, _ in window) / len(window), sum(u for _, u in window) / len(window)


def _dropped(s: Snapshot) -> str:
    several = len(s.uplinks) > 1
    return ", ".join(f"{u.name} {k}: {v}" if several else f"{k}: {v}"
                     for u in s.uplinks for k, v in sorted(u.dropped.items())) or "none"


def _fields(s: Snapshot, failures: list[str],
            rates: list[tuple[float, float]]) -> dict[str, str]:
    """Element id -> text, exactly as the page's script computes it from /status.json."""
    out = {
        "verdict": verdict(s, failures),
        "broker": "connected" if s.ingress_connected else "NOT connected",
        "store-file": f"{s.store_file_bytes / 1e6:.1f} MB",
        "received": str(s.counters.get("ingress_received", 0)),
        "uplinked": str(s.total("uplinked")),
        "without-write": str(s.counters.get("acked_without_write", 0)),
        "written-per-byte": "-" if (r := s.written_per_payload_byte) is None else f"{r:.2f}",
        "dead-letters": str(sum(u.dead_letter for u in s.uplinks)),
        "dropped": _dropped(s),
        "uptime": fmt_age(max(0.0, s.taken_at - s.started_at)),
    }
    for i, u in enumerate(s.uplinks):
        out |= {
            f"u{i}-name": u.name, f"u{i}-type": u.type,
            f"u{i}-state": STATE_TEXT.get(u.state, u.state),
            f"u{i}-last-ack": "never" if u.last_ack_at is None
            else fmt_age(max(0.0, s.taken_at - u.last_ack_at)) + " ago",
            f"u{i}-depth": str(u.depth), f"u{i}-in-flight": str(u.in_flight),
            f"u{i}-oldest": fmt_age(u.oldest_age_seconds),
            f"u{i}-dead": str(u.dead_letter),
        }
    for i, d in enumerate(s.downlinks):
        out |= {
            f"d{i}-uplink": d.uplink, f"d{i}-source": f"{d.type} {d.source}",
            f"d{i}-state": DOWNLINK_TEXT.get(d.state, d.state),
            f"d{i}-received": str(d.received), f"d{i}-delivered": str(d.delivered),
            f"d{i}-expired": str(d.expired), f"d{i}-dead": str(d.dead_lettered),
            f"d{i}-last": "never" if d.last_delivered_at is None
            else fmt_age(max(0.0, s.taken_at - d.last_delivered_at)) + " ago",
        }
    for minutes in (1, 5):
        mean = mean_rates(rates, minutes)
        out[f"recv-{minutes}"] = "—" if mean is None else f"{mean[0]:.1f}/s"
        out[f"upl-{minutes}"] = "—" if mean is None else f"{mean[1]:.1f}/s"
    return out


def render_chart(rates: list[tuple[float, float]]) -> str:
    """An SVG line chart of received (blue) and uplinked (green) messages per second."""
    w, h, pad = 640, 140, 18
    if not rates:
        return (f'<svg viewBox="0 0 {w} {h}"><text x="{w // 2}" y="{h // 2}" '
                f'text-anchor="middle">collecting: the first figures after {RATE_STEP} s</text></svg>')
    points = rates if len(rates) > 1 else rates * 2
    top = max(max(r, u) for r, u in points) or 1.0
    step = (w - 2 * pad) / (len(points) - 1)

    def line(index: int, css: str) -> str:
        xy = " ".join(f"{pad + i * step:.1f},{h - pad - v[index] / top * (h - 2 * pad):.1f}"
                      for i, v in enumerate(points))
        return f'<polyline class="{css}" points="{xy}"/>'

    span = len(rates) * RATE_STEP
    ago = f"{span} s ago" if span < 120 else f"{span // 60} min ago"
    return (f'<svg viewBox="0 0 {w} {h}"><line class="axis" x1="{pad}" y1="{h - pad}" '
            f'x2="{w - pad}" y2="{h - pad}"/>{line(1, "upl")}{line(0, "recv")}'
            f'<text x="{pad}" y="12">{top:.1f}/s</text>'
            f'<text x="{pad}" y="{h - 3}">{ago}</text>'
            f'<text x="{w - pad}" y="{h - 3}" text-anchor="end">now</text></svg>')


_STYLE = """
body{font:16px/1.4 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1f2328}
header{padding:.7em 1.2em;color:#fff;background:#1a7f37}header.down{background:#cf222e}
header.buffering{background:#9a6700}
h1{font-size:1.3em;margin:0}main{padding:1em 1.2em;max-width:62em}
.grid{display:grid;grid-template-columns:repeat(3,1fr);gap:1em}.wide{grid-column:span 2}
@media(max-width:40em){.grid{grid-template-columns:1fr}.wide{grid-column:auto}}
section{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:.8em 1em}
h2{font-size:.8em;text-transform:uppercase;letter-spacing:.05em;color:#57606a;margin:0 0 .3em}
.big{font-size:1.7em;font-weight:600}.ok{color:#1a7f37}.warn{color:#9a6700}.bad{color:#cf222e}
table{border-collapse:collapse}th{text-align:left;font-weight:normal;color:#57606a;padding-right:1em}
#problems{color:#cf222e;font-weight:600;margin:0 0 1em}#problems:empty{display:none}
svg{width:100%;height:auto;display:block}svg text{font-size:11px;fill:#57606a}
polyline{fill:none;stroke-width:2}.recv{stroke:#0969da;stroke-dasharray:6 3}.upl{stroke:#1a7f37}
.axis{stroke:#d0d7de}
.key-recv{color:#0969da}.key-upl{color:#1a7f37}footer{color:#57606a;font-size:.85em;margin-top:1em}
"""

# Mirrors verdict, fmt_age, mean_rates, _fields and render_chart above: keep them in step (the
# integration test compares the rendered DOM with /status.json).
_SCRIPT = """
const STEP=%(step)d,TEXT=%(text)s,CLS=%(cls)s,VCLS=%(vcls)s,DLT=%(dltext)s,DLC=%(dlcls)s;
function age(s){if(s==null)return"\\u2014";if(s<60)return s.toFixed(1)+" s";
if(s<3600)return Math.floor(s/60)+" min "+Math.floor(s%%60)+" s";
if(s<86400)return Math.floor(s/3600)+" h "+Math.floor(s%%3600/60)+" min";
return Math.floor(s/86400)+" d "+Math.floor(s%%86400/3600)+" h"}
function mean(r,m){const w=r.slice(-(m*60/STEP));if(!w.length)return null;
let a=0,b=0;for(const x of w){a+=x[0];b+=x[1]}return[a/w.length,b/w.length]}
function chart(r){const w=640,h=140,p=18;
if(!r.length)return'<svg viewBox="0 0 '+w+' '+h+'"><text x="'+w/2+'" y="'+h/2+
'" text-anchor="middle">collecting: the first figures after '+STEP+' s</text></svg>';
const pts=r.length>1?r:r.concat(r);let top=0;for(const x of pts)top=Math.max(top,x[0],x[1]);
top=top||1;const st=(w-2*p)/(pts.length-1);
const line=(i,c)=>'<polyline class="'+c+'" points="'+pts.map((v,k)=>(p+k*st).toFixed(1)+","+
(h-p-v[i]/top*(h-2*p)).toFixed(1)).join(" ")+'"/>';
const span=r.length*STEP,ago=span<120?span+" s ago":Math.floor(span/60)+" min ago";
return'<svg viewBox="0 0 '+w+' '+h+'"><line class="axis" x1="'+p+'" y1="'+(h-p)+'" x2="'+
(w-p)+'" y2="'+(h-p)+'"/>'+line(1,"upl")+line(0,"recv")+'<text x="'+p+'" y="12">'+
top.toFixed(1)+'/s</text><text x="'+p+'" y="'+(h-3)+'">'+ago+
'</text><text x="'+(w-p)+'" y="'+(h-3)+'" text-anchor="end">now</text></svg>'}
function show(d){const s=d.snapshot,c=s.counters,U=s.uplinks;let upl=0,dead=0;const drop=[];
for(const u of U){upl+=u.counters.uplinked||0;dead+=u.dead_letter;
for(const k of Object.keys(u.dropped).sort())drop.push((U.length>1?u.name+" ":"")+k+": "+u.dropped[k])}
const f={verdict:!d.ready?"ATTENTION":U.every(u=>u.state=="online")?"OK":"BUFFERING",
broker:s.ingress_connected?"connected":"NOT connected",
"store-file":(s.store_file_bytes/1e6).toFixed(1)+" MB",received:String(c.ingress_received||0),
uplinked:String(upl),"dead-letters":String(dead),dropped:drop.join(", ")||"none",
"without-write":String(c.acked_without_write||0),"written-per-byte":s.disk_write_bytes==null||
!c.ingress_payload_bytes?"-":((s.disk_write_bytes-s.disk_write_base)/
c.ingress_payload_bytes).toFixed(2),
uptime:age(Math.max(0,s.taken_at-s.started_at))};
U.forEach((u,i)=>{const p="u"+i+"-";f[p+"name"]=u.name;f[p+"type"]=u.type;
f[p+"state"]=TEXT[u.state]||u.state;
f[p+"last-ack"]=u.last_ack_at==null?"never":age(Math.max(0,s.taken_at-u.last_ack_at))+" ago";
f[p+"depth"]=String(u.depth);f[p+"in-flight"]=String(u.in_flight);
f[p+"oldest"]=age(u.oldest_age_seconds);f[p+"dead"]=String(u.dead_letter)});
const D=s.downlinks||[];D.forEach((dl,i)=>{const p="d"+i+"-";f[p+"uplink"]=dl.uplink;
f[p+"source"]=dl.type+" "+dl.source;f[p+"state"]=DLT[dl.state]||dl.state;
f[p+"received"]=String(dl.received);f[p+"delivered"]=String(dl.delivered);
f[p+"expired"]=String(dl.expired);f[p+"dead"]=String(dl.dead_lettered);
f[p+"last"]=dl.last_delivered_at==null?"never":age(Math.max(0,s.taken_at-dl.last_delivered_at))+" ago"});
for(const m of[1,5]){const x=mean(d.rates,m);f["recv-"+m]=x?x[0].toFixed(1)+"/s":"\\u2014";
f["upl-"+m]=x?x[1].toFixed(1)+"/s":"\\u2014"}
for(const k in f){const e=document.getElementById(k);if(e)e.textContent=f[k]}
U.forEach((u,i)=>{const e=document.getElementById("u"+i+"-state");
if(e)e.className="big "+(CLS[u.state]||"warn")});
D.forEach((dl,i)=>{const e=document.getElementById("d"+i+"-state");
if(e)e.className="big "+(DLC[dl.state]||"bad")});
document.getElementById("broker").className="big "+(s.ingress_connected?"ok":"bad");
document.querySelector("header").className=VCLS[f.verdict];
document.title="OpenHQM gateway \\u2014 "+f.verdict;
const ul=document.getElementById("problems");ul.textContent="";
for(const t of d.failures){const li=document.createElement("li");li.textContent=t;ul.append(li)}
document.getElementById("chart").innerHTML=chart(d.rates);
document.getElementById("updated").textContent="live, updated "+
new Date(s.taken_at*1000).toLocaleTimeString()}
async function poll(){try{const r=await fetch("/status.json",{cache:"no-store"});
if(!r.ok)throw new Error("HTTP "+r.status);show(await r.json())}
catch(e){document.getElementById("updated").textContent="gateway not answering ("+e.message+
"), retrying"}}
poll();setInterval(poll,5000);
"""


def render_page(s: Snapshot, failures: list[str], rates: list[tuple[float, float]]) -> str:
    f = {k: html.escape(v) for k, v in _fields(s, failures, rates).items()}
    problems = "".join(f"<li>{html.escape(x)}</li>" for x in failures)
    script = _SCRIPT % {"step": RATE_STEP, "text": orjson.dumps(STATE_TEXT).decode(),
                        "cls": orjson.dumps(STATE_CLASS).decode(),
                        "vcls": orjson.dumps(VERDICT_CLASS).decode(),
                        "dltext": orjson.dumps(DOWNLINK_TEXT).decode(),
                        "dlcls": orjson.dumps(DOWNLINK_CLASS).decode()}
    cards = "".join(_uplink_card(i, u, f) for i, u in enumerate(s.uplinks))
    cards += "".join(_downlink_card(i, d, f) for i, d in enumerate(s.downlinks))
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<noscript><meta http-equiv="refresh" content="5"></noscript>
<title>OpenHQM gateway — {f["verdict"]}</title><style>{_STYLE}</style></head><body>
<header class="{VERDICT_CLASS[f["verdict"]]}">
<h1>OpenHQM Edge Gateway — <span id="verdict">{f["verdict"]}</span></h1></header>
<main><ul id="problems">{problems}</ul><div class="grid">
{cards}<section><h2>Broker (ingress)</h2>
<div id="broker" class="big {'ok' if s.ingress_connected else 'bad'}">{f["broker"]}</div>
<div>up for <span id="uptime">{f["uptime"]}</span></div></section>
<section class="wide"><h2>Messages per second</h2>
<table><tr><th></th><th>last minute</th><th>last 5 minutes</th></tr>
<tr><th class="key-recv">received</th><td id="recv-1">{f["recv-1"]}</td>
<td id="recv-5">{f["recv-5"]}</td></tr>
<tr><th class="key-upl">uplinked</th><td id="upl-1">{f["upl-1"]}</td>
<td id="upl-5">{f["upl-5"]}</td></tr></table>
<div id="chart">{render_chart(rates)}</div></section>
<section><h2>Totals since start</h2><table>
<tr><th>received</th><td id="received">{f["received"]}</td></tr>
<tr><th>uplinked</th><td id="uplinked">{f["uplinked"]}</td></tr>
<tr><th>acknowledged without a write</th><td id="without-write">{f["without-write"]}</td></tr>
<tr><th>disk bytes written per payload byte</th>
<td id="written-per-byte">{f["written-per-byte"]}</td></tr>
<tr><th>dead letters</th><td id="dead-letters">{f["dead-letters"]}</td></tr>
<tr><th>dropped</th><td id="dropped">{f["dropped"]}</td></tr>
<tr><th>store file</th><td id="store-file">{f["store-file"]}</td></tr></table></section>
</div>
<footer><span id="updated">snapshot; without JavaScript the page reloads every 5 s</span> ·
<a href="/status.json">status.json</a> ·
<a href="/metrics">metrics</a> · <a href="/readyz">readyz</a></footer>
</main><script>{script}</script></body></html>"""


def _uplink_card(i: int, u: UplinkSnapshot, f: dict[str, str]) -> str:
    p = f"u{i}-"
    return f"""<section><h2>Uplink <span id="{p}name">{f[p + "name"]}</span>
(<span id="{p}type">{f[p + "type"]}</span>)</h2>
<div id="{p}state" class="big {STATE_CLASS.get(u.state, "warn")}">{f[p + "state"]}</div>
<div>buffered: <b id="{p}depth">{f[p + "depth"]}</b> · oldest: <b id="{p}oldest">{f[p + "oldest"]}</b>
· in flight: <span id="{p}in-flight">{f[p + "in-flight"]}</span></div>
<div>last acknowledgement: <span id="{p}last-ack">{f[p + "last-ack"]}</span> ·
dead letters: <span id="{p}dead">{f[p + "dead"]}</span></div></section>
"""


def _downlink_card(i: int, d: DownlinkStats, f: dict[str, str]) -> str:
    p = f"d{i}-"
    return f"""<section><h2>Downlink of <span id="{p}uplink">{f[p + "uplink"]}</span>
(<span id="{p}source">{f[p + "source"]}</span>)</h2>
<div id="{p}state" class="big {DOWNLINK_CLASS.get(d.state, "bad")}">{f[p + "state"]}</div>
<div>delivered <b id="{p}delivered">{f[p + "delivered"]}</b> of
<span id="{p}received">{f[p + "received"]}</span> received · expired
<span id="{p}expired">{f[p + "expired"]}</span> · dead letters <span id="{p}dead">{f[p + "dead"]}</span>
</div><div>last command: <span id="{p}last">{f[p + "last"]}</span></div></section>
"""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
           405: "Method Not Allowed", 429: "Too Many Requests", 500: "Internal Server Error",
           503: "Service Unavailable"}
#: Bearer for tools; Basic too, so that a browser asks for the token (auth.py)
CHALLENGE = (("WWW-Authenticate", 'Bearer realm="openhqm-gateway"'),
             ("WWW-Authenticate", 'Basic realm="openhqm-gateway", charset="UTF-8"'))


class ObservabilityServer:
    def __init__(self, cfg: ObservabilityConfig, source: SnapshotSource) -> None:
        self.cfg = cfg
        self.source = source
        self.host, self.port = cfg.host, int(cfg.listen.rpartition(":")[2])
        self.bound_port = 0
        #: set once the socket is bound (``bound_port`` is known)
        self.listening = asyncio.Event()
        self.auth = BearerAuth(cfg.token) if cfg.token is not None else None
        #: (received/s, uplinked/s) per 10 s, newest last; 30 minutes at most
        self.rates: list[tuple[float, float]] = []

    async def run(self) -> None:
        tls = observability_tls_context(self.cfg)
        server = await asyncio.start_server(self._handle, self.host, self.port, ssl=tls,
                                            ssl_handshake_timeout=READ_TIMEOUT if tls else None)
        self.bound_port = server.sockets[0].getsockname()[1]
        self.listening.set()
        scheme = "https" if tls else "http"
        log.info("metrics and health on %s://%s:%d/ (%s)", scheme, self.host, self.bound_port,
                 "token required but for /healthz" if self.auth else "no token")
        if self.auth and not tls and not self.cfg.on_loopback:
            log.warning("observability.token travels in clear over the network: set "
                        "observability.tls_cert_file and tls_key_file for HTTPS")
        async with server:
            await self._sample_rates()

    async def _sample_rates(self) -> None:
        previous: tuple[float, int, int] | None = None
        while True:
            snap = await self.source()
            now = (snap.taken_at, snap.counters.get("ingress_received", 0),
                   snap.total("uplinked"))
            if previous is not None:
                dt = max(1e-3, now[0] - previous[0])
                self.rates.append(((now[1] - previous[1]) / dt, (now[2] - previous[2]) / dt))
                del self.rates[:-180]
            previous = now
            await asyncio.sleep(RATE_STEP)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            peer = writer.get_extra_info("peername")
            resp = await self._route(head, str(peer[0]) if peer else "")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            resp = Response(400, "text/plain", b"bad request\n")
        except Exception:  # a broken snapshot must not kill the server; it is reported
            log.exception("observability request failed")
            resp = Response(500, "text/plain", b"internal error\n")
        extra = "".join(f"{k}: {v}\r\n" for k, v in resp.headers)
        writer.write(f"HTTP/1.1 {resp.status} {REASONS[resp.status]}\r\n"
                     f"Content-Type: {resp.content_type}\r\nContent-Length: {len(resp.body)}\r\n"
                     f"{extra}Connection: close\r\n\r\n".encode() + resp.body)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def _route(self, head: bytes, peer: str) -> Response:
        if len(head) > MAX_REQUEST_BYTES:
            raise ValueError("request too large")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, path, _ = request_line.split(" ", 2)
        path = path.split("?", 1)[0]
        if method != "GET":
            return Response(405, "text/plain", b"GET only\n")
        if path == "/healthz":
            return Response(200, "text/plain", b"ok\n")
        if self.auth is not None:
            verdict = self.auth.check(peer, _header(header_lines, "authorization"))
            if verdict == "throttled":
                return Response(429, "text/plain", b"too many failed attempts; try later\n",
                                (("Retry-After", str(int(self.auth.block))),))
            if verdict != "ok":
                return Response(401, "text/plain", b"a bearer token is required\n", CHALLENGE)
        return await self._answer(path)

    async def _answer(self, path: str) -> Response:
        if path not in ("/metrics", "/readyz", "/", "/status.json"):
            return Response(404, "text/plain", b"not found\n")
        snap = await self.source()
        failures = readiness(snap, self.cfg)
        if path == "/metrics":
            text = render_metrics(snap)
            if self.auth is not None:
                text += "\n".join(self.auth.metric_lines()) + "\n"
            return Response(200, "text/plain; version=0.0.4", text.encode())
        if path == "/readyz":
            lines = (failures or ["ready"]) + readiness_notes(snap)
            body = ("\n".join(lines) + "\n").encode()
            return Response(200 if not failures else 503, "text/plain", body)
        if path == "/status.json":
            return Response(200, "application/json", orjson.dumps(
                {"ready": not failures, "failures": failures,
                 "notes": readiness_notes(snap), "rates": self.rates,
                 "snapshot": snap}))
        return Response(200, "text/html; charset=utf-8",
                        render_page(snap, failures, self.rates).encode())


def _header(lines: list[str], name: str) -> str | None:
    """The first header ``name`` (case-insensitive) among the request's header lines."""
    for line in lines:
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == name:
            return value.strip()
    return None
