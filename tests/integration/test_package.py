"""The Debian package: built with packaging/build-deb.sh, its contents checked with dpkg-deb, and
the arm64 build installed into a fresh Debian arm64 root under qemu-user emulation
(packaging/check-arm64.sh), where ``--version`` and ``config check`` must run.

Both build from PyPI (the target's wheels). The arm64 check needs root (debootstrap, chroot,
mounts) and binfmt_misc: without them it skips locally and fails when CI=true.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis as redis_py
import yaml

import gateway
from tests.gateway_process import GatewayProcess, Publisher, gateway_config
from tests.servers import IN_CI, ServerProcess, free_port, require_binary, wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NAME = "openhqm-gateway"
DEB_VERSION = f"{gateway.__version__}-1"
UNIT_PATH = "./lib/systemd/system/openhqm-gateway.service"


def _skip_or_fail(message: str) -> None:
    if IN_CI:
        pytest.fail(f"CI must run the package checks: {message}")
    pytest.skip(message)


def _build(arch: str, out: Path, extras: str = "redis") -> tuple[Path, float]:
    require_binary("dpkg-deb", "apt-get install dpkg")
    env = {**os.environ, "OPENHQM_DIST": str(out), "PYTHON": sys.executable}
    start = time.monotonic()
    done = subprocess.run(["bash", "packaging/build-deb.sh", arch, extras], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    deb = out / f"{NAME}_{DEB_VERSION}_{arch}.deb"
    assert deb.is_file(), done.stdout
    return deb, time.monotonic() - start


def _dpkg_deb(*args: str) -> str:
    return subprocess.run(["dpkg-deb", *args], capture_output=True, text=True, check=True,
                          timeout=60).stdout


def _fields(deb: Path) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in _dpkg_deb("-f", str(deb)).splitlines():
        if line and not line[0].isspace():
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


@pytest.fixture(scope="module")
def amd64_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    deb, seconds = _build("amd64", tmp_path_factory.mktemp("dist"))
    print(f"amd64 package built in {seconds:.1f}s")
    return deb


def test_amd64_package_contents(amd64_deb: Path, tmp_path: Path) -> None:
    deb = amd64_deb

    fields = _fields(deb)
    assert fields["Package"] == NAME
    assert fields["Version"] == DEB_VERSION
    assert fields["Architecture"] == "amd64"
    depends = [d.strip() for d in fields["Depends"].split(",")]
    # The wheels are CPython 3.11 builds: the package says so instead of failing in postinst.
    assert depends == ["python3 (>= 3.11)", "python3 (<< 3.12)", "python3-venv", "adduser"]
    assert " Uplink extras: redis.\n" in _dpkg_deb("-I", str(deb))

    listing = _dpkg_deb("-c", str(deb)).splitlines()
    entries = {line.split()[5]: line for line in listing}
    assert all(line.split()[1] == "root/root" for line in listing)
    for path in (UNIT_PATH, "./etc/openhqm-gateway/gateway.yaml",
                 "./usr/lib/openhqm-gateway/requirement.txt",
                 "./usr/share/doc/openhqm-gateway/README.md",  # the unit's Documentation=
                 "./usr/share/doc/openhqm-gateway/copyright"):
        assert path in entries, path
    assert entries["./etc/openhqm-gateway/credentials/"].startswith("drwx------")
    link = next(line for line in listing if line.split()[5] == "./usr/bin/openhqm-gateway")
    assert link.endswith("-> /opt/openhqm-gateway/bin/openhqm-gateway")

    wheels = sorted(Path(p).name for p in entries if p.startswith("./usr/lib/openhqm-gateway/wheels/")
                    and p.endswith(".whl"))
    names = {re.split(r"-\d", w, maxsplit=1)[0].lower() for w in wheels}
    # async-timeout: redis needs it below Python 3.11.3, and Debian 12 ships 3.11.2.
    assert {"openhqm_gateway", "orjson", "pyyaml", "redis", "async_timeout"} <= names, wheels
    assert not any("aarch64" in w for w in wheels), wheels
    assert all(w.endswith("-none-any.whl") or ("cp311" in w and "x86_64" in w) for w in wheels)

    extracted = tmp_path / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(extracted)], check=True, timeout=60)
    control = tmp_path / "control"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True, timeout=60)
    assert (control / "conffiles").read_text().split() == ["/etc/openhqm-gateway/gateway.yaml"]
    for script in ("postinst", "prerm", "postrm"):
        assert os.access(control / script, os.X_OK)
        subprocess.run(["sh", "-n", str(control / script)], check=True, timeout=10)
    assert (extracted / "usr/lib/openhqm-gateway/requirement.txt").read_text().strip() == \
        f"{NAME}[redis]=={gateway.__version__}"

    # The unit, the sample config and the package agree on paths and the user.
    unit_text = (extracted / UNIT_PATH).read_text()
    assert unit_text == (REPO / "systemd" / "openhqm-gateway.service").read_text()
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string(unit_text)
    service = unit["Service"]
    assert service["ExecStart"].split()[0] == "/opt/openhqm-gateway/bin/openhqm-gateway"
    assert "/etc/openhqm-gateway/gateway.yaml" in service["ExecStart"]
    assert service["User"] == service["Group"] == NAME
    assert service["StateDirectory"] == service["ConfigurationDirectory"] == NAME
    sample = yaml.safe_load((extracted / "etc/openhqm-gateway/gateway.yaml").read_text())
    assert sample["gateway"]["state_dir"] == f"/var/lib/{service['StateDirectory']}"
    postinst = (control / "postinst").read_text()
    assert f"NAME={NAME}" in postinst and "STATE=/var/lib/$NAME" in postinst
    credential = re.search(r"^LoadCredential=[^:]+:(\S+)$", unit_text, re.MULTILINE)
    assert credential is not None
    assert credential.group(1) == "/etc/openhqm-gateway/credentials/mqtt-password"
    assert "$CREDS/mqtt-password" in postinst  # the placeholder that lets the unit start
    assert (extracted / "usr/share/openhqm-gateway/gateway.yaml.sample").read_bytes() == \
        (REPO / "config" / "gateway.yaml").read_bytes()


# Lintian warnings this package has on purpose; anything else (and any error) fails.
LINTIAN_ACCEPTED = {
    # Debian's python3 on purpose: the wheels are for it, whatever is first on root's PATH.
    "command-with-path-in-maintainer-script",
    # Not a Debian archive upload: there are no bugs to close.
    "initial-upload-closes-no-bugs",
    # `openhqm-gateway --help` and the README are the manual.
    "no-manual-page",
    # /etc/openhqm-gateway/credentials is root-only: it holds secrets for LoadCredential=.
    "non-standard-dir-perm",
}


def test_amd64_package_passes_lintian(amd64_deb: Path) -> None:
    lintian = require_binary("lintian", "apt-get install lintian (scripts/provision/packaging.sh)")
    done = subprocess.run([lintian, "--tag-display-limit", "0", str(amd64_deb)],
                          capture_output=True, text=True, timeout=120, check=False)
    tags = re.findall(r"^([EWIPX]): \S+: (\S+)", done.stdout, re.MULTILINE)
    unexpected = [f"{level}: {tag}" for level, tag in tags
                  if level == "E" or tag not in LINTIAN_ACCEPTED]
    assert not unexpected, done.stdout + done.stderr
    assert "E:" not in done.stdout


def test_build_rejects_bad_arguments(tmp_path: Path) -> None:
    env = {**os.environ, "OPENHQM_DIST": str(tmp_path)}
    for args in (["armhf"], ["arm64", "redis;rm -rf /"], []):
        done = subprocess.run(["bash", "packaging/build-deb.sh", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 2, (args, done.stderr)
    assert not list(tmp_path.iterdir())


def test_packaging_scripts_pass_shellcheck() -> None:
    shellcheck = require_binary("shellcheck", "apt-get install shellcheck (scripts/provision/packaging.sh)")
    scripts = [*(REPO / "packaging").glob("*.sh"),
               *(REPO / "packaging" / "debian" / name for name in ("postinst", "prerm", "postrm")),
               REPO / "scripts" / "provision" / "packaging.sh"]
    done = subprocess.run([shellcheck, "-x", *map(str, scripts)], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def _root_script(argv: list[str], timeout: float,
                 env: dict[str, str] | None = None) -> tuple[int, str, float]:
    """Run one of the arm64 scripts (root, qemu): (exit code, output, seconds). Exit code 3
    (this machine cannot run arm64 binaries) skips locally and fails in CI."""
    start = time.monotonic()
    proc = subprocess.Popen(["bash", *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, **(env or {})})
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # The scripts unmount on TERM; a KILL would leave /proc mounted in a root.
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"{argv[0]} timed out:\n{out[-4000:]}")
    if proc.returncode == 3:
        _skip_or_fail(f"this machine cannot run arm64 binaries (binfmt_misc/qemu):\n{out[-2000:]}")
    return proc.returncode, out, time.monotonic() - start


@pytest.mark.timeout(1500)
def test_arm64_package_installs_and_runs_under_emulation(tmp_path: Path) -> None:
    """A fresh root costs a debootstrap (about 2-3 minutes here); the cached one about 1 minute."""
    if os.geteuid() != 0:
        _skip_or_fail("needs root (debootstrap, chroot, mount)")
    if shutil.which("apt-get") is None:
        _skip_or_fail("needs a Debian host (apt-get, debootstrap)")
    deb, build_seconds = _build("arm64", tmp_path / "dist")
    assert _fields(deb)["Architecture"] == "arm64"
    returncode, out, seconds = _root_script(["packaging/check-arm64.sh", str(deb)], timeout=1400)
    print(f"arm64 package built in {build_seconds:.1f}s, checked in {seconds:.1f}s")
    print(out[-3000:])
    assert returncode == 0, out[-6000:]
    assert "uname -m in the root: aarch64" in out
    assert re.search(r"python3: ELF 64-bit LSB .*ARM aarch64", out)
    assert "ok: orjson extension is aarch64" in out
    assert f"openhqm-gateway --version: openhqm-gateway {gateway.__version__}" in out
    assert "# valid configuration from /etc/openhqm-gateway/gateway.yaml" in out
    for check in ("config check as openhqm-gateway", "purge: state gone", "remove: state kept"):
        assert f"ok: {check}" in out


def _healthcheck(config: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENHQM_")}
    env.update(OPENHQM_CONFIG=str(config), PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "packaging" / "docker-healthcheck.py")],
                          env=env, capture_output=True, text=True, timeout=30, check=False)


def test_container_healthcheck_against_the_daemon(tmp_path: Path, mosquitto: ServerProcess,
                                                  redis: ServerProcess) -> None:
    """The image's HEALTHCHECK script finds /healthz from the config and tells up from down."""
    port = free_port()
    queue = {"type": "redis", "redis_url": f"redis://127.0.0.1:{redis.port}/0",
             "request_queue_name": f"pkg-{uuid.uuid4().hex[:8]}"}
    config = gateway_config(tmp_path, mosquitto.port, f"pkg/{uuid.uuid4().hex[:8]}", queue,
                            observability={"listen": f"127.0.0.1:{port}"})
    gw = GatewayProcess(config, tmp_path)
    gw.start()
    try:
        up = _healthcheck(config)
        assert up.returncode == 0, up.stdout + up.stderr
        assert up.stdout.strip() == f"healthy: http://127.0.0.1:{port}/healthz"
    finally:
        assert gw.stop() == 0
    down = _healthcheck(config)
    assert down.returncode == 1 and down.stdout.startswith("unhealthy:"), down.stdout
    config.write_text(config.read_text().replace(f"listen: 127.0.0.1:{port}", "listen: ''"))
    off = _healthcheck(config)
    assert off.returncode == 1 and "observability.listen is off" in off.stdout, off.stdout


