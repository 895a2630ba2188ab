"""Disk faults, daemon level: a full disk (a size-limited tmpfs when this machine lets us mount
one, and SQLite's max_page_count everywhere), and a damaged store file at start."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from gateway.store.recovery import COUNTER_NAME, COUNTER_QUEUE
from tests.gateway_process import GatewayProcess, Publisher, gateway_config
from tests.integration.test_end_to_end import read_stream
from tests.servers import ServerProcess, wait_until

pytestmark = pytest.mark.integration

PAYLOAD = 1024


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path | None]:
    """A 3 MB tmpfs, or None when mounting is not allowed here (not root, no CAP_SYS_ADMIN)."""
    target = tmp_path / "small"
    target.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs",
                              str(target)], capture_output=True, check=False).returncode == 0
    yield target if mounted else None
    if mounted:
        subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


def body(n: int) -> bytes:
    """A JSON head and random bytes: the store compresses frames, random bytes still fill it."""
    head = orjson.dumps({"n": n})
    return head + os.urandom(PAYLOAD - len(head))


def fill_until_dropping(gw: GatewayProcess, pub: Publisher, root: str, limit: int) -> int:
    """Publish until the gateway reports disk_full drops; returns how many were published."""
    n = 0
    while n < limit:
        for _ in range(200):
            pub.publish(f"{root}/fill", body(n))
            n += 1
        pub.wait_all_acked(n)
        dropped = gw.status()["uplinks"]["default"]["dropped"]
        if dropped.get("disk_full", 0) > 0:
            return n
    raise AssertionError(f"no disk_full drop after {n} messages (status {gw.status()}):\n"
                         f"{gw.log()[-3000:]}")


def account(gw: GatewayProcess, pub: Publisher, redis_port: int, stream: str) -> None:
    """Every acknowledged message is delivered or counted as dropped, exactly once."""
    status = gw.status()["uplinks"]["default"]
    dropped = sum(status["dropped"].values())
    delivered = {b for _, b, _ in read_stream(redis_port, stream)}
    missing = set(pub.acked) - delivered
    print(f"\n{len(pub.acked)} acknowledged, {len(delivered)} delivered, dropped {status['dropped']}")
    assert len(missing) == dropped, "each message not delivered is counted as dropped once"


CASES = {
    # the store on a 3 MB tmpfs (with a 1 MB ballast file in it); space is to come back
    # by draining the store into the uplink
    "tmpfs_uplink_returns": {"store": {"when_full": "reject_new"}},
    # SQLite's max_page_count: 1200 pages of 1 KB; space returns by draining
    "max_page_count": {"store": {"when_full": "drop_oldest", "max_page_count": 1200}},
}


@pytest.mark.parametrize("how", ["tmpfs_uplink_returns", "max_page_count"])
def test_full_disk_policy_applies_daemon_keeps_running_and_recovers(
        tmp_path: Path, mosquitto: ServerProcess, redis: ServerProcess,
        small_fs: Path | None, how: str) -> None:
    if how.startswith("tmpfs") and small_fs is None:
        pytest.skip("cannot mount a tmpfs here (needs root); the max_page_count case runs the "
                    "same SQLITE_FULL path")
    root = f"full/{how}/{uuid.uuid4().hex[:8]}"
    stream = f"{root}-stream"
    sections = dict(CASES[how])
    if small_fs is not None and how.startswith("tmpfs"):
        sections["gateway"] = {"state_dir": str(small_fs / "state")}
        (small_fs / "ballast").write_bytes(b"\0" * 1024**2)
    queue = {"type": "redis", "redis_url": f"redis://127.0.0.1:{redis.port}/0",
             "request_queue_name": stream, "redis_socket_timeout": "1s"}
    gw = GatewayProcess(gateway_config(tmp_path, mosquitto.port, root, queue, **sections),
                        tmp_path)
    redis.stop()  # nothing drains: the store fills up
    gw.start()
    pub = Publisher(mosquitto.port)
    try:
        published = fill_until_dropping(gw, pub, root, limit=8000)
        for n in range(published, published + 200):  # more while full: refused or room made
            pub.publish(f"{root}/fill", body(n))
        pub.wait_all_acked(published + 200)
        time.sleep(0.5)
        assert gw.proc is not None and gw.proc.poll() is None, "the daemon keeps running"
        redis.start()
        wait_until(lambda: gw._alive() and gw.status()["uplinks"]["default"]["depth"] == 0, 20,
                   "drained")
        after = [body(n) for n in range(10_000, 10_300)]
        for b in after:  # space is back: stored and delivered again
            pub.publish(f"{root}/after", b)
        pub.wait_all_acked(published + 500)
        wait_until(lambda: set(after) <= {b for _, b, _ in read_stream(redis.port, stream)},
                   60, "messages after recovery delivered")
        account(gw, pub, redis.port, stream)
        assert "Traceback" not in gw.log()
        assert gw.stop() == 0
    finally:
        pub.close()
        if gw.proc is not None:
            gw.kill()


# -- a damaged store at start -------------------------------------------------------------------


def damaged_store(path: Path, how: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if how == "not_a_database":
        path.write_bytes(b"\x00garbage from a bad SD card sector\n" * 500)
        return
    conn = sqlite3.connect(path)  # a real store-like file, then pages overwritten
    conn.execute("CREATE TABLE messages(seq INTEGER PRIMARY KEY, payload BLOB)")
    conn.executemany("INSERT INTO messages(payload) VALUES (?)", [(b"x" * 500,)] * 2000)
    conn.commit()
    conn.close()
    with open(path, "r+b") as fh:
        fh.seek(10 * 4096)
        fh.write(b"\xa5" * 20 * 4096)


@pytest.mark.parametrize("how", ["not_a_database", "damaged_pages"])
def test_damaged_store_at_start_is_quarantined_and_service_runs(
        tmp_path: Path, mosquitto: ServerProcess, redis: ServerProcess, how: str) -> None:
    root = f"corrupt/{uuid.uuid4().hex[:8]}"
    stream = f"{root}-stream"
    queue = {"type": "redis", "redis_url": f"redis://127.0.0.1:{redis.port}/0",
             "request_queue_name": stream}
    gw = GatewayProcess(gateway_config(tmp_path, mosquitto.port, root, queue), tmp_path)
    store = tmp_path / "state" / "store.db"
    damaged_store(store, how)
    original = store.read_bytes()
    gw.start()
    try:
        errors = [line for line in gw.log().splitlines() if " ERROR " in line]
        assert any("damaged" in line and ".corrupt-" in line for line in errors), gw.log()
        (moved,) = [p for p in store.parent.glob("store.db.corrupt-*")
                    if not p.name.endswith(("-wal", "-shm"))]
        assert moved.read_bytes() == original, "the damaged file is kept untouched"
        pub = Publisher(mosquitto.port)
        sent = [orjson.dumps({"n": n}) for n in range(50)]
        for b in sent:
            pub.publish(f"{root}/t", b)
        pub.wait_all_acked(len(sent))
        wait_until(lambda: [b for _, b, _ in read_stream(redis.port, stream)] == sent, 30,
                   "the fresh store works end to end")
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as conn:
            (count,) = conn.execute("SELECT value FROM counters WHERE queue = ? AND name = ?",
                                    (COUNTER_QUEUE, COUNTER_NAME)).fetchone()
        assert count == 1
        assert gw.stop() == 0
        pub.close()
    finally:
        if gw.proc is not None:
            gw.kill()


def test_unreadable_store_is_not_quarantined(tmp_path: Path) -> None:
    """A store path that cannot be opened for other reasons (here: it is a directory) is an
    error the daemon exits with, not damage: nothing is moved aside."""
    store = tmp_path / "state" / "store.db"
    store.mkdir(parents=True)
    config = tmp_path / "gw.yaml"
    config.write_text(f"gateway:\n  state_dir: {tmp_path / 'state'}\nqueue:\n  type: redis\n")
    result = GatewayProcess(config, tmp_path).cli("run", check=False)
    assert result.returncode != 0
    assert store.is_dir() and not list(store.parent.glob("store.db.corrupt-*"))
    shutil.rmtree(store)
