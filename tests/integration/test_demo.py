"""The README's first command, run the way the README runs it (``./scripts/demo.sh``, with a
shorter ``--seconds``): one outage of the advertised length, a handful of lines, about as long
as ``--seconds`` plus the catch-up, the RESULT line with nothing lost, and no temporary
directory left behind.

demo.sh installs what it needs first (apt packages when missing, then ``pip install -e
'.[demo]'`` into .venv), as on a fresh clone; here everything is present already.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.gateway_process import REPO
from tests.servers import require_binary

pytestmark = pytest.mark.integration

SECONDS, OUTAGE, RATE = 6, 2, 200
RESULT = re.compile(r"^RESULT: published (\d+), acknowledged by the broker (\d+), delivered to "
                    r"Redis (\d+) \((\d+) duplicate entries\), lost (\d+)$", re.MULTILINE)


def test_the_demo_shows_one_outage_and_ends_with_the_result(tmp_path: Path) -> None:
    require_binary("mosquitto", "apt-get install mosquitto")
    require_binary("redis-server", "apt-get install redis-server")
    tmp = tmp_path / "tmp"  # the demo's temporary directory goes here, and must not stay
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENHQM_")}
    started = time.monotonic()
    done = subprocess.run(["./scripts/demo.sh", "--seconds", str(SECONDS), "--outage",
                           str(OUTAGE)], cwd=REPO, env={**env, "TMPDIR": str(tmp)},
                          capture_output=True, text=True, timeout=180, check=False)
    took = time.monotonic() - started
    out = done.stdout
    assert done.returncode == 0, out + done.stderr

    result = RESULT.search(out)
    assert result, out
    published, acked, delivered, _duplicates, lost = map(int, result.groups())
    assert published == acked == delivered == SECONDS * RATE
    assert lost == 0
    assert out.rstrip().splitlines()[-1] == result.group(0)  # it ends with the RESULT line

    assert out.count("uplink outage:") == 1, out
    assert out.count("uplink back:") == 1, out
    assert f"stopped for {OUTAGE}s" in out
    said = [line for line in out.splitlines() if "gateway: uplink redis" in line]
    assert len(said) == 2 and "unavailable" in said[0] and "back after" in said[1], out
    demo_lines = out.split("==> pip install", 1)[-1].splitlines()[1:]
    assert len(demo_lines) <= 12, out  # a handful, not one per retry
    assert list(tmp.iterdir()) == []  # the demo removed its directory
    # the sensors' seconds, the catch-up, and the install check demo.sh does first
    print(f"\ndemo --seconds {SECONDS}: {took:.1f}s wall")
    assert took < SECONDS + 45, took