# ---- Dockerfile.arm64, built with buildah on a debootstrapped base and run under qemu ----

BUILDAH_ROOT = REPO / ".cache" / "buildah"
IMAGES = {"redis": "localhost/openhqm-gateway:arm64-ci",
          "redis,kafka": "localhost/openhqm-gateway:arm64-ci-kafka"}
ENTRYPOINT = ["/opt/openhqm-gateway/bin/openhqm-gateway"]


def _buildah_argv() -> list[str]:
    return ["buildah", "--storage-driver", "vfs", "--root", str(BUILDAH_ROOT / "storage"),
            "--runroot", str(BUILDAH_ROOT / "run")]


def _buildah(*args: str, timeout: float = 120, check: bool = True,
             ) -> subprocess.CompletedProcess[str]:
    """buildah on the storage packaging/build-arm64-image.sh uses (vfs, under .cache)."""
    done = subprocess.run([*_buildah_argv(), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args[:3])} exited {done.returncode}:\n"
                             f"{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done


def _in_container(ctr: str, *argv: str, flags: list[str] | None = None,
                  ) -> subprocess.CompletedProcess[str]:
    """``buildah run``: a process in the container's root under qemu, as the image's USER (no
    --user), on the host's network (chroot isolation), like ``docker exec``."""
    return _buildah("run", "--isolation", "chroot", *(flags or []), ctr, "--", *argv, check=False)


