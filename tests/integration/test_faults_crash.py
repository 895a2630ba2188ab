"""Crashes: SIGKILL at random moments, and what `store.durability` changes.

Real daemon, real mosquitto, real redis-server. "Acknowledged" below means the broker sent
the publisher a PUBACK: from then on the broker holds the message until the gateway
acknowledges it, and the gateway acknowledges only after its store committed it.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import orjson
import pytest

from gateway.config import StoreConfig
from gateway.store.db import Limits, StoreDb
from tests.gateway_process import GatewayProcess, Publisher, gateway_config
from tests.integration.test_end_to_end import check_per_topic_order, read_stream
from tests.servers import IN_CI, ServerProcess, wait_until

pytestmark = pytest.mark.integration

KILLS = 20
RECEIVE_MAXIMUM = 200
BATCH_SIZE = 200
CURSOR_SYNC = 200


class SteadyPublisher(threading.Thread):
    """Publishes QoS 1 at about ``rate`` messages per second over a few topics until stopped."""

    def __init__(self, pub: Publisher, root: str, rate: float, topics: int = 4) -> None:
        super().__init__(name="steady-publisher", daemon=True)
        self.pub = pub
        self.topics = [f"{root}/dev{i}" for i in range(topics)]
        self.rate = rate
        self.sent = 0
        self._halt = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        while not self._halt.is_set():
            topic = self.topics[self.sent % len(self.topics)]
            body = orjson.dumps({"topic": topic, "n": self.sent, "t": time.time()})
            self.pub.publish(topic, body)
            self.sent += 1
            ahead = self.sent / self.rate - (time.monotonic() - started)
            if ahead > 0:
                self._halt.wait(ahead)

    def halt(self) -> None:
        self._halt.set()
        self.join(10)


def make_gateway(tmp_path: Path, mosquitto: ServerProcess, redis_port: int, root: str,
                 **sections: dict[str, object]) -> GatewayProcess:
    queue = {"type": "redis", "redis_url": f"redis://127.0.0.1:{redis_port}/0",
             "request_queue_name": f"{root}-stream", "redis_socket_timeout": "2s"}
    config = gateway_config(tmp_path, mosquitto.port, root, queue, **sections)
    return GatewayProcess(config, tmp_path)


def delivered_report(redis_port: int, stream: str, acked: list[bytes]) -> dict[str, int]:
    """Check every acknowledged payload is in the stream; count the duplicates by kind."""
    entries = read_stream(redis_port, stream)
    bodies = Counter(b for _, b, _ in entries)
    missing = [b for b in acked if b not in bodies]
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {missing[:3]}"
    check_per_topic_order(entries)
    same_id = len(entries) - len({(mid, b) for mid, b, _ in entries})
    return {"entries": len(entries), "unique": len(bodies),
            "duplicates": len(entries) - len(bodies),
            "same_id": same_id,  # uplinked again after a crash before the store settled it
            "new_id": len(entries) - len(bodies) - same_id}  # redelivered by the broker


def after_crash_loop(pub: Publisher, sent: int, redis_port: int, root: str,
                     started: float) -> tuple[dict[str, int], float]:
    """The publisher stopped after a crash loop: wait for every PUBACK and for every
    acknowledged message in the stream; the delivered report and the loop's seconds."""
    pub.wait_all_acked(sent, timeout=30)
    seconds = time.monotonic() - started
    stream = f"{root}-stream"
    wait_until(lambda: {b for _, b, _ in read_stream(redis_port, stream)} >= set(pub.acked), 60,
               "every acknowledged message in Redis")
    return delivered_report(redis_port, stream, pub.acked), seconds


def check_crash_bounds(report: dict[str, int], pub: Publisher) -> None:
    """Each kill can duplicate at most what was in flight: the broker's window of
    unacknowledged messages, the forwarder's batch awaiting settlement and the messages
    settled since the cursor was last written (store.cursor_sync_messages)."""
    assert report["duplicates"] <= KILLS * (RECEIVE_MAXIMUM + BATCH_SIZE + CURSOR_SYNC)
    assert report["unique"] == len(set(pub.acked))


