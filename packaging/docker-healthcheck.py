"""The container's HEALTHCHECK: GET /healthz on the gateway's observability endpoint.

The address comes from the gateway's own configuration (file + OPENHQM_* environment), so a
changed ``observability.listen`` is followed. Exit 0 when the endpoint answers 200, else 1.
With ``observability.tls_cert_file`` the check speaks HTTPS without verifying the certificate:
it asks its own process on this host for /healthz (open without the token), and the
certificate's names need not include the address it dials.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request

from gateway.config import DEFAULT_CONFIG_PATH, ENV_CONFIG_PATH, load_config
from gateway.errors import ConfigError


def main() -> int:
    path = os.environ.get(ENV_CONFIG_PATH) or DEFAULT_CONFIG_PATH
    try:
        obs = load_config(None if path == "none" else path).observability
    except ConfigError as exc:
        print(f"unhealthy: invalid configuration: {exc}")
        return 1
    listen = obs.listen
    if not listen:
        print("unhealthy: observability.listen is off, so /healthz cannot be checked")
        return 1
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    tls = obs.tls_cert_file is not None
    url = f"{'https' if tls else 'http'}://{host}:{port}/healthz"
    context = ssl._create_unverified_context() if tls else None
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as resp:
            ok = resp.status == 200
    except (OSError, urllib.error.URLError) as exc:
        print(f"unhealthy: {url}: {exc}")
        return 1
    print(f"{'healthy' if ok else 'unhealthy'}: {url}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
