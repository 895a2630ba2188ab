"""Dockerfile.arm64's invariants, checked as text. Building and running it for real (buildah on
a debootstrapped base under qemu) is tests/integration/test_package.py; this says what holds
whatever the base and the builder."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from gateway.config import DEFAULT_CONFIG_PATH, ENV_CONFIG_PATH, ObservabilityConfig

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile.arm64"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), " ".join(rest.split())))
    return result


def args_of(name: str) -> list[str]:
    return [rest for word, rest in instructions() if word == name]


def test_multi_stage_arm64_slim_bookworm() -> None:
    froms = args_of("FROM")
    assert len(froms) >= 2
    assert all(f.startswith("--platform=linux/arm64 ${PYTHON_IMAGE}") for f in froms), froms
    # The base is a build argument; its default stays the official image (Docker, buildx).
    assert "PYTHON_IMAGE=python:3.11-slim-bookworm" in args_of("ARG")
    assert instructions()[0] == ("ARG", "PYTHON_IMAGE=python:3.11-slim-bookworm")
    assert froms[0].endswith(" AS builder")
    # The extras are a build argument (default redis) and reach the builder's pip and the
    # runtime's install.
    assert args_of("ARG").count("EXTRAS=redis") == 2
    runs = " ".join(args_of("RUN"))
    assert ('/build/bin/python -m pip wheel --no-cache-dir --disable-pip-version-check '
            '--wheel-dir /wheels --only-binary=:all: -c scripts/constraints.txt ".[${EXTRAS}]"') in runs
    assert '--no-index --find-links /wheels "openhqm-gateway[${EXTRAS}]"' in runs


def test_the_base_needs_only_python3_with_venv() -> None:
    """What the CI base (Debian's python3 + python3-venv) and the official image both have:
    no `python` or `pip` command of the base, no compiler, no apt-get (wheels only)."""
    runs = args_of("RUN")
    for run in runs:
        for command in run.split("&&"):
            words = [w for w in command.split() if not w.startswith("--mount=")]
            assert words[0] not in ("python", "pip", "pip3"), run
            assert words[0] != "apt-get", run
    assert "build-essential" not in " ".join(runs)
    assert sum("python3 -m venv" in run for run in runs) == 2  # /build and the runtime's venv


def test_extras_come_after_the_steps_that_do_not_need_them() -> None:
    """ARG EXTRAS after the venvs: a build with other extras reuses those layers from the cache
    (a changed build argument invalidates every RUN after its ARG)."""
    steps = instructions()
    for stage_start in (i for i, (word, _) in enumerate(steps) if word == "FROM"):
        stage = steps[stage_start + 1:]
        stage = stage[:next((i for i, (w, _) in enumerate(stage) if w == "FROM"), len(stage))]
        arg = stage.index(("ARG", "EXTRAS=redis"))
        assert any("python3 -m venv" in rest for word, rest in stage[:arg] if word == "RUN")
        assert all("${EXTRAS}" not in rest for _, rest in stage[:arg])


def test_runtime_is_non_root_with_state_volume_and_config() -> None:
    steps = instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    runtime = steps[last_from:]
    users = [rest for word, rest in runtime if word == "USER"]
    assert users, "the runtime stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in ("0", "root")
    # Nothing runs as root after USER (a later RUN would be root only if USER came back).
    after = runtime[[w for w, _ in runtime].index("USER"):]
    assert not any(word == "RUN" for word, _ in after)
    assert re.search(rf"useradd .*--uid {user} ", " ".join(r for w, r in runtime if w == "RUN"))
    assert args_of("VOLUME") == ["/var/lib/openhqm-gateway"]
    env = " ".join(args_of("ENV"))
    assert f"{ENV_CONFIG_PATH}={DEFAULT_CONFIG_PATH}" in env
    assert f"config/gateway.yaml {DEFAULT_CONFIG_PATH}" in " ".join(args_of("COPY"))
    unit = (REPO / "systemd" / "openhqm-gateway.service").read_text()
    assert "StateDirectory=openhqm-gateway" in unit  # the same directory as the package uses
    assert args_of("ENTRYPOINT") == ['["/opt/openhqm-gateway/bin/openhqm-gateway"]']
    assert args_of("CMD") == ['["run"]']


def test_healthcheck_calls_the_health_route_with_python() -> None:
    (check,) = args_of("HEALTHCHECK")
    command = check.split(" CMD ", 1)[1]
    argv = [a.strip('[]",') for a in command.split(", ")]
    assert argv == ["/opt/openhqm-gateway/bin/python", "/opt/openhqm-gateway/healthcheck.py"]
    assert "COPY --chmod=0644 packaging/docker-healthcheck.py /opt/openhqm-gateway/healthcheck.py" \
        in [f"COPY {c}" for c in args_of("COPY")]
    script = (REPO / "packaging" / "docker-healthcheck.py").read_text()
    assert '/healthz"' in script
    http = (REPO / "gateway" / "observability" / "http.py").read_text()
    assert 'path == "/healthz"' in http  # the route the server answers


def test_expose_only_when_listening_beyond_loopback() -> None:
    listen = ObservabilityConfig().listen
    host, _, port = listen.rpartition(":")
    if host.startswith("127.") or host in ("localhost", "[::1]"):
        # Loopback by default: the healthcheck runs inside the container, nothing to publish.
        assert args_of("EXPOSE") == []
    else:
        assert port in " ".join(args_of("EXPOSE"))


def test_dockerignore_admits_every_copied_file() -> None:
    allowed = {line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    assert "*" in (REPO / ".dockerignore").read_text().splitlines()
    for copy in args_of("COPY"):
        words = [w for w in shlex.split(copy) if not w.startswith("--")]
        for source in words[:-1]:
            assert source in allowed, f"{source} is excluded by .dockerignore"
            assert (REPO / source).exists(), source
