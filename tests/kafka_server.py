"""A real single-node Apache Kafka 3.9 broker (KRaft) for tests and benchmarks.

The broker runs from the official ``org.apache.kafka:kafka_2.13`` jars that
``scripts/kafka/fetch-jars.sh`` puts in ``.cache/kafka-jars`` (or ``$KAFKA_JARS_DIR``); no
Docker, no distribution tarball. ``kafka_server()`` writes a ``server.properties`` for one
combined broker+controller node on free loopback ports, formats its storage with
``kafka.tools.StorageTool`` (a process of its own: the tool exits the JVM) and returns a
ServerProcess. Ready means the broker logged "Kafka Server started" *in this run* and
answers a metadata request, not merely a TCP connect. ``restart()`` keeps the ports and
the data directory, so a restarted broker has every acknowledged record.

Missing jars or java skip the test locally and fail it when CI=true, like require_binary.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import socket
import struct
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.certs import Certs, make_certs
from tests.servers import IN_CI, ServerProcess, SharedServer, free_port, wait_until

REPO = Path(__file__).resolve().parent.parent
DEFAULT_JARS_DIR = REPO / ".cache" / "kafka-jars"
STARTED_MESSAGE = b"Kafka Server started"
HEAP = os.environ.get("KAFKA_TEST_HEAP", "-Xmx512m")

_LOG4J = """\
log4j.rootLogger=WARN, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.server.KafkaRaftServer=INFO
log4j.logger.kafka.Kafka=INFO
log4j.logger.org.apache.kafka.storage.internals.log.LogLoader=INFO
"""


def jars_dir() -> Path:
    return Path(os.environ.get("KAFKA_JARS_DIR") or DEFAULT_JARS_DIR)


def missing_requirements() -> str | None:
    """Why a broker cannot be started here, or None when it can."""
    if shutil.which("java") is None:
        return "java is not installed (apt-get install openjdk-17-jre-headless)"
    if not list(jars_dir().glob("kafka_2.13-*.jar")):
        return f"no Kafka jars in {jars_dir()} (run: bash scripts/kafka/fetch-jars.sh)"
    return None


def require_kafka() -> None:
    """Skip locally, fail in CI, when the broker cannot be started."""
    why = missing_requirements()
    if why is not None:
        if IN_CI:
            pytest.fail(f"CI must run the Kafka integration tests: {why}")
        pytest.skip(why)


def new_cluster_id() -> str:
    """What ``kafka-storage random-uuid`` prints: 16 random bytes, base64url, no padding."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def _java(main: str, *args: str, log4j: Path) -> list[str]:
    classpath = str(jars_dir() / "*")
    return ["java", HEAP, "-Xms128m", "-XX:+UseSerialGC", "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{log4j}", "-cp", classpath, main, *args]


@dataclass
class KafkaBroker(ServerProcess):
    """A ServerProcess whose readiness looks only at the log written since this start."""

    controller_port: int = 0
    sasl_port: int = 0
    #: SASL_SSL listener (PLAIN), its certificate issued by ``certs.ca`` for 127.0.0.1
    ssl_port: int = 0
    certs: Certs | None = None
    data_dir: Path = field(default_factory=Path)
    _log_offset: int = 0

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> None:
        self.spawn()
        self.wait_started(timeout)

    def spawn(self) -> None:
        """Launch the JVM without waiting. Call it from the main thread: a broker launched
        from a worker thread (asyncio.to_thread) dies when that thread ends."""
        try:
            self._log_offset = self.log_path.stat().st_size
        except FileNotFoundError:
            self._log_offset = 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, cwd=self.workdir, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def wait_started(self, timeout: float = 90.0) -> None:
        """Block until ready (safe to run in a worker thread)."""
        try:
            wait_until(lambda: self._alive() and self.ready(self), timeout, self.name)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"{self.name} did not start; log:\n{self.log_text()}") from None

    def started_in_log(self) -> bool:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self._log_offset)
                return STARTED_MESSAGE in fh.read()
        except OSError:
            return False


