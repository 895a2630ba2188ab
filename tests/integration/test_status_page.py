"""The status page in a real browser: headless Chromium against the running daemon.

The daemon buffers behind a dead uplink; the DOM after the page's script fetched
/status.json must show the real depth, oldest age, uplink state and rates, and a screenshot
must be a real picture of the page.
"""

from __future__ import annotations

import re
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.chromium import ElementText, dump_dom, luminance_stats, parse_dom, read_png, screenshot
from tests.gateway_process import GatewayProcess, Publisher, gateway_config
from tests.servers import ServerProcess, require_binary, wait_until

pytestmark = pytest.mark.integration

HINT = "apt-get install chromium, or scripts/provision/status-page.sh"


def status(base: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{base}/status.json", timeout=5) as resp:
        data: dict[str, Any] = orjson.loads(resp.read())
    return data


def mean(rates: list[list[float]], index: int, samples: int) -> str:
    window = rates[-samples:]
    return f"{sum(r[index] for r in window) / len(window):.1f}/s"


def check_dom(dom: ElementText, before: dict[str, Any], after: dict[str, Any]) -> None:
    """The DOM shows what /status.json said just before and just after the browser ran."""
    text = dom.text
    # The script ran and fetched /status.json (the server-rendered page says "snapshot").
    assert text["updated"].startswith("live, updated "), text["updated"]
    snap = after["snapshot"]
    (uplink,) = snap["uplinks"]  # one card per uplink; this gateway has one
    assert text["u0-depth"] == str(uplink["depth"]) == "25"
    # while the uplink is down the forwarder probes with one message per backoff round
    assert text["u0-in-flight"] in {"0", "1"}, text["u0-in-flight"]
    assert (text["u0-name"], text["u0-type"]) == ("default", "redis")
    assert uplink["state"] == "backing_off"
    assert text["u0-state"] == "offline, retrying"
    assert ("div", {"id": "u0-state", "class": "big bad"}) in dom.elements
    assert text["broker"] == "connected"
    assert text["verdict"] == "ATTENTION"
    # The readiness failures, as /status.json words them (seconds aside: they tick).
    assert [re.sub(r"\d+", "N", f) for f in after["failures"]] == [
        "uplink redis stuck: no acknowledgement for Ns with N messages waiting (> Ns)"]
    assert re.sub(r"\d+", "N", text["problems"]) == re.sub(r"\d+", "N", after["failures"][0])
    match = re.fullmatch(r"(\d+\.\d) s", text["u0-oldest"])
    assert match, text["u0-oldest"]
    oldest = float(match.group(1))
    assert (before["snapshot"]["uplinks"][0]["oldest_age_seconds"] - 0.05 <= oldest
            <= uplink["oldest_age_seconds"] + 0.05)
    assert text["received"] == "65" and text["uplinked"] == "40"
    assert text["dead-letters"] == text["u0-dead"] == "0" and text["dropped"] == "none"
    # Rates: one 10 s sample per entry; what the page shows is one of the two fetches.
    assert any(text["recv-1"] == mean(r, 0, 6) and text["upl-1"] == mean(r, 1, 6)
               and text["recv-5"] == mean(r, 0, 30) and text["upl-5"] == mean(r, 1, 30)
               for r in (before["rates"], after["rates"])), (text, before["rates"])
    assert float(text["recv-1"].removesuffix("/s")) > 0
    polylines = [a for tag, a in dom.elements if tag == "polyline"]
    assert sorted(p["class"] for p in polylines) == ["recv", "upl"]
    assert len(polylines[1]["points"].split()) in {
        max(2, len(before["rates"])), max(2, len(after["rates"]))}


def test_status_page_in_headless_chromium(tmp_path: Path, mosquitto: ServerProcess,
                                          redis: ServerProcess) -> None:
    browser = require_binary("chromium", HINT)
    root = f"page/{uuid.uuid4().hex[:8]}"
    queue = {"type": "redis", "redis_url": f"redis://127.0.0.1:{redis.port}/0",
             "request_queue_name": f"{root}-stream"}
    config = gateway_config(tmp_path, mosquitto.port, root, queue,
                            observability={"stuck_no_ack": "1s"})
    gw = GatewayProcess(config, tmp_path)
    gw.start()
    base = gw.http_url()
    pub = Publisher(mosquitto.port)
    try:
        for n in range(40):
            pub.publish(f"{root}/t", b"%d" % n)
        pub.wait_all_acked(40)
        wait_until(lambda: status(base)["snapshot"]["uplinks"][0]["counters"]["uplinked"] == 40,
                   15, "40 uplinked")
        # Before the first 10 s rate sample: online, OK, and no rates yet.
        first = parse_dom(dump_dom(browser, tmp_path / "profile", f"{base}/")).text
        assert first["updated"].startswith("live, updated ")
        assert (first["verdict"], first["u0-state"]) == ("OK", "online")
        assert first["uplinked"] == "40" and first["u0-depth"] == "0"
        if not status(base)["rates"]:
            assert first["recv-1"] == first["upl-5"] == "—"
            assert "collecting" in first["chart"]
        redis.stop()  # the uplink is cut: what arrives now stays in the buffer
        for n in range(25):
            pub.publish(f"{root}/t", b"late%d" % n)
        pub.wait_all_acked(65)
        wait_until(lambda: (s := status(base))["snapshot"]["uplinks"][0]["depth"] == 25
                   and s["snapshot"]["uplinks"][0]["state"] == "backing_off" and not s["ready"]
                   and len(s["rates"]) >= 1, 20, "a backlog, the uplink down, one rate sample")

        before = status(base)
        dom = parse_dom(dump_dom(browser, tmp_path / "profile", f"{base}/"))
        after = status(base)
        check_dom(dom, before, after)

        size = (1000, 820)
        png = read_png(screenshot(browser, tmp_path / "profile", f"{base}/",
                                  out=tmp_path / "page.png", size=size))
        assert (png.width, png.height) == size
        variance, colours = luminance_stats(png)
        assert variance > 100 and colours > 20, (variance, colours)
        # The header is red (not ready), not the page's grey background or a blank white.
        r, g, b = png.pixel(size[0] // 2, 5)[:3]
        assert r > 150 and g < 80 and b < 80, (r, g, b)
    finally:
        pub.close()
        assert gw.stop() == 0
