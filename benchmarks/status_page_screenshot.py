"""Regenerate docs/status-page.png: the status page of a real daemon during an uplink outage.

Starts a private mosquitto and redis-server on free loopback ports, runs the gateway daemon
against them, publishes a varying stream of QoS 1 readings for ``--seconds`` seconds, stops
Redis for the last third of that (the chart shows uplinked falling to zero while the buffer
grows), and takes the screenshot in headless Chromium. Needs mosquitto, redis-server and
chromium (scripts/test.sh and scripts/provision/status-page.sh install them).

    .venv/bin/python benchmarks/status_page_screenshot.py [--seconds 150] [--out docs/status-page.png]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from tests.chromium import read_png, screenshot
from tests.gateway_process import GatewayProcess, Publisher, gateway_config
from tests.servers import mosquitto_server, redis_server, wait_until

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=150.0)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "status-page.png")
    parser.add_argument("--size", default="1000x620", help="window WIDTHxHEIGHT")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="status-page-") as tmp_name:
        tmp = Path(tmp_name)
        broker, redis = mosquitto_server(tmp / "mosquitto"), redis_server(tmp / "redis")
        broker.start()
        redis.start()
        root = f"site/{uuid.uuid4().hex[:6]}"
        config = gateway_config(
            tmp, broker.port, root,
            {"type": "redis", "redis_url": f"redis://127.0.0.1:{redis.port}/0"},
            observability={"stuck_no_ack": "20s"})
        gw = GatewayProcess(config, tmp)
        gw.start()
        pub = Publisher(broker.port)
        try:
            started = time.monotonic()
            outage_at = started + args.seconds * 2 / 3
            sent = 0
            while (elapsed := time.monotonic() - started) < args.seconds:
                if redis.proc is not None and time.monotonic() >= outage_at:
                    print(f"{elapsed:5.1f}s: stopping redis-server (the uplink outage)")
                    redis.stop()
                # ten sensors, a reading each per second, and a burst every half minute
                rate = 10 + 8 * math.sin(elapsed / 9) + (25 if int(elapsed) % 30 < 3 else 0)
                for _ in range(max(1, round(rate / 5))):
                    pub.publish(f"{root}/sensor{sent % 10}", orjson.dumps(
                        {"seq": sent, "t": time.time(), "temp": 20 + math.sin(sent / 50)}))
                    sent += 1
                time.sleep(0.2)
            wait_until(lambda: len(pub.acked) == sent, 20, "every reading acknowledged")
            base = gw.http_url()
            png = screenshot("chromium", tmp / "profile", f"{base}/", out=args.out,
                             size=(width, height))
            image = read_png(png)
            print(f"published {sent}; wrote {args.out} ({image.width}x{image.height}, "
                  f"{len(png)} bytes)")
        finally:
            pub.close()
            gw.stop()
            redis.stop()
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