def kafka_server(workdir: Path, port: int | None = None, *,
                 extra_properties: str = "") -> KafkaBroker:
    """A formatted, not yet started, single-node KRaft broker under ``workdir``.

    Three client listeners: PLAINTEXT on ``port``, SASL_PLAINTEXT on ``sasl_port`` (PLAIN,
    SCRAM-SHA-256 and SCRAM-SHA-512 for user SASL_USER / SASL_PASSWORD) and SASL_SSL on
    ``ssl_port`` (PLAIN, TLS with a certificate made for this run, ``certs.ca`` its CA)."""
    require_kafka()
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    taken = {port}
    controller_port, sasl_port = _another_port(taken), _another_port(taken)
    ssl_port = _another_port(taken)
    certs = make_certs(workdir / "certs")
    keystore = workdir / "certs" / "server-keystore.pem"  # PKCS#8 key, then the certificate
    keystore.write_text(certs.server_key.read_text() + certs.server_cert.read_text())
    data_dir = workdir / "data"
    log4j = workdir / "log4j.properties"
    log4j.write_text(_LOG4J)
    props = workdir / "server.properties"
    props.write_text(_server_properties(port, sasl_port, ssl_port, controller_port,
                                        data_dir=data_dir, keystore=keystore)
                     + extra_properties)
    _format_storage(props, log4j, workdir)
    argv = _java("kafka.Kafka", str(props), log4j=log4j)
    return KafkaBroker("kafka", argv, workdir, port, _ready, controller_port=controller_port,
                       sasl_port=sasl_port, ssl_port=ssl_port, certs=certs, data_dir=data_dir)


def _another_port(taken: set[int]) -> int:
    port = free_port()
    while port in taken:
        port = free_port()
    taken.add(port)
    return port


SASL_USER = "gateway"
SASL_PASSWORD = "gateway-secret"


def _server_properties(port: int, sasl_port: int, ssl_port: int, controller_port: int, *,
                       data_dir: Path, keystore: Path) -> str:
    jaas = "org.apache.kafka.common.security"
    return f"""\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},SASL_PLAINTEXT://127.0.0.1:{sasl_port},\
SASL_SSL://127.0.0.1:{ssl_port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port},SASL_PLAINTEXT://127.0.0.1:{sasl_port},\
SASL_SSL://127.0.0.1:{ssl_port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,\
SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT
listener.name.sasl_ssl.sasl.enabled.mechanisms=PLAIN
listener.name.sasl_ssl.plain.sasl.jaas.config={jaas}.plain.PlainLoginModule required \
user_{SASL_USER}="{SASL_PASSWORD}";
listener.name.sasl_ssl.ssl.keystore.type=PEM
listener.name.sasl_ssl.ssl.keystore.location={keystore}
listener.name.sasl_ssl.ssl.client.auth=none
sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512
listener.name.sasl_plaintext.plain.sasl.jaas.config={jaas}.plain.PlainLoginModule required \
user_{SASL_USER}="{SASL_PASSWORD}";
listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config=\
{jaas}.scram.ScramLoginModule required;
listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=\
{jaas}.scram.ScramLoginModule required;
log.dirs={data_dir}
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=2
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
delete.topic.enable=true
num.network.threads=2
num.io.threads=4
log.flush.interval.messages=9223372036854775807
"""


def _format_storage(props: Path, log4j: Path, workdir: Path) -> None:
    if (workdir / "data" / "meta.properties").exists():
        return
    scram = [arg for mech in ("SCRAM-SHA-256", "SCRAM-SHA-512") for arg in
             ("--add-scram", f"{mech}=[name={SASL_USER},password={SASL_PASSWORD}]")]
    # "--cluster-id=ID": a base64url id may start with "-", which argparse takes for an option
    argv = _java("kafka.tools.StorageTool", "format", f"--cluster-id={new_cluster_id()}",
                 "-c", str(props),
                 "--ignore-formatted", *scram, log4j=log4j)
    done = subprocess.run(argv, cwd=workdir, capture_output=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError("kafka StorageTool format failed:\n"
                           + (done.stdout + done.stderr).decode(errors="replace")[-4000:])


def _ready(server: ServerProcess) -> bool:
    assert isinstance(server, KafkaBroker)
    return server.started_in_log() and metadata_ok(server.port)


def metadata_ok(port: int) -> bool:
    """One Metadata v0 request (all topics) answered with at least one broker."""
    # header: api_key 3 (Metadata), version 0, correlation id 1, client id; body: no topics
    request = struct.pack(">hhih", 3, 0, 1, 5) + b"probe" + struct.pack(">i", 0)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(struct.pack(">i", len(request)) + request)
            header = _recv_exact(s, 4)
            body = _recv_exact(s, struct.unpack(">i", header)[0])
    except OSError:
        return False
    correlation_id, broker_count = struct.unpack(">ii", body[:8])
    return correlation_id == 1 and broker_count >= 1


def _recv_exact(s: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = s.recv(n - len(chunks))
        if not chunk:
            raise ConnectionError("closed")
        chunks += chunk
    return bytes(chunks)


_SHARED: SharedServer[KafkaBroker] = SharedServer(kafka_server, "kafka")


def shared_broker(tmp_path_factory: pytest.TempPathFactory) -> contextlib.AbstractContextManager[KafkaBroker]:
    """One broker per test session, however many fixtures (integration, contract, benchmark
    helpers) ask for it; the last user to leave stops it."""
    return _SHARED.use(tmp_path_factory)
