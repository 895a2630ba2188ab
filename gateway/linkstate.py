"""The uplink's state as an operator reads it: one log line per change, not per failure.

The forwarder reports what happens (``online``, ``unavailable``, ``defect`` ...); this
module keeps ``ForwarderStats.state`` (metrics, /readyz, the status page) and decides what
reaches the log:

- the first connection: INFO ``uplink kafka connected to 10.0.0.5:9092``;
- a first connection not made within ``CONNECT_NOTICE`` seconds: one WARNING naming the
  address it tried (a typo in the config shows at once, not after the client's timeouts);
- an outage: one WARNING when it starts (``uplink kafka unavailable: <reason>;
  buffering locally``) and one when it ends (``uplink kafka back after 12.3s``). Every
  failure in between is DEBUG, and so is client-library detail (observability/logs.py
  demotes the SDKs' own loggers), so an outage of any length is two lines in the journal;
- a defect: an exception that says the uplink's code is wrong (TypeError, AttributeError
  ...; ``PROGRAMMING_ERRORS``), typically in a custom handler. ERROR with the traceback,
  once per distinct error; the state is ``defective`` and /readyz says why until a batch
  goes through. It is never reported as "unavailable": nothing is wrong with the network.
  The messages stay buffered (no attempt is counted against them); the forwarder retries
  with backoff, so a fixed handler (after a restart) or a transient cause delivers them.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

log = logging.getLogger("gateway.forwarder")

#: seconds after which a connection attempt that has not finished is reported
CONNECT_NOTICE = 5.0

#: exceptions that mean "the code is wrong", not "the network is down"
PROGRAMMING_ERRORS: tuple[type[BaseException], ...] = (
    TypeError, AttributeError, NameError, LookupError, AssertionError, NotImplementedError,
    ImportError, SyntaxError, ArithmeticError)


def is_programming_error(exc: BaseException) -> bool:
    return isinstance(exc, PROGRAMMING_ERRORS)


def _reason(exc: BaseException) -> str:
    """The error's text without the ``[backend]`` prefix the log line already names."""
    text = str(exc) or type(exc).__name__
    backend = getattr(exc, "backend", "")
    prefix = f"[{backend}] " if isinstance(backend, str) and backend else ""
    return text.removeprefix(prefix) if prefix else text


class Stats(Protocol):
    state: str
    last_error: str
    defect: str


class UplinkState:
    def __init__(self, name: str, target: str, stats: Stats) -> None:
        self.name = name
        self.target = target
        self.stats = stats
        self._extra = {"uplink": name}
        self._connected_once = False
        #: when the current outage (or defect) was first reported; None while online
        self._down_since: float | None = None
        self._defects_logged: set[str] = set()

    @property
    def _where(self) -> str:
        return f" ({self.target})" if self.target else ""

    def connecting(self) -> None:
        if self.stats.state != "defective":
            self.stats.state = "connecting"

    def connected(self) -> None:
        """connect() made its round trip. A defect is cleared only by a delivered batch: the
        code that failed is publish's, which a connection does not exercise."""
        if self.stats.state != "defective":
            self.online()

    def online(self) -> None:
        """A batch went through (or a connection, see ``connected``)."""
        self.stats.state = "online"
        self.stats.defect = ""
        if not self._connected_once:
            self._connected_once = True
            if self._down_since is None:
                log.info("uplink %s connected%s", self.name, self._where, extra=self._extra)
        if self._down_since is not None:
            log.warning("uplink %s back after %.1fs%s", self.name,
                        time.monotonic() - self._down_since, self._where, extra=self._extra)
            self._down_since = None

    def slow_connect(self, seconds: float) -> None:
        """A connection attempt is still running after ``seconds``."""
        if self._down_since is not None:
            return  # the outage was reported; retries are detail
        self._down_since = time.monotonic() - seconds
        what = "has not connected" if not self._connected_once else "has not reconnected"
        log.warning("uplink %s %s within %.0fs (trying %s); buffering locally, still trying",
                    self.name, what, seconds, self.target or "its configured address",
                    extra=self._extra)

    def unavailable(self, exc: BaseException) -> None:
        text = _reason(exc)
        self.stats.last_error = text
        if self.stats.state != "defective":
            self.stats.state = "backing_off"
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("uplink %s unavailable%s: %s; buffering locally", self.name,
                        self._where, text, extra=self._extra)
        else:
            log.debug("uplink %s still unavailable: %s", self.name, text, extra=self._extra)

    def untranslated(self, exc: BaseException) -> None:
        """An exception the adapter should have translated (gateway/errors.py) and did not:
        treated as unavailable; its traceback is logged once, for whoever fixes the adapter."""
        text = f"{type(exc).__name__}: {exc}"
        if text not in self._defects_logged:
            self._defects_logged.add(text)
            log.error("uplink %s raised an untranslated %s; treating it as unavailable",
                      self.name, text, exc_info=exc, extra=self._extra)
        self.unavailable(exc)

    def defect(self, exc: BaseException) -> None:
        text = f"{type(exc).__name__}: {exc}"
        self.stats.state = "defective"
        self.stats.defect = self.stats.last_error = text
        if self._down_since is None:
            self._down_since = time.monotonic()
        if text in self._defects_logged:
            log.debug("uplink %s: defect again: %s", self.name, text, extra=self._extra)
            return
        self._defects_logged.add(text)
        log.error("uplink %s has a defect: %s. This is a bug in the uplink's code (a custom "
                  "handler?), not an outage: messages stay buffered and are retried with "
                  "backoff; fix it and restart", self.name, text, exc_info=exc,
                  extra=self._extra)