def test_crash_loop_20_sigkills_lose_nothing_acknowledged(
        tmp_path: Path, mosquitto: ServerProcess, redis: ServerProcess) -> None:
    root = f"crash/{uuid.uuid4().hex[:8]}"
    gw = make_gateway(tmp_path, mosquitto, redis.port, root,
                      ingress={"receive_maximum": RECEIVE_MAXIMUM},
                      forwarder={"batch_size": BATCH_SIZE},
                      store={"cursor_sync_messages": CURSOR_SYNC})
    gw.start()  # the persistent session exists before the first publish
    pub = Publisher(mosquitto.port)
    steady = SteadyPublisher(pub, root, rate=400)
    steady.start()
    rng = random.Random()
    started = time.monotonic()
    try:
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.1, 1.2))  # includes kills during start-up and catch-up
            gw.kill()
            gw.start(wait_ready=False)
    finally:
        steady.halt()
    report, crash_seconds = after_crash_loop(pub, steady.sent, redis.port, root, started)
    print(f"\ncrash loop: {KILLS} SIGKILLs in {crash_seconds:.1f}s, {len(pub.acked)} acknowledged, "
          f"{report['entries']} stream entries, {report['duplicates']} duplicates "
          f"({report['same_id']} uplinked twice with the same id, {report['new_id']} redelivered "
          f"by the broker under a new id)")
    check_crash_bounds(report, pub)
    assert gw.stop() == 0
    pub.close()


# -- durability: full vs normal --------------------------------------------------------------


class TracedGateway(GatewayProcess):
    """The daemon with ``strace`` attached once it is ready, recording its fsync and
    fdatasync calls (and nothing else). SIGKILL goes to the daemon itself."""

    def __init__(self, config: Path, workdir: Path, strace: str) -> None:
        super().__init__(config, workdir)
        self.trace = workdir / "sync.trace"
        self.strace = strace
        self.tracer: subprocess.Popen[bytes] | None = None

    def attach(self) -> None:
        assert self.proc is not None
        pid = self.proc.pid
        self.tracer = subprocess.Popen(
            [self.strace, "-f", "-qq", "-y", "-e", "trace=fsync,fdatasync", "-e", "signal=none",
             "-o", str(self.trace), "-p", str(pid)], stderr=subprocess.PIPE)
        wait_until(lambda: _tracer_pid(pid) != 0 or self.tracer_exited(), 10, "strace attached")
        if _tracer_pid(pid) == 0:
            self.kill()
            assert self.tracer is None
            unavailable("strace cannot attach to the daemon here (ptrace restricted: "
                        "kernel.yama.ptrace_scope or no CAP_SYS_PTRACE)")

    def tracer_exited(self) -> bool:
        return self.tracer is not None and self.tracer.poll() is not None

    def kill(self) -> None:
        super().kill()
        if self.tracer is not None:
            self.tracer.wait(10)  # strace exits with its tracee
            if self.tracer.stderr is not None:
                self.tracer.stderr.close()
            self.tracer = None

    def syncs(self) -> list[str]:
        """The files each successful sync call was for, in order."""
        text = self.trace.read_text(errors="replace") if self.trace.exists() else ""
        return [line.split("<", 1)[1].split(">", 1)[0] for line in text.splitlines()
                if "sync(" in line and "= 0" in line and "<" in line]


def _tracer_pid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    return 0


