"""The Debian package: built with packaging/build-deb.sh, its contents checked with dpkg-deb, and
the arm64 build installed into a fresh Debian arm64 root under qemu-user emulation
(packaging/check-arm64.sh), where ``--version`` and ``config check`` must run.

Both build from PyPI (the target's wheels). The arm64 check needs root (debootstrap, chroot,
mounts) and binfmt_misc: without them it skips locally and fails when CI=true.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

import gateway
from tests.gateway_process import GatewayProcess, gateway_config
from tests.servers import IN_CI, ServerProcess, free_port, require_binary

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
