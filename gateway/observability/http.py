"""The local HTTP endpoint: Prometheus metrics, liveness, readiness and a status page.

Routes (GET only, loopback by default — ``observability.listen``):

- ``/metrics``  Prometheus text format 0.0.4.
- ``/healthz``  200 while the event loop answers (liveness).
- ``/readyz``   200 when the ingress is connected, the store answers, and the uplink is not
                stuck: with messages waiting, the oldest is younger than
                ``stuck_backlog_age`` and the uplink acknowledged something within
                ``stuck_no_ack``. 503 with the failing checks otherwise. "Connected" alone
                is not "ready": a link that accepts nothing is reported.
- ``/``         a status page for a technician on site: buffer depth and age, uplink state,
                message rates over the last minutes. Its script keeps it current from
- ``/status.json`` the same figures as JSON: snapshot, readiness failures, rates.

The server is a few dozen lines on ``asyncio.start_server``: one request per connection,
bounded header size and read time, no third-party web framework on a 1 GB device.
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

from gateway.config import ObservabilityConfig
from gateway.downlink.downlink import DownlinkStats

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
    #: the programming error the uplink's code raised ("TypeError: ..."); '' when none
    uplink_defect: str = ""
    #: one per uplink with ``downlink.enabled``
    downlinks: tuple[DownlinkStats, ...] = ()


SnapshotSource = Callable[[], Awaitable[Snapshot]]


def readiness(s: Snapshot, cfg: ObservabilityConfig) -> list[str]:
    """The failing readiness checks; empty when ready."""
    failures = []
    if not s.ingress_connected:
        failures.append("ingress: not connected to the broker")
    if not s.store_ok:
        failures.append("store: not answering")
    if s.uplink_defect:
        failures.append(f"uplink {s.uplink_type} has a defect: {s.uplink_defect} (a bug in its "
                        "code, not an outage; messages stay buffered; see the log)")
    if s.depth > 0:
        if s.oldest_age_seconds is not None and s.oldest_age_seconds > cfg.stuck_backlog_age:
            failures.append(f"uplink stuck: oldest buffered message is {s.oldest_age_seconds:.0f}s "
                            f"old (> {cfg.stuck_backlog_age:.0f}s)")
        since_ack = s.taken_at - (s.last_ack_at or s.started_at)
        if since_ack > cfg.stuck_no_ack:
            failures.append(f"uplink stuck: no acknowledgement for {since_ack:.0f}s with "
                            f"{s.depth} messages waiting (> {cfg.stuck_no_ack:.0f}s)")
    for dl in s.downlinks:
        if dl.state == "failed":
            failures.append(f"downlink of uplink {dl.uplink} failed: {dl.last_error}")
    return failures


_HELP = {
    "ingress_received": "MQTT PUBLISH packets received",
    "ingress_acked": "QoS 1/2 messages acknowledged to the broker after commit",
    "ingress_dead_lettered": "messages dead-lettered on arrival (too large)",
    "ingress_dropped": "messages refused on arrival (store full, reject_new)",
    "ingress_duplicates": "QoS 2 redeliveries recognised and not stored twice",
    "ingress_excluded": "messages on ingress.exclude topics, acknowledged and not stored",
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
        out.append(f"{full}{labels} {'NaN' if math.isnan(value) else value}")

    for name, value in sorted(s.counters.items()):
        metric(f"{name}_total", "counter", _HELP.get(name, name), value)
    full = "openhqm_gateway_dropped_total"
    out.append(f"# HELP {full} messages dropped by a retention policy, by reason\n# TYPE {full} counter")
    for reason, n in sorted(s.dropped.items()):
        out.append(f'{full}{{reason="{reason}"}} {n}')
    metric("backlog_messages", "gauge", "messages waiting for the uplink", s.depth)
    metric("in_flight_messages", "gauge", "messages leased to the uplink", s.in_flight)
    # NaN, not 0, when nothing waits (Prometheus' advice where 0 would mislead); status.json
    # says null
    metric("backlog_oldest_age_seconds", "gauge", "age of the oldest waiting message "
           "(NaN when nothing waits)",
           math.nan if s.oldest_age_seconds is None else s.oldest_age_seconds)
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
    for state in ("connecting", "online", "backing_off", "defective", "stopped"):
        out.append(f'{full}{{type="{s.uplink_type}",state="{state}"}} {int(state == s.uplink_state)}')
    metric("uplink_last_ack_timestamp_seconds", "gauge", "when the uplink last acknowledged",
           s.last_ack_at or 0.0)
    if s.downlinks:
        out.extend(render_downlink_metrics(s.downlinks))
    return "\n".join(out) + "\n"


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
    return "OK" if s.uplink_state == "online" else "BUFFERING"


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


def _fields(s: Snapshot, failures: list[str],
            rates: list[tuple[float, float]]) -> dict[str, str]:
    """Element id -> text, exactly as the page's script computes it from /status.json."""
    out = {
        "verdict": verdict(s, failures),
        "uplink-type": s.uplink_type,
        "uplink-state": STATE_TEXT.get(s.uplink_state, s.uplink_state),
        "last-ack": "never" if s.last_ack_at is None
        else fmt_age(max(0.0, s.taken_at - s.last_ack_at)) + " ago",
        "broker": "connected" if s.ingress_connected else "NOT connected",
        "depth": str(s.depth),
        "in-flight": str(s.in_flight),
        "oldest": fmt_age(s.oldest_age_seconds),
        "dead-letters": str(s.dead_letter),
        "store-file": f"{s.store_file_bytes / 1e6:.1f} MB",
        "received": str(s.counters.get("ingress_received", 0)),
        "uplinked": str(s.counters.get("uplinked", 0)),
        "dropped": ", ".join(f"{k}: {v}" for k, v in sorted(s.dropped.items())) or "none",
        "uptime": fmt_age(max(0.0, s.taken_at - s.started_at)),
    }
    for minutes in (1, 5):
        mean = mean_rates(rates, minutes)
        out[f"recv-{minutes}"] = "—" if mean is None else f"{mean[0]:.1f}/s"
        out[f"upl-{minutes}"] = "—" if mean is None else f"{mean[1]:.1f}/s"
    return out


