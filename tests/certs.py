"""Certificates made per test run with the openssl CLI: a CA, a server certificate for
localhost / 127.0.0.1 and a client certificate (EC P-256, PKCS#8 keys, valid two days)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.servers import require_binary


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([require_binary("openssl", "apt-get install openssl"), *args], cwd=cwd,
                   check=True, capture_output=True, timeout=30)


def make_certs(workdir: Path, ca_name: str = "openhqm-test-ca") -> Certs:
    workdir.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", f"/CN={ca_name}", cwd=workdir)
    for name, ext in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                 "extendedKeyUsage=serverAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")):
        (workdir / f"{name}.ext").write_text(ext)
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=openhqm-test-{name}", cwd=workdir)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
                 "-extfile", f"{name}.ext", cwd=workdir)
    for path in workdir.iterdir():
        path.chmod(0o644)  # servers may run as their own user
    return Certs(workdir / "ca.crt", workdir / "server.crt", workdir / "server.key",
                 workdir / "client.crt", workdir / "client.key")
