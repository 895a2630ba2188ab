"""The protected observability endpoint, checked with real HTTP clients.

The HTTP server object runs in this test's event loop on 127.0.0.1 with a token configured
(loopback alone does not require one); requests go through http.client/urllib from a thread.
One test runs the whole daemon over HTTPS with a certificate made by ``openssl req -x509``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from gateway.config import Config, load_config
from gateway.observability.auth import FAILURE_LIMIT
from gateway.observability.http import ObservabilityServer, Snapshot
from tests.gateway_process import GatewayProcess, Publisher, gateway_config
from tests.servers import ServerProcess, free_port, wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TOKEN = "c0ffee" * 8
PROTECTED = ("/metrics", "/readyz", "/status.json", "/")

Reply = tuple[int, dict[str, list[str]], str]


def make_cert(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "endpoint.crt", tmp_path / "endpoint.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def config(tmp_path: Path, extra: str = "") -> Config:
    (tmp_path / "token").write_text(TOKEN + "\n")
    path = tmp_path / "gateway.yaml"
    path.write_text(f'observability:\n  listen: "127.0.0.1:0"\n'
                    f"  token: ${{file:{tmp_path / 'token'}}}\n{extra}")
    return load_config(str(path), {})


async def snapshot() -> Snapshot:
    now = time.time()
    return Snapshot(taken_at=now, started_at=now - 5, ingress_connected=True, store_ok=True,
                    store_messages=0, store_bytes=0, store_file_bytes=0, commits=0,
                    commit_seconds_total=0.0, uplinks=[])


Serve = Callable[[Config], Awaitable[ObservabilityServer]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    tasks: list[asyncio.Task[None]] = []

    async def start(cfg: Config) -> ObservabilityServer:
        server = ObservabilityServer(cfg.observability, snapshot)
        tasks.append(asyncio.create_task(server.run()))
        async with asyncio.timeout(5):
            await server.listening.wait()
        return server

    yield start
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def request(port: int, path: str, authorization: str | None = None,
            context: ssl.SSLContext | None = None) -> Reply:
    """One GET with http.client, as a tool would send it."""
    conn = (http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=context)
            if context else http.client.HTTPConnection("127.0.0.1", port, timeout=5))
    try:
        conn.request("GET", path, headers={"Authorization": authorization} if authorization else {})
        resp = conn.getresponse()
        headers: dict[str, list[str]] = {}
        for name, value in resp.getheaders():
            headers.setdefault(name.lower(), []).append(value)
        return resp.status, headers, resp.read().decode()
    finally:
        conn.close()


async def get(port: int, path: str, authorization: str | None = None,
              context: ssl.SSLContext | None = None) -> Reply:
    return await asyncio.to_thread(request, port, path, authorization, context)


async def test_token_required_everywhere_but_healthz(tmp_path: Path, serve: Serve) -> None:
    server = await serve(config(tmp_path))
    port = server.bound_port
    status, _, body = await get(port, "/healthz")
    assert (status, body) == (200, "ok\n")
    for path in PROTECTED:
        status, headers, _ = await get(port, path)
        assert status == 401, path
        assert any(v.startswith("Bearer") for v in headers["www-authenticate"]), headers
        status, _, _ = await get(port, path, f"Bearer {TOKEN[:-1]}x")
        assert status == 401, path
        status, _, body = await get(port, path, f"Bearer {TOKEN}")
        assert status == 200, (path, body)
    basic = base64.b64encode(f"technician:{TOKEN}".encode()).decode()
    status, _, body = await get(port, "/readyz", f"Basic {basic}")
    assert (status, body) == (200, "ready\n")
    status, _, metrics = await get(port, "/metrics", f"Bearer {TOKEN}")
    assert 'openhqm_gateway_http_auth_failures_total{reason="missing_token"} 4' in metrics
    assert 'openhqm_gateway_http_auth_failures_total{reason="wrong_token"} 4' in metrics
    assert "openhqm_gateway_http_auth_throttled_total 0" in metrics


async def test_failures_from_one_address_are_throttled(tmp_path: Path, serve: Serve) -> None:
    server = await serve(config(tmp_path))
    port = server.bound_port
    for n in range(FAILURE_LIMIT):
        status, _, _ = await get(port, "/metrics", f"Bearer guess-{n}")
        assert status == 401, n
    # now refused without looking at the token, the right one included
    status, headers, _ = await get(port, "/metrics", f"Bearer {TOKEN}")
    assert status == 429 and int(headers["retry-after"][0]) > 0
    assert (await get(port, "/status.json"))[0] == 429
    assert (await get(port, "/healthz"))[0] == 200  # liveness probes are never throttled
    assert server.auth is not None
    assert server.auth.counts == {"missing_token": 0, "wrong_token": FAILURE_LIMIT,
                                  "throttled": 2}


def https_get(url: str, context: ssl.SSLContext, token: str | None) -> tuple[int, str]:
    """Status and body of a GET with urllib (a real HTTP client), the token as Bearer."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5, context=context) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