def _downlink_fields(d: DownlinkStats, taken_at: float) -> dict[str, str]:
    """The downlink card's element id -> text, exactly as the page's script computes it."""
    return {
        "dl-source": f"{d.type} {d.source}",
        "dl-state": DOWNLINK_TEXT.get(d.state, d.state),
        "dl-received": str(d.received),
        "dl-delivered": str(d.delivered),
        "dl-expired": str(d.expired),
        "dl-dead": str(d.dead_lettered),
        "dl-last": "never" if d.last_delivered_at is None
        else fmt_age(max(0.0, taken_at - d.last_delivered_at)) + " ago",
    }


def _downlink_card(s: Snapshot) -> str:
    if not s.downlinks:
        return ""
    d = s.downlinks[0]
    f = {k: html.escape(v) for k, v in _downlink_fields(d, s.taken_at).items()}
    return f"""<section><h2>Downlink (<span id="dl-source">{f["dl-source"]}</span>)</h2>
<div id="dl-state" class="big {DOWNLINK_CLASS.get(d.state, "bad")}">{f["dl-state"]}</div>
<div>delivered <b id="dl-delivered">{f["dl-delivered"]}</b> of
<span id="dl-received">{f["dl-received"]}</span> received · expired
<span id="dl-expired">{f["dl-expired"]}</span> · dead letters <span id="dl-dead">{f["dl-dead"]}</span>
</div><div>last command: <span id="dl-last">{f["dl-last"]}</span></div></section>"""


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
function show(d){const s=d.snapshot,c=s.counters,f={
verdict:!d.ready?"ATTENTION":s.uplink_state=="online"?"OK":"BUFFERING","uplink-type":s.uplink_type,
"uplink-state":TEXT[s.uplink_state]||s.uplink_state,
"last-ack":s.last_ack_at==null?"never":age(Math.max(0,s.taken_at-s.last_ack_at))+" ago",
broker:s.ingress_connected?"connected":"NOT connected",depth:String(s.depth),
"in-flight":String(s.in_flight),oldest:age(s.oldest_age_seconds),
"dead-letters":String(s.dead_letter),"store-file":(s.store_file_bytes/1e6).toFixed(1)+" MB",
received:String(c.ingress_received||0),uplinked:String(c.uplinked||0),
dropped:Object.keys(s.dropped).sort().map(k=>k+": "+s.dropped[k]).join(", ")||"none",
uptime:age(Math.max(0,s.taken_at-s.started_at))};
for(const m of[1,5]){const x=mean(d.rates,m);f["recv-"+m]=x?x[0].toFixed(1)+"/s":"\\u2014";
f["upl-"+m]=x?x[1].toFixed(1)+"/s":"\\u2014"}
for(const k in f)document.getElementById(k).textContent=f[k];
const dl=(s.downlinks||[])[0];if(dl&&document.getElementById("dl-state")){const g={
"dl-source":dl.type+" "+dl.source,"dl-state":DLT[dl.state]||dl.state,"dl-received":String(dl.received),
"dl-delivered":String(dl.delivered),"dl-expired":String(dl.expired),"dl-dead":String(dl.dead_lettered),
"dl-last":dl.last_delivered_at==null?"never":age(Math.max(0,s.taken_at-dl.last_delivered_at))+" ago"};
for(const k in g)document.getElementById(k).textContent=g[k];
document.getElementById("dl-state").className="big "+(DLC[dl.state]||"bad")}
document.getElementById("uplink-state").className="big "+(CLS[s.uplink_state]||"warn");
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
    state_cls = STATE_CLASS.get(s.uplink_state, "warn")
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<noscript><meta http-equiv="refresh" content="5"></noscript>
<title>OpenHQM gateway — {f["verdict"]}</title><style>{_STYLE}</style></head><body>
<header class="{VERDICT_CLASS[f["verdict"]]}">
<h1>OpenHQM Edge Gateway — <span id="verdict">{f["verdict"]}</span></h1></header>
<main><ul id="problems">{problems}</ul><div class="grid">
<section><h2>Uplink (<span id="uplink-type">{f["uplink-type"]}</span>)</h2>
<div id="uplink-state" class="big {state_cls}">{f["uplink-state"]}</div>
<div>last acknowledgement: <span id="last-ack">{f["last-ack"]}</span></div></section>
<section><h2>Buffered messages</h2><div id="depth" class="big">{f["depth"]}</div>
<div>oldest: <b id="oldest">{f["oldest"]}</b> ·
in flight: <span id="in-flight">{f["in-flight"]}</span></div></section>
<section><h2>Broker (ingress)</h2>
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
<tr><th>dead letters</th><td id="dead-letters">{f["dead-letters"]}</td></tr>
<tr><th>dropped</th><td id="dropped">{f["dropped"]}</td></tr>
<tr><th>store file</th><td id="store-file">{f["store-file"]}</td></tr></table></section>
{_downlink_card(s)}</div>
<footer><span id="updated">snapshot; without JavaScript the page reloads every 5 s</span> ·
<a href="/status.json">status.json</a> ·
<a href="/metrics">metrics</a> · <a href="/readyz">readyz</a></footer>
</main><script>{script}</script></body></html>"""


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
            await asyncio.sleep(RATE_STEP)

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

