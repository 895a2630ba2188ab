"""A second mosquitto playing the cloud broker: TLS with a client certificate, username and
password, an ACL, persistence. Certificates are made per test run with the openssl CLI
(a CA, a server certificate for localhost/127.0.0.1, a client certificate).
"""

from __future__ import annotations

import getpass
import socket
import ssl
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.certs import Certs, make_certs
from tests.servers import ServerProcess, free_port, require_binary, wait_until

USER, PASSWORD = "gateway", "s3cret-uplink"
READER, READER_PASSWORD = "cloud-reader", "reader-pass"


def cloud_broker(workdir: Path, certs: Certs) -> ServerProcess:
    """TLS on a free port, client certificate required, no anonymous access. The gateway
    user may write ``up/#`` and ``dlq/#`` and read them back; the reader reads everything."""
    binary = require_binary("mosquitto", "apt-get install mosquitto")
    passwd = require_binary("mosquitto_passwd", "apt-get install mosquitto")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    pw = workdir / "passwords"
    pw.write_text("")
    for user, password in ((USER, PASSWORD), (READER, READER_PASSWORD)):
        subprocess.run([passwd, "-b", str(pw), user, password], check=True, timeout=30,
                       capture_output=True)
    acl = workdir / "acl"
    acl.write_text(f"user {USER}\ntopic readwrite up/#\ntopic readwrite dlq/#\n"
                   f"topic readwrite openhqm-health/#\n\nuser {READER}\ntopic read #\n")
    for path in (pw, acl):
        path.chmod(0o644)
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        f"cafile {certs.ca}\ncertfile {certs.server_cert}\nkeyfile {certs.server_key}\n"
        "require_certificate true\n"
        # stay the test's user: as root, mosquitto would switch to the user mosquitto, which
        # cannot read the test's private tmp dir
        f"user {getpass.getuser()}\n"
        "allow_anonymous false\n"
        f"password_file {pw}\nacl_file {acl}\n"
        "persistence true\n"
        f"persistence_location {workdir}/\n"
        "autosave_interval 1\n"
        "max_queued_messages 0\nmax_inflight_messages 0\n"
        "log_type error\nlog_type warning\n")
    return ServerProcess("mosquitto-cloud", [binary, "-c", str(conf)], workdir, port,
                         lambda s: _tls_ready(s.port, certs))


def client_context(certs: Certs) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca))
    context.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    return context


def _tls_ready(port: int, certs: Certs) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as raw, \
                client_context(certs).wrap_socket(raw, server_hostname="localhost"):
            return True
    except (OSError, ssl.SSLError):
        return False


@dataclass
class CloudSubscriber:
    """A cloud-side consumer with a persistent session: (topic, payload, user properties)
    of everything it receives, in arrival order. paho reconnects it after a broker restart."""

    port: int
    certs: Certs
    topic_filter: str
    received: list[tuple[str, bytes, dict[str, str]]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _subscribed: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"cloud-sub-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.tls_set_context(client_context(self.certs))
        self.client.username_pw_set(READER, READER_PASSWORD)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        self.client.connect("127.0.0.1", self.port, clean_start=False, properties=props)
        self.client.loop_start()
        wait_until(self._subscribed.is_set, 10, "cloud subscription")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe(self.topic_filter, 1)

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        user = getattr(msg.properties, "UserProperty", None) or []
        with self._lock:
            self.received.append((msg.topic, bytes(msg.payload), dict(user)))

    def snapshot(self) -> list[tuple[str, bytes, dict[str, str]]]:
        with self._lock:
            return list(self.received)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def running_cloud(workdir: Path) -> Iterator[tuple[ServerProcess, Certs]]:
    certs = make_certs(workdir / "certs")
    server = cloud_broker(workdir / "cloud", certs)
    server.start()
    try:
        yield server, certs
    finally:
        server.stop()
