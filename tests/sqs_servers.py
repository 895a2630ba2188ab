"""SQS-compatible servers for tests: moto in server mode and ElasticMQ, as child processes.

- ``moto_sqs_server``: ``python -m moto.server`` (the ``test`` extra brings moto[server]) on
  a free loopback port. Its state lives in memory: a restart loses every queue.
- ``elasticmq_server``: ElasticMQ (org.elasticmq.server.Main) from the jars that
  ``scripts/provision/sqs.sh`` puts in ``.cache/elasticmq-jars`` (or ``$ELASTICMQ_JARS_DIR``),
  with a generated config binding 127.0.0.1 on a free port, SQS's strict limits, and,
  with ``persistent=True``, queues and messages stored under the work directory so a
  restart keeps them. ``restart()`` keeps the port.

Ready means the server answered an SQS request (ListQueues), not merely a TCP connect.
Missing jars, java or moto skip the test locally and fail it when CI=true.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import IN_CI, ServerProcess, free_port

REPO = Path(__file__).resolve().parent.parent
DEFAULT_JARS_DIR = REPO / ".cache" / "elasticmq-jars"
HEAP = os.environ.get("ELASTICMQ_TEST_HEAP", "-Xmx256m")

#: dummy credentials for the test environment (set with monkeypatch, never in a config file)
DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
_CLEARED_AWS_ENV = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
                    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SQS", "AWS_ROLE_ARN",
                    "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")


def use_dummy_aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _CLEARED_AWS_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in DUMMY_AWS_ENV.items():
        monkeypatch.setenv(name, value)


def _skip_or_fail(why: str) -> None:
    if IN_CI:
        pytest.fail(f"CI must run the SQS integration tests: {why}")
    pytest.skip(why)


def _sqs_ready(port: int) -> bool:
    """A JSON-protocol ListQueues answered with 200 (signature not checked by either server)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/", data=b"{}", method="POST",
        headers={"Content-Type": "application/x-amz-json-1.0",
                 "X-Amz-Target": "AmazonSQS.ListQueues",
                 "Authorization": "AWS4-HMAC-SHA256 Credential=testing/20250101/us-east-1/sqs/"
                                  "aws4_request, SignedHeaders=host, Signature=0"})
    try:
        with urllib.request.urlopen(request, timeout=1.0) as reply:
            json.loads(reply.read() or b"{}")
            return bool(reply.status == 200)
    except (OSError, ValueError, urllib.error.URLError):
        return False


def moto_sqs_server(workdir: Path, port: int | None = None) -> ServerProcess:
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        _skip_or_fail("moto[server] is not installed (pip install 'openhqm-gateway[test]')")
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    return ServerProcess("moto-sqs", argv, workdir, port, lambda s: _sqs_ready(s.port))


def jars_dir() -> Path:
    return Path(os.environ.get("ELASTICMQ_JARS_DIR") or DEFAULT_JARS_DIR)


def require_elasticmq() -> None:
    if shutil.which("java") is None:
        _skip_or_fail("java is not installed (apt-get install openjdk-17-jre-headless)")
    if not list(jars_dir().glob("elasticmq-server_2.13-*.jar")):
        _skip_or_fail(f"no ElasticMQ jars in {jars_dir()} (run: bash scripts/provision/sqs.sh)")


def elasticmq_server(workdir: Path, port: int | None = None, *,
                     persistent: bool = False) -> ServerProcess:
    require_elasticmq()
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    storage = ""
    if persistent:
        storage = (f'messages-storage {{ enabled = true, uri = "jdbc:h2:{workdir}/messages" }}\n'
                   f'queues-storage {{ enabled = true, path = "{workdir}/queues.conf" }}\n')
    conf = workdir / "elasticmq.conf"
    conf.write_text(
        'include classpath("application.conf")\n'
        f'node-address {{ protocol = http, host = "127.0.0.1", port = {port}, '
        'context-path = "" }\n'
        f'rest-sqs {{ enabled = true, bind-port = {port}, bind-hostname = "127.0.0.1", '
        "sqs-limits = strict }\n"
        "rest-stats { enabled = false }\n" + storage)
    argv = ["java", HEAP, "-Xms64m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true", f"-Dconfig.file={conf}",
            "-cp", str(jars_dir() / "*"), "org.elasticmq.server.Main"]
    return ServerProcess("elasticmq", argv, workdir, port, lambda s: _sqs_ready(s.port))


@contextlib.contextmanager
def started(server: ServerProcess, timeout: float = 30.0) -> Iterator[ServerProcess]:
    server.start(timeout)
    try:
        yield server
    finally:
        server.stop()


def endpoint(server: ServerProcess) -> str:
    return f"http://127.0.0.1:{server.port}"