def unavailable(message: str) -> None:
    """Skip locally; fail in CI, which must run every fault test."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def require_strace() -> str:
    path = shutil.which("strace")
    if path is None:
        unavailable("strace is not installed (apt-get install strace; scripts/provision/faults.sh)")
        raise AssertionError("unreachable")
    probe = subprocess.run([path, "-qq", "-e", "trace=none", "true"], capture_output=True,
                           check=False)
    if probe.returncode != 0:
        unavailable(f"strace cannot trace here (ptrace denied?): {probe.stderr.decode()[:200]}")
    return path


@pytest.mark.parametrize("durability", ["full", "normal"])
def test_kill_mid_commit_by_durability(tmp_path: Path, mosquitto: ServerProcess,
                                       redis: ServerProcess, durability: str) -> None:
    """A SIGKILL in the middle of commits loses nothing under either setting (the kernel's
    page cache survives a process crash); what differs is the fsync before each ack."""
    strace = require_strace()
    root = f"dur/{uuid.uuid4().hex[:8]}"
    redis_port = redis.port
    redis.stop()  # nothing can be uplinked: every message stays in the store, committing
    queue = {"type": "redis", "redis_url": f"redis://127.0.0.1:{redis_port}/0",
             "request_queue_name": f"{root}-stream", "redis_socket_timeout": "1s"}
    config = gateway_config(tmp_path, mosquitto.port, root, queue,
                            # the uplink is down: keep the online commit interval, so commits
                            # (and their fsyncs under full) come as often as while online
                            store={"durability": durability, "commit_interval_ms": 5,
                                   "offline_commit_interval_ms": 5})
    gw = TracedGateway(config, tmp_path, strace)
    gw.start()
    gw.attach()
    pub = Publisher(mosquitto.port)
    steady = SteadyPublisher(pub, root, rate=600)
    steady.start()
    time.sleep(2.0)
    gw.kill()  # commits are running every few ms: this lands between or inside one
    steady.halt()
    syncs = gw.syncs()
    print(Counter(syncs))
    pub.wait_all_acked(steady.sent)
    buffered = GatewayProcess(config, tmp_path).status()["uplinks"]["default"]["depth"]
    print(f"\ndurability={durability}: {steady.sent} published in 2s, {buffered} in the store "
          f"at the kill, {len(syncs)} fsync/fdatasync calls by the daemon")
    if durability == "full":
        assert len(syncs) >= 100, "full: every append commit is fsynced before its ack"
    else:
        assert len(syncs) <= 20, "normal: no fsync per commit (only at WAL checkpoints)"
    redis.start()
    gw = GatewayProcess(config, tmp_path)
    gw.start()
    report = delivered_report_wait(redis.port, f"{root}-stream", pub.acked)
    print(f"after restart: {report}")
    assert gw.stop() == 0
    pub.close()


def delivered_report_wait(redis_port: int, stream: str, acked: list[bytes]) -> dict[str, int]:
    wait_until(lambda: {b for _, b, _ in read_stream(redis_port, stream)} >= set(acked), 60,
               "every acknowledged message in Redis")
    return delivered_report(redis_port, stream, acked)


# -- power loss: a loop-mounted ext4 whose unsynced writes are thrown away ----------------------


class LoopFs:
    """A small ext4 image on a loop device (root only). ``power_cut_copy`` copies the image
    as the block device has it now: what reached the "disk" (fsynced, or written back), and
    none of the dirty pages still in the page cache, which a power cut would lose."""

    def __init__(self, workdir: Path, size_mb: int = 64) -> None:
        self.workdir = workdir
        self.size_mb = size_mb
        self.mounts: list[tuple[Path, str]] = []

    @staticmethod
    def available() -> str | None:
        """None when it can be done here, else why not."""
        if os.geteuid() != 0:
            return "needs root (losetup, mount)"
        for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
            if shutil.which(tool) is None:
                return f"{tool} is not installed"
        return None

    def _run(self, *argv: str) -> str:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{argv} failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def create(self, name: str) -> Path:
        image = self.workdir / f"{name}.img"
        with open(image, "wb") as fh:
            fh.truncate(self.size_mb * 1024**2)
        self._run("mkfs.ext4", "-q", "-F", str(image))
        return self.mount(image, name)

    def mount(self, image: Path, name: str) -> Path:
        target = self.workdir / name
        target.mkdir(exist_ok=True)
        device = self._run("losetup", "--find", "--show", str(image))
        try:
            # delalloc and a long journal commit interval: nothing reaches the device
            # unless it is fsynced (or older than the kernel's 30 s dirty expiry)
            self._run("mount", "-t", "ext4", "-o", "commit=300", device, str(target))
        except RuntimeError:
            self._run("losetup", "-d", device)
            raise
        self.mounts.append((target, device))
        return target

    def power_cut_copy(self, name: str, source: str) -> Path:
        copy = self.workdir / f"{name}.img"
        # the backing file holds what the loop device received; read it without O_DIRECT
        shutil.copyfile(self.workdir / f"{source}.img", copy)
        return self.mount(copy, name)

    def cleanup(self) -> None:
        for target, device in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)
            subprocess.run(["losetup", "-d", device], capture_output=True, check=False)
        self.mounts.clear()


def store_count(path: Path) -> int:
    """Messages the store file holds for the uplink (read as ``openhqm-gateway status`` does)."""
    db = StoreDb(str(path), Limits.from_config(StoreConfig()), readonly=True)
    db.open()
    try:
        return db.depth("default")
    finally:
        db.close()


def power_cut_config(tmp_path: Path, mosquitto: ServerProcess, redis_port: int, *, root: str,
                     gateway_id: str, state_dir: Path, durability: str) -> Path:
    queue = {"type": "redis", "redis_url": f"redis://127.0.0.1:{redis_port}/0",
             "request_queue_name": f"{root}-stream", "redis_socket_timeout": "1s"}
    return gateway_config(tmp_path, mosquitto.port, root, queue,
                          gateway={"id": gateway_id, "state_dir": str(state_dir)},
                          store={"durability": durability})


def power_cut_disk(tmp_path: Path) -> tuple[LoopFs, Path]:
    """A loop-mounted ext4 for a power-cut test (its LoopFs, to clean up, and its mount
    point), or a skip saying why this machine cannot have one."""
    why_not = LoopFs.available()
    if why_not is not None:
        pytest.skip(f"power-cut emulation {why_not}; test_kill_mid_commit_by_durability "
                    "covers the fsync difference")
    fs = LoopFs(tmp_path)
    try:
        return fs, fs.create("disk")
    except RuntimeError as exc:  # no loop devices in this container, ...
        fs.cleanup()
        pytest.skip(f"power-cut emulation: cannot mount a loop device here: {exc}")


@pytest.mark.parametrize("durability", ["full", "normal"])
def test_power_cut_on_a_loop_mounted_fs(tmp_path: Path, mosquitto: ServerProcess,
                                        redis: ServerProcess, durability: str) -> None:
    """full: every message the gateway acknowledged survives a power cut. normal: the
    commits since the last WAL checkpoint are lost although they were acknowledged."""
    fs, disk = power_cut_disk(tmp_path)
    gw: GatewayProcess | None = None
    root, gateway_id = f"power/{uuid.uuid4().hex[:8]}", f"power-{uuid.uuid4().hex[:8]}"
    try:
        redis.stop()  # everything stays in the store
        gw = GatewayProcess(power_cut_config(tmp_path, mosquitto, redis.port, root=root,
                                             gateway_id=gateway_id, state_dir=disk / "state",
                                             durability=durability), tmp_path)
        gw.start()
        pub = publish_then_kill(gw, mosquitto, root, seconds=2.0)
        after_cut = fs.power_cut_copy("after-cut", "disk")  # the disk as a power cut leaves it
        in_cache = store_count(disk / "state" / "store.db")  # what a process crash leaves
        on_disk = store_count(after_cut / "state" / "store.db")
        print(f"\ndurability={durability}: {len(pub.acked)} published, {in_cache} in the store after "
              f"the kill (page cache), {on_disk} after the power cut")
        # The gateway restarts on the power-cut disk (same MQTT session); the broker
        # redelivers what the gateway had not acknowledged.
        redis.start()
        gw = GatewayProcess(power_cut_config(tmp_path, mosquitto, redis.port, root=root,
                                             gateway_id=gateway_id,
                                             state_dir=after_cut / "state",
                                             durability=durability), tmp_path)
        gw.start()
        if durability == "full":
            report = delivered_report_wait(redis.port, f"{root}-stream", pub.acked)
            print(f"after restart: {report}")
        else:
            lost = count_lost(gw, pub, redis.port, root)
            assert on_disk < in_cache, "normal: the unsynced commits are not on the disk"
            assert lost > 0, "normal: acknowledged messages are lost on a power cut"
        assert gw.stop() == 0
        pub.close()
    finally:
        if gw is not None and gw.proc is not None:
            gw.kill()
        fs.cleanup()


def publish_then_kill(gw: GatewayProcess, mosquitto: ServerProcess, root: str,
                      seconds: float) -> Publisher:
    """Publish steadily, SIGKILL the gateway after ``seconds``; every publish acked."""
    pub = Publisher(mosquitto.port)
    steady = SteadyPublisher(pub, root, rate=600)
    steady.start()
    time.sleep(seconds)
    gw.kill()
    steady.halt()
    pub.wait_all_acked(steady.sent)
    return pub


def count_lost(gw: GatewayProcess, pub: Publisher, redis_port: int, root: str) -> int:
    stream = f"{root}-stream"
    pub.publish(f"{root}/marker", b"marker")  # arrives after the redeliveries
    wait_until(lambda: b"marker" in {b for _, b, _ in read_stream(redis_port, stream)}
               and gw.status()["uplinks"]["default"]["depth"] == 0, 60, "drained")
    got = {b for _, b, _ in read_stream(redis_port, stream)}
    acked = set(pub.acked) - {b"marker"}
    lost = len(acked - got)
    print(f"after restart: {len(got & acked)} of {len(acked)} delivered, {lost} acknowledged "
          "messages lost to the power cut")
    return lost
