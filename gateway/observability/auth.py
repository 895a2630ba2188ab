"""The HTTP endpoint's bearer token: checked in constant time, failures counted and throttled.

Promises:

- The token is compared with ``hmac.compare_digest`` over bytes: the time taken does not tell
  how much of a guess was right.
- ``Authorization: Bearer TOKEN`` is the form for tools (curl, Prometheus'
  ``authorization.credentials_file``). ``Authorization: Basic`` with the token as the
  password (any user name) is accepted too, so that a browser can ask a technician for it
  and the status page's script, same-origin, sends it again.
- An address that failed ``limit`` times within ``window`` seconds is answered 429 for
  ``block`` seconds without its token being looked at. A success forgets the address's
  failures.
- At most ``max_tracked`` addresses are remembered, the oldest dropped first: memory stays
  bounded whatever the number of addresses a scan comes from.
- Counters: failures by reason (``missing_token``, ``wrong_token``) and requests throttled,
  exported on /metrics as ``openhqm_gateway_http_auth_failures_total`` and
  ``openhqm_gateway_http_auth_throttled_total``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

FAILURE_LIMIT = 10
FAILURE_WINDOW = 60.0
BLOCK_SECONDS = 60.0
MAX_TRACKED = 1024

Verdict = Literal["ok", "missing_token", "wrong_token", "throttled"]


@dataclass(slots=True)
class _Failures:
    since: float
    count: int = 0
    blocked_until: float = 0.0


class BearerAuth:
    def __init__(self, token: str, *, limit: int = FAILURE_LIMIT,
                 window: float = FAILURE_WINDOW, block: float = BLOCK_SECONDS,
                 max_tracked: int = MAX_TRACKED,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._token = token.encode()
        self.limit, self.window, self.block = limit, window, block
        self.max_tracked = max_tracked
        self._clock = clock
        self._failures: dict[str, _Failures] = {}
        self.counts: dict[str, int] = {"missing_token": 0, "wrong_token": 0, "throttled": 0}

    def check(self, address: str, authorization: str | None) -> Verdict:
        """The verdict on one request from ``address`` with this Authorization header."""
        now = self._clock()
        record = self._failures.get(address)
        if record is not None and now < record.blocked_until:
            self.counts["throttled"] += 1
            return "throttled"
        candidate = _credential(authorization)
        if candidate is not None and hmac.compare_digest(candidate, self._token):
            self._failures.pop(address, None)
            return "ok"
        verdict: Verdict = "missing_token" if candidate is None else "wrong_token"
        self.counts[verdict] += 1
        self._fail(address, record, now)
        return verdict

    def _fail(self, address: str, record: _Failures | None, now: float) -> None:
        if record is None or now - record.since > self.window or record.blocked_until:
            self._failures.pop(address, None)
            while len(self._failures) >= self.max_tracked:
                del self._failures[next(iter(self._failures))]
            record = self._failures[address] = _Failures(since=now)
        record.count += 1
        if record.count >= self.limit:
            record.blocked_until = now + self.block

    @property
    def tracked(self) -> int:
        """How many addresses have failures remembered."""
        return len(self._failures)

    def metric_lines(self) -> list[str]:
        full = "openhqm_gateway_http_auth_failures_total"
        out = [f"# HELP {full} requests refused for a missing or wrong token, by reason",
               f"# TYPE {full} counter"]
        out += [f'{full}{{reason="{r}"}} {self.counts[r]}' for r in ("missing_token", "wrong_token")]
        full = "openhqm_gateway_http_auth_throttled_total"
        out += [f"# HELP {full} requests answered 429 after too many failures from an address",
                f"# TYPE {full} counter", f"{full} {self.counts['throttled']}"]
        return out


def _credential(header: str | None) -> bytes | None:
    """The token a request offers (Bearer, or Basic's password); None when it offers none."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return value.encode("latin-1", "replace")
    if scheme.lower() == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return b""
        return decoded.partition(b":")[2]
    return b""  # some other scheme: an offer, and a wrong one
