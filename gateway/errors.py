"""The gateway's error tree. Every error raised across a module boundary is one of these.

    GatewayError
    ├── ConfigError            bad configuration; names the key, the value and the source
    │   └── ConfigErrors       several at once (a file with two mistakes reports both)
    ├── StoreError             the local SQLite store failed (I/O, corruption)
    └── QueueError             a queue backend (uplink or the store as a backend) failed
        ├── RetryableError     the same call may succeed later
        │   └── UplinkUnavailable   the backend cannot be reached at all (connection,
        │                           timeout, auth refresh): a whole-batch condition that
        │                           never counts against a message's attempts
        ├── PermanentError     retrying the same message will fail the same way
        │   └── MessageRejected     the backend refused this message (too large, invalid)
        ├── NotSupportedError  the backend cannot do this operation at all
        └── BackendNotInstalled     the backend's optional extra is not installed

Adapters translate their SDK's exceptions into this tree at the boundary; nothing above
an adapter ever sees an SDK exception. The forwarder's decisions depend only on the class:
UplinkUnavailable -> back off and keep buffering; RetryableError -> retry this message with
backoff; PermanentError -> dead-letter this message with the reason.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """A configuration value is missing, unknown or of the wrong type."""

    def __init__(self, key: str, value: object, reason: str, source: str = "") -> None:
        self.key = key
        self.value = value
        self.reason = reason
        self.source = source
        where = f" in {source}" if source else ""
        shown = "<hidden>" if _looks_secret(key) else repr(value)
        super().__init__(f"{key}={shown}{where}: {reason}")

    @property
    def all(self) -> list[ConfigError]:
        """Every error this one stands for (itself, for a single error)."""
        return [self]


class ConfigErrors(ConfigError):
    """Several configuration errors found in one pass. ``key``, ``value``, ``reason`` and
    ``source`` are the first one's; ``all`` lists each."""

    def __init__(self, errors: list[ConfigError]) -> None:
        first = errors[0]
        super().__init__(first.key, first.value, first.reason, first.source)
        self.errors = errors
        lines = "\n".join(f"  {Exception.__str__(e)}" for e in errors)
        self.args = (f"{len(errors)} problems:\n{lines}",)

    @property
    def all(self) -> list[ConfigError]:
        return list(self.errors)


def raise_config_errors(errors: list[ConfigError]) -> None:
    """Raise what was collected: nothing, the one error, or all of them together."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigErrors(errors)


def _looks_secret(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1].lower()
    return any(word in leaf for word in ("password", "secret", "connection_string", "token"))


class StoreError(GatewayError):
    """The local store could not complete an operation. ``disk_full``: SQLite reported
    SQLITE_FULL (the disk, or store.max_page_count)."""

    def __init__(self, message: str, *, disk_full: bool = False) -> None:
        self.disk_full = disk_full
        super().__init__(message)


class QueueError(GatewayError):
    """A queue backend failed. ``retryable`` tells the forwarder what to do next."""

    retryable: bool = False

    def __init__(self, message: str, *, backend: str = "", code: str | None = None) -> None:
        self.backend = backend
        self.code = code
        prefix = f"[{backend}] " if backend else ""
        super().__init__(f"{prefix}{message}")


class RetryableError(QueueError):
    """The operation may succeed if tried again later."""

    retryable = True


class UplinkUnavailable(RetryableError):
    """The backend cannot be reached; no message is at fault."""


class PermanentError(QueueError):
    """The operation will fail the same way if repeated."""


class MessageRejected(PermanentError):
    """The backend refused one message; the reason says why (size, format, permission)."""


class NotSupportedError(QueueError):
    """The backend has no way to perform this operation; it is not pretended."""

    def __init__(self, backend: str, operation: str, why: str) -> None:
        self.operation = operation
        super().__init__(f"{operation} is not supported: {why}", backend=backend)


class BackendNotInstalled(QueueError):
    """The backend's optional dependency is missing."""

    def __init__(self, backend: str, extra: str, missing: str) -> None:
        self.extra = extra
        super().__init__(
            f"needs the '{missing}' package: install the gateway with the extra [{extra}] (from "
            f"its checkout: pip install '.[{extra}]'; the Debian package: packaging/install.sh "
            f"--extras {extra})",
            backend=backend,
        )