async def test_tls_with_a_real_client(tmp_path: Path, serve: Serve) -> None:
    cert, key = make_cert(tmp_path)
    server = await serve(config(tmp_path, f"  tls_cert_file: {cert}\n  tls_key_file: {key}\n"))
    port = server.bound_port
    trusting = ssl.create_default_context(cafile=str(cert))  # verifies chain and 127.0.0.1

    def urlopen(path: str, token: str | None) -> tuple[int, str]:
        return https_get(f"https://127.0.0.1:{port}{path}", trusting, token)

    assert await asyncio.to_thread(urlopen, "/healthz", None) == (200, "ok\n")
    assert (await asyncio.to_thread(urlopen, "/metrics", None))[0] == 401
    assert (await asyncio.to_thread(urlopen, "/metrics", "wrong-token-wrong-token"))[0] == 401
    status, body = await asyncio.to_thread(urlopen, "/metrics", TOKEN)
    assert status == 200 and "openhqm_gateway_store_messages 0" in body
    # plain HTTP on the TLS port gets no answer, and a client that does not trust the
    # certificate refuses the server
    with pytest.raises((http.client.HTTPException, OSError)):
        await get(port, "/healthz")
    with pytest.raises(ssl.SSLCertVerificationError):
        await get(port, "/healthz", context=ssl.create_default_context())


def test_daemon_over_https_with_a_token(tmp_path: Path, mosquitto: ServerProcess,
                                        redis: ServerProcess) -> None:
    cert, key = make_cert(tmp_path)
    (tmp_path / "token").write_text(TOKEN)
    root = f"prot/{uuid.uuid4().hex[:8]}"
    queue = {"type": "redis", "redis_url": f"redis://127.0.0.1:{redis.port}/0",
             "request_queue_name": f"{root}-stream"}
    port = free_port()  # the container's healthcheck reads the port from the config
    path = gateway_config(tmp_path, mosquitto.port, root, queue, observability={
        "listen": f"127.0.0.1:{port}", "token": f"${{file:{tmp_path / 'token'}}}", "tls_cert_file": str(cert),
        "tls_key_file": str(key)})
    gw = GatewayProcess(path, tmp_path)
    gw.start()
    base = gw.http_url()
    assert base == f"https://127.0.0.1:{port}"
    trusting = ssl.create_default_context(cafile=str(cert))

    def fetch(path: str, token: str | None = None) -> tuple[int, str]:
        return https_get(base + path, trusting, token)

    assert fetch("/healthz") == (200, "ok\n")
    assert fetch("/metrics")[0] == 401
    assert fetch("/", "not-the-token-at-all")[0] == 401
    wait_until(lambda: fetch("/readyz", TOKEN)[0] == 200, 10, "ready")
    pub = Publisher(mosquitto.port)
    for n in range(20):
        pub.publish(f"{root}/t", b"%d" % n)
    pub.wait_all_acked(20)
    wait_until(lambda: 'openhqm_gateway_uplinked_total{uplink="default"} 20'
               in fetch("/metrics", TOKEN)[1], 20, "20 uplinked")
    status, page = fetch("/", TOKEN)
    assert status == 200 and "OpenHQM Edge Gateway" in page
    metrics = fetch("/metrics", TOKEN)[1]
    assert 'openhqm_gateway_http_auth_failures_total{reason="missing_token"} 1' in metrics
    assert 'openhqm_gateway_http_auth_failures_total{reason="wrong_token"} 1' in metrics
    # the container's HEALTHCHECK follows the config to HTTPS, and /healthz needs no token
    check = subprocess.run([sys.executable, str(REPO / "packaging" / "docker-healthcheck.py")],
                           env={"OPENHQM_CONFIG": str(path), "PYTHONPATH": str(REPO),
                                "PATH": os.environ.get("PATH", "")},
                           capture_output=True, text=True, timeout=30, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == f"healthy: {base}/healthz"
    assert gw.stop() == 0
    pub.close()