def _children(pid: int) -> list[int]:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return []
    kids: list[int] = []
    for task in tasks:
        with contextlib.suppress(FileNotFoundError):
            kids += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return kids


def _daemon_pid(pid: int) -> int | None:
    """The gateway under ``buildah run`` (qemu running its Python): the innermost process whose
    command line runs the entrypoint. ``buildah run`` itself does not pass SIGTERM on (it kills
    its child), so a stop the way ``docker stop`` does it signals this process."""
    found = None
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            cmdline = Path(f"/proc/{p}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"/opt/openhqm-gateway/bin/openhqm-gateway\0run" in cmdline:
            found = p
        todo += _children(p)
    return found


def _image_config(image: str) -> tuple[dict[str, Any], list[int]]:
    """(Docker config of the image, sizes of its layers in bytes)."""
    info = yaml.safe_load(_buildah("inspect", "--type", "image", image).stdout)
    assert info["Docker"]["architecture"] == "arm64" and info["Docker"]["os"] == "linux"
    manifest = yaml.safe_load(info["Manifest"])
    return info["Docker"]["config"], [layer["size"] for layer in manifest["layers"]]


@dataclass
class Arm64Images:
    seconds: dict[str, float]  # build time per extras
    config: dict[str, Any]  # the default image's Docker config
    layers: dict[str, list[int]]  # layer sizes in bytes per extras


@pytest.fixture(scope="module")
def arm64_images() -> Iterator[Arm64Images]:
    """Dockerfile.arm64 built with buildah for linux/arm64 (packaging/build-arm64-image.sh), on
    a Debian 12 arm64 base made from the debootstrapped root of the package check (Docker Hub's
    python image is out of reach), with the default extras and with redis,kafka. Removed again
    afterwards; the base image stays in .cache/buildah like the root tarball."""
    if os.geteuid() != 0:
        _skip_or_fail("needs root (buildah's storage, chroot, binfmt_misc)")
    if shutil.which("apt-get") is None:
        _skip_or_fail("needs a Debian host (apt-get, buildah, debootstrap)")
    env = {"ARM64_BUILDAH_ROOT": str(BUILDAH_ROOT)}
    script = "packaging/build-arm64-image.sh"
    code, out, _ = _root_script([script, "--clean"], timeout=300, env=env)  # a stopped run's leftovers
    assert code == 0, out
    try:
        images = Arm64Images({}, {}, {})
        for extras, image in IMAGES.items():
            code, out, images.seconds[extras] = _root_script([script, extras, image], timeout=900,
                                                             env=env)
            print(out[-1500:])
            assert code == 0, out[-6000:]
            assert f"==> built {image} in " in out
            config, images.layers[extras] = _image_config(image)
            if extras == "redis":
                images.config = config
        yield images
    finally:
        code, out, _ = _root_script([script, "--clean"], timeout=300, env=env)
        assert code == 0, out


@contextlib.contextmanager
def _container(image: str) -> Iterator[str]:
    """A working container of the image (``buildah from``), removed afterwards."""
    ctr = _buildah("from", "--arch", "arm64", "--pull=never", image).stdout.strip()
    try:
        yield ctr
    finally:
        _buildah("rm", ctr, check=False)


@pytest.mark.timeout(1500)  # the fixture builds both images: about 4 minutes here
def test_arm64_image_config(arm64_images: Arm64Images) -> None:
    seconds, layers, config = arm64_images.seconds, arm64_images.layers, arm64_images.config
    print(f"arm64 images built in {seconds['redis']:.0f}s (redis) and {seconds['redis,kafka']:.0f}s "
          f"(redis,kafka); base layer {layers['redis'][0] / 1e6:.1f} MB, the gateway's layer "
          f"{layers['redis'][1] / 1e6:.1f} MB (redis), {layers['redis,kafka'][1] / 1e6:.1f} MB "
          f"(redis,kafka)")
    # The base is one layer and the runtime stage adds one (buildah bud without --layers).
    assert len(layers["redis"]) == len(layers["redis,kafka"]) == 2
    assert layers["redis"][0] == layers["redis,kafka"][0]
    assert layers["redis,kafka"][1] > layers["redis"][1]  # confluent-kafka with librdkafka
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ENTRYPOINT
    assert config["Cmd"] == ["run"] and config["StopSignal"] == "SIGTERM"
    assert list(config["Volumes"]) == ["/var/lib/openhqm-gateway"]
    assert config["WorkingDir"] == "/var/lib/openhqm-gateway"
    assert config["Healthcheck"]["Test"][0] == "CMD"  # exec form
    assert "OPENHQM_CONFIG=/etc/openhqm-gateway/gateway.yaml" in config["Env"]


def test_arm64_image_extras(arm64_images: Arm64Images, tmp_path: Path) -> None:
    """EXTRAS reaches the image: librdkafka loads on arm64 in the kafka image and a kafka
    config passes config check there; the default image has no kafka and says so."""
    kafka = tmp_path / "gateway.yaml"
    kafka.write_text(yaml.safe_dump({"queue": {"type": "kafka",
                                               "kafka_bootstrap_servers": "127.0.0.1:9092"}}))
    kafka.chmod(0o644)
    # Mounted over the image's config, as docs/packaging.md tells users to.
    mount = [f"--volume={kafka}:/etc/openhqm-gateway/gateway.yaml:ro"]
    with _container(IMAGES["redis,kafka"]) as ctr:
        rdkafka = _in_container(ctr, "/opt/openhqm-gateway/bin/python", "-c",
                                "import confluent_kafka; print(confluent_kafka.libversion()[0])")
        assert rdkafka.returncode == 0, rdkafka.stdout + rdkafka.stderr
        assert re.fullmatch(r"\d+\.\d+\.\d+\s*", rdkafka.stdout), rdkafka.stdout
        checked = _in_container(ctr, *ENTRYPOINT, "config", "check", flags=mount)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "type: kafka" in checked.stdout
    with _container(IMAGES["redis"]) as ctr:
        no_kafka = _in_container(ctr, *ENTRYPOINT, "config", "check", flags=mount)
        assert no_kafka.returncode == 2, no_kafka.stdout + no_kafka.stderr
        assert "queue.type" in no_kafka.stderr and "kafka" in no_kafka.stderr


def test_arm64_image_runs_the_daemon(arm64_images: Arm64Images, tmp_path: Path,
                                     mosquitto: ServerProcess, redis: ServerProcess) -> None:
    """As the image's user under qemu: --version, config check, the daemon from mosquitto to
    Redis on the host's loopback, its HEALTHCHECK healthy while it runs and not after a stop
    with the image's STOPSIGNAL, and the store in the state volume empty at the end."""
    config = arm64_images.config
    healthcheck = config["Healthcheck"]["Test"][1:]
    with _container(IMAGES["redis"]) as ctr:
        whoami = _in_container(ctr, "sh", "-c", "id -u; id -un; uname -m")
        assert whoami.stdout.split() == ["10001", "openhqm-gateway", "aarch64"], whoami
        version = _in_container(ctr, *ENTRYPOINT, "--version")
        assert version.stdout.strip() == f"openhqm-gateway {gateway.__version__}", version

        # The container's environment, as `docker run -e` sets it: the broker and Redis on the
        # host's loopback, a free port for /healthz (the default 9108 may be taken here).
        http_port = free_port()
        stream = f"img-{uuid.uuid4().hex[:8]}"
        _buildah("config", "--env", f"OPENHQM_INGRESS__PORT={mosquitto.port}",
                 "--env", f"OPENHQM_QUEUE__REDIS_URL=redis://127.0.0.1:{redis.port}/0",
                 "--env", f"OPENHQM_QUEUE__REQUEST_QUEUE_NAME={stream}",
                 "--env", f"OPENHQM_OBSERVABILITY__LISTEN=127.0.0.1:{http_port}", ctr)
        checked = _in_container(ctr, *ENTRYPOINT, "config", "check")
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert checked.stdout.startswith("# valid configuration from /etc/openhqm-gateway/gateway.yaml")
        assert f"port: {mosquitto.port}" in checked.stdout

        log_path = tmp_path / "daemon.log"
        with open(log_path, "wb") as log:
            daemon = subprocess.Popen([*_buildah_argv(), "run", "--isolation", "chroot", ctr, "--",
                                       *ENTRYPOINT, *config["Cmd"]],
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _deliver_and_stop(daemon, log_path, ctr, healthcheck=healthcheck, mqtt_port=mosquitto.port,
                              redis_port=redis.port, stream=stream, http_port=http_port)
        finally:
            if daemon.poll() is None:
                pid = _daemon_pid(daemon.pid)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                daemon.kill()
                daemon.wait(30)


def _deliver_and_stop(daemon: subprocess.Popen[bytes], log_path: Path, ctr: str, *,
                      healthcheck: list[str], mqtt_port: int, redis_port: int, stream: str,
                      http_port: int) -> None:
    def log() -> str:
        return log_path.read_text(errors="replace")

    def ready() -> bool:
        assert daemon.poll() is None, log()
        return "ready: subscribed" in log()

    wait_until(ready, 120, "the daemon in the container")
    topic = f"sensors/{uuid.uuid4().hex[:8]}/t"
    payloads = [orjson.dumps({"n": n}) for n in range(20)]
    publisher = Publisher(mqtt_port)
    try:
        for body in payloads:
            publisher.publish(topic, body)
        publisher.wait_all_acked(len(payloads))
    finally:
        publisher.close()
    client = redis_py.Redis(host="127.0.0.1", port=redis_port)
    try:
        wait_until(lambda: client.xlen(stream) >= len(payloads), 60, "messages in Redis")
        entries = client.xrange(stream)
    finally:
        client.close()
    assert [fields[b"body"] for _, fields in entries] == payloads
    assert orjson.loads(entries[0][1][b"attributes"])["mqtt_topic"] == topic

    health = _in_container(ctr, *healthcheck)
    assert health.returncode == 0, health.stdout + health.stderr
    assert health.stdout.strip() == f"healthy: http://127.0.0.1:{http_port}/healthz"

    pid = _daemon_pid(daemon.pid)
    assert pid is not None, "no gateway process under buildah run"
    os.kill(pid, signal.SIGTERM)  # the image's STOPSIGNAL, as docker stop sends it
    assert daemon.wait(60) == 0, log()
    assert "INFO    gateway.service: stopped" in log()
    down = _in_container(ctr, *healthcheck)
    assert down.returncode == 1 and down.stdout.startswith("unhealthy:"), down
    # The store in the state volume, written by the non-root user: everything delivered.
    status = _in_container(ctr, *ENTRYPOINT, "status", "--json")
    assert status.returncode == 0, status.stderr
    uplink = orjson.loads(status.stdout)["uplinks"]["default"]
    assert uplink["depth"] == 0 and uplink["delivered_total"] == len(payloads), uplink
