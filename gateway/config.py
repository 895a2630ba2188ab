"""Configuration: defaults -> YAML file -> OPENHQM_ environment overrides -> validate().

Parsed once into frozen dataclasses; nothing downstream reads raw dicts.

- The file is YAML. ``${VAR}`` and ``${VAR:-default}`` in string values are expanded from
  the environment (keep secrets out of the file this way). ``${credential:NAME}`` reads the
  systemd credential NAME (``LoadCredential=``, from ``$CREDENTIALS_DIRECTORY``) and
  ``${file:/path}`` reads a file; one trailing newline is dropped.
- Environment variables ``OPENHQM_<SECTION>__<KEY>[__<KEY>...]`` override the file;
  ``__`` is the nesting delimiter and names are case-insensitive:
  ``OPENHQM_QUEUE__TYPE=redis``, ``OPENHQM_QUEUE__REDIS_URL=redis://...``,
  ``OPENHQM_INGRESS__PORT=1884``. Lists and mappings take JSON (``'["a","b"]'``);
  plain lists also take "a,b". ``OPENHQM_CONFIG`` names the file and is not a key.
- The ``queue:`` section is the seed's: ``type`` plus the common names
  (``request_queue_name``, ``response_queue_name``, ``dlq_name``) plus the chosen backend's
  own keys, flat, exactly as the seed document writes them. The backend's keys are parsed
  into its settings dataclass (``config.queue.settings``). It is the uplink named
  ``default``.
- ``uplinks:`` instead names several: ``uplinks: {NAME: {...the queue: keys..., topics: [MQTT
  filters], forwarder: {...}}}``; each uplink's ``forwarder`` keys override the top-level
  ``forwarder:`` section. Both ``queue:`` and ``uplinks:`` is an error. ``config.uplinks``
  always lists at least one uplink; ``config.uplink_view(u)`` is the config as the seed's
  code sees one uplink (its ``queue`` and ``forwarder``).
- Unknown keys and wrong types raise ConfigError naming the key, the value and the source.
- Some keys hold a secret that must never sit in the file in clear (``_REFERENCE_ONLY``:
  ``observability.token``): their value, in the file or an ``OPENHQM_`` variable, must be
  exactly one ``${credential:NAME}`` or ``${file:/abs/path}`` reference; anything else is a
  ConfigError naming the key. ``load_config`` enforces this; ``parse_config`` receives the
  already resolved secret.
- The observability endpoint is open only on loopback: listening anywhere else needs
  ``observability.token`` (or, explicitly, ``allow_unauthenticated: true``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import yaml

from gateway.downlink.settings import (
    DownlinkConfig,
    IngressView,
    downlink_problems,
    mqtt_source_problem,
    overrides_masked,
    parse_downlink,
    render_source,
)
from gateway.errors import ConfigError, raise_config_errors
from gateway.queue.registry import settings_class
from gateway.settings import DURATION, SIZE, parse_dataclass, parse_value, secret, to_plain

DEFAULT_CONFIG_PATH = "/etc/openhqm-gateway/gateway.yaml"
ENV_PREFIX = "OPENHQM_"
ENV_CONFIG_PATH = "OPENHQM_CONFIG"


@dataclass(frozen=True, slots=True)
class GatewaySection:
    #: this gateway's name: the openhqm_gateway_id attribute of every uplinked message, key
    #: templates' {gateway_id}, client ids and consumer names. '' = the host name
    id: str = ""
    #: where the store and other state live
    state_dir: str = "/var/lib/openhqm-gateway"


@dataclass(frozen=True, slots=True)
class TlsConfig:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    key_password: str | None = secret(None)
    #: skip certificate verification (testing only)
    insecure: bool = False


@dataclass(frozen=True, slots=True)
class Subscription:
    topic: str
    qos: Literal[0, 1, 2] = 1


@dataclass(frozen=True, slots=True)
class IngressConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    #: '' = "openhqm-gateway-<gateway.id>"; must be stable so the broker keeps the session
    client_id: str = ""
    username: str | None = None
    password: str | None = secret(None)
    tls: TlsConfig | None = None
    protocol: Literal["5", "3.1.1"] = "5"
    subscriptions: list[Subscription] = field(
        default_factory=lambda: [Subscription("sensors/#", 1)]
    )
    #: topic filters whose messages are acknowledged and not stored (e.g. the downlink's
    #: command topics when a subscription covers them)
    exclude: list[str] = field(default_factory=list)
    max_message_bytes: Annotated[int, SIZE] = 256 * 1024
    #: how long the broker keeps the session (and queued messages) while we are away
    session_expiry: Annotated[float, DURATION] = 7 * 86400.0
    #: MQTT 5 receive maximum: unacknowledged QoS 1/2 messages in flight towards us
    receive_maximum: int = 2000
    keepalive: Annotated[float, DURATION] = 30.0
    reconnect_min_delay: Annotated[float, DURATION] = 0.5
    reconnect_max_delay: Annotated[float, DURATION] = 30.0


@dataclass(frozen=True, slots=True)
class StoreConfig:
    #: '' = <gateway.state_dir>/store.db
    path: str = ""
    durability: Literal["full", "normal"] = "full"
    commit_interval_ms: int = 20
    #: while the uplink is unreachable, commits start at most this often instead
    offline_commit_interval_ms: int = 250
    commit_batch_size: int = 2000
    max_bytes: Annotated[int, SIZE] = 512 * 1024**2
    max_messages: int = 2_000_000
    max_age: Annotated[float, DURATION] = 7 * 86400.0
    when_full: Literal["drop_oldest", "reject_new"] = "drop_oldest"
    lease: Annotated[float, DURATION] = 60.0
    max_attempts: int = 10
    dead_letter_max_messages: int = 100_000
    #: SQLite max_page_count: a hard cap on the file (0 = none). Mostly for tests.
    max_page_count: int = 0
    #: size of a ring segment of the log (small commits fill one in place)
    segment_bytes: Annotated[int, SIZE] = 256 * 1024
    #: frames are zlib-compressed (level 1) when that saves an eighth or more
    compression: Literal["zlib", "none"] = "zlib"
    #: a delivered message's cursor position is written at most this long after it ...
    cursor_sync_interval: Annotated[float, DURATION] = 1.0
    #: ... or once this many messages were settled since the last write
    cursor_sync_messages: int = 1000


@dataclass(frozen=True, slots=True)
class Route:
    #: MQTT topic filter (+ and # wildcards)
    topic: str
    #: stream / topic / queue name at the uplink
    destination: str


@dataclass(frozen=True, slots=True)
class ForwarderConfig:
    batch_size: int = 500
    #: a batch also ends at this many payload bytes (the first message always goes): with
    #: the batch leased ahead, about twice this is held in memory, whatever the message size
    max_batch_bytes: Annotated[int, SIZE] = 8 * 1024**2
    #: upper bound on messages per second sent to the uplink; 0 = as fast as it accepts
    max_rate: float = 0.0
    retry_min_delay: Annotated[float, DURATION] = 0.5
    retry_max_delay: Annotated[float, DURATION] = 60.0
    #: one publish_batch call longer than this counts as the uplink being unavailable
    publish_timeout: Annotated[float, DURATION] = 30.0
    routes: list[Route] = field(default_factory=list)
    #: failed attempts before a message is dead-lettered; 0 = store.max_attempts
    max_attempts: int = 0
    #: when a message may be acknowledged to the broker: "stored" (after the store's
    #: commit) or "uplinked_or_stored" (also when this uplink accepted it first, with no
    #: store write: docs/reliability.md); None = the backend's default (durable_acks)
    ack_when: Literal["stored", "uplinked_or_stored"] | None = None
    #: with uplinked_or_stored: how long a message may wait for this uplink's acceptance
    #: before it is stored; 0 = store.commit_interval_ms (when its commit would be due)
    ack_wait: Annotated[float, DURATION] = 0.0
    #: while the uplink keeps up, how long committed messages may gather before a batch that
    #: is not full is sent: fewer, fuller batches (less CPU per message) for that much more
    #: latency to the cloud. 0 = send at once. A backlog (full batches) never waits, nor do
    #: messages offered from memory (ack_when: uplinked_or_stored)
    linger: Annotated[float, DURATION] = 0.0


@dataclass(frozen=True, slots=True)
class QueueConfig:
    type: str = "redis"
    request_queue_name: str = "openhqm-requests"
    response_queue_name: str = "openhqm-responses"
    dlq_name: str = "openhqm-dlq"
    #: the backend's own keys, as its settings dataclass
    settings: Any = None
    #: commands from the cloud to the devices (gateway/downlink/)
    downlink: DownlinkConfig = field(default_factory=DownlinkConfig)


@dataclass(frozen=True, slots=True)
class ObservabilityConfig:
    #: "host:port" of the local HTTP endpoint (/metrics, /healthz, /readyz); '' = off
    listen: str = "127.0.0.1:9108"
    #: /readyz fails when the oldest buffered message is older than this while online
    stuck_backlog_age: Annotated[float, DURATION] = 900.0
    #: /readyz fails when messages wait and the uplink acknowledged nothing for this long
    stuck_no_ack: Annotated[float, DURATION] = 600.0
    #: bearer token required by every route but /healthz (also on loopback); only as a
    #: ${credential:NAME} or ${file:/abs/path} reference, never in clear. None = no token
    token: str | None = secret(None)
    #: listen beyond loopback without a token (something else must protect the port)
    allow_unauthenticated: bool = False
    #: PEM certificate (chain) and private key: HTTPS instead of HTTP; both or neither
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

    @property
    def host(self) -> str:
        """The listen address's host, without IPv6 brackets."""
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def on_loopback(self) -> bool:
        """Whether the endpoint listens on loopback only (127.0.0.0/8, ::1, localhost)."""
        return is_loopback(self.host)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # any other host name may resolve anywhere
        return False


def observability_tls_context(obs: ObservabilityConfig) -> ssl.SSLContext | None:
    """The server's TLS context, or None without ``tls_cert_file``; a certificate and key
    that do not load (or do not match) are a ConfigError naming ``tls_cert_file``."""
    if obs.tls_cert_file is None or obs.tls_key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(obs.tls_cert_file, obs.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("observability.tls_cert_file", obs.tls_cert_file,
                          f"cannot load it with observability.tls_key_file={obs.tls_key_file!r}"
                          f" (PEM certificate and its matching private key): {exc}") from None
    return context


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"
    #: journald's native protocol (fields survive): auto = when stdout is the journal
    journald: Literal["auto", "on", "off"] = "auto"
    journal_socket: str = "/run/systemd/journal/socket"


@dataclass(frozen=True, slots=True)
class UplinkConfig:
    """One uplink: its name, backend (the seed's queue keys), the MQTT topic filters routed to
    it (empty = every message the ingress receives) and its own forwarder settings."""

    name: str
    queue: QueueConfig
    topics: list[str] = field(default_factory=list)
    forwarder: ForwarderConfig = field(default_factory=ForwarderConfig)


@dataclass(frozen=True, slots=True)
class Config:
    gateway: GatewaySection = field(default_factory=GatewaySection)
    ingress: IngressConfig = field(default_factory=IngressConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    forwarder: ForwarderConfig = field(default_factory=ForwarderConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    #: where the config came from, for error messages
    source: str = "<defaults>"
    #: every uplink (``uplinks:``, or the ``queue:`` section as the uplink ``default``)
    uplinks: list[UplinkConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.uplinks:  # built in code, not parsed: the queue section is the uplink
            object.__setattr__(self, "uplinks",
                               [UplinkConfig(DEFAULT_UPLINK, self.queue, [], self.forwarder)])

    def uplink_view(self, uplink: UplinkConfig) -> Config:
        """The config as one uplink's backend and forwarder see it."""
        return dataclasses.replace(self, queue=uplink.queue, forwarder=uplink.forwarder,
                                   uplinks=[uplink])

    @property
    def client_suffix(self) -> str:
        """What an uplink's client ids end with: '' for the single uplink ``default``,
        ``-NAME`` in the view of one of several (two clients with one id throw each other off
        a broker)."""
        name = self.uplinks[0].name if len(self.uplinks) == 1 else DEFAULT_UPLINK
        return "" if name == DEFAULT_UPLINK else f"-{name}"

    @property
    def gateway_id(self) -> str:
        return self.gateway.id or socket.gethostname()

    @property
    def store_path(self) -> str:
        return self.store.path or os.path.join(self.gateway.state_dir, "store.db")

    @property
    def ingress_client_id(self) -> str:
        return self.ingress.client_id or f"openhqm-gateway-{self.gateway_id}"


_QUEUE_COMMON = {"type", "request_queue_name", "response_queue_name", "dlq_name"}
_TOP_LEVEL = {"gateway", "ingress", "store", "forwarder", "queue", "uplinks", "logging",
              "observability"}
#: the longest ``gateway.id``: it travels as an attribute on every message (and in client ids)
GATEWAY_ID_MAX = 128
#: the name of the uplink the ``queue:`` section configures
DEFAULT_UPLINK = "default"
_UPLINK_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


def load_config(path: str | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read, override, parse and validate. ``path=None`` means defaults and env only."""
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        raw = _read_yaml(path, env)
        source = path
    _apply_env(raw, env)
    if any(k.startswith(ENV_PREFIX) and k != ENV_CONFIG_PATH for k in env):
        source = f"{source} + environment"
    return parse_config(raw, source)


def _read_yaml(path: str, env: Mapping[str, str]) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError("--config", path, "no such file: copy the commented sample "
                          "config/gateway.yaml there, or name another with -c FILE "
                          "(-c none: defaults and OPENHQM_ variables only)") from None
    except OSError as exc:
        raise ConfigError("--config", path, f"cannot read the file: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("<file>", path, f"not valid YAML: {exc}", path) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("<root>", type(data).__name__, "the file must hold a mapping", path)
    expanded: dict[str, Any] = _expand(data, env, "", path)
    return expanded


#: keys whose value must be a secret reference, never the secret itself
_REFERENCE_ONLY = frozenset({"observability.token"})
_REFERENCE = re.compile(r"\$\{(credential|file):([^}]+)\}")


def _secret_reference(value: Any, env: Mapping[str, str], key: str, source: str) -> Any:
    """The secret a reference-only key names; the key's value itself is refused."""
    if value is None:
        return None
    match = _REFERENCE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(key, value, "must be a reference to the secret, not the secret: "
                          "${credential:NAME} (systemd LoadCredential=) or ${file:/absolute/path}",
                          source)
    return _read_secret(match[1], match[2], env, key=key, value=value, source=source)


_VAR = re.compile(r"\$\{(?:(credential|file):([^}]+)|([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?)\}")


def _read_secret(kind: str, ref: str, env: Mapping[str, str], *, key: str, value: str,
                 source: str) -> str:
    if kind == "credential":
        directory = env.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ConfigError(key, value, f"credential {ref!r} asked for, but CREDENTIALS_DIRECTORY "
                              "is not set (run under systemd with LoadCredential=)", source)
        if "/" in ref or ref in (".", ".."):
            raise ConfigError(key, value, f"credential name {ref!r} must not contain '/'", source)
        path = os.path.join(directory, ref)
    else:
        path = ref
        if not os.path.isabs(path):
            raise ConfigError(key, value, f"${{file:...}} needs an absolute path, got {ref!r}",
                              source)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(key, value, f"cannot read {kind} {ref!r} ({path}): {exc}",
                          source) from exc
    return text[:-1] if text.endswith("\n") else text


def _expand(value: Any, env: Mapping[str, str], key: str, source: str) -> Any:
    if key in _REFERENCE_ONLY:
        return _secret_reference(value, env, key, source)
    if isinstance(value, dict):
        return {k: _expand(v, env, f"{key}.{k}" if key else str(k), source) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, env, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:
        def sub(match: re.Match[str]) -> str:
            kind, ref, name, default = match.groups()
            if kind is not None:  # one pass: what a secret file holds is never expanded
                return _read_secret(kind, ref, env, key=key, value=value, source=source)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(key, value, f"environment variable {name} is not set", source)
        return _VAR.sub(sub, value)
    return value


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    for name, value in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG_PATH:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        if not all(parts) or parts[0] not in _TOP_LEVEL:
            known = ", ".join(f"{ENV_PREFIX}{s.upper()}__..." for s in sorted(_TOP_LEVEL))
            raise ConfigError(name, value, f"not a config variable; expected one of {known}",
                              "environment")
        dotted = ".".join(parts)
        resolved = (_secret_reference(value, env, dotted, f"environment {name}")
                    if dotted in _REFERENCE_ONLY else value)
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = resolved


def parse_config(raw: Mapping[str, Any], source: str) -> Config:
    """Parse every section and check every rule; all problems are reported together."""
    errors: list[ConfigError] = []
    for key in raw:
        if key not in _TOP_LEVEL:
            errors.append(ConfigError(str(key), raw[key], "unknown section; known sections: "
                                      f"{', '.join(sorted(_TOP_LEVEL))}", source))
    sections = {k: v for k, v in raw.items() if k not in ("queue", "uplinks") and k in _TOP_LEVEL}
    cfg = queue = None
    uplinks: list[UplinkConfig] = []
    try:
        cfg = parse_dataclass(Config, {**sections, "source": source}, "", source)
    except ConfigError as exc:
        errors.extend(exc.all)
    if "uplinks" in raw and "queue" in raw:
        errors.append(ConfigError("uplinks", "...", "both queue: and uplinks: are set; use one: "
                                  "queue: is the uplink named 'default', uplinks: names several",
                                  source))
    try:
        queue = _parse_queue(raw.get("queue") or {}, source)
    except ConfigError as exc:
        errors.extend(exc.all)
    if cfg is not None and "uplinks" in raw:
        try:
            uplinks = _parse_uplinks(raw["uplinks"], raw.get("forwarder") or {}, source)
        except ConfigError as exc:
            errors.extend(exc.all)
    if cfg is None or queue is None or errors:
        raise_config_errors(errors)
    assert cfg is not None and queue is not None  # raise_config_errors raised otherwise
    if uplinks:
        cfg = dataclasses.replace(cfg, queue=uplinks[0].queue, uplinks=uplinks)
    else:
        cfg = dataclasses.replace(cfg, queue=queue, uplinks=[
            UplinkConfig(DEFAULT_UPLINK, queue, [], cfg.forwarder)])
    validate(cfg)
    return cfg


def _parse_uplinks(raw: Any, forwarder_raw: Any, source: str) -> list[UplinkConfig]:
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError("uplinks", raw, "expected a mapping of uplink name -> its keys", source)
    errors: list[ConfigError] = []
    uplinks: list[UplinkConfig] = []
    for name, body in raw.items():
        key = f"uplinks.{name}"
        try:
            uplinks.append(_parse_uplink(str(name), body, forwarder_raw, key, source))
        except ConfigError as exc:
            errors.extend(exc.all)
    raise_config_errors(errors)
    return uplinks


def _parse_uplink(name: str, raw: Any, forwarder_raw: Any, key: str, source: str) -> UplinkConfig:
    if not _UPLINK_NAME.fullmatch(name):
        raise ConfigError(key, name, "an uplink name is lowercase letters, digits, '-' and '_' "
                          "(it is part of OPENHQM_UPLINKS__<NAME>__<KEY> and of metric labels)",
                          source)
    if not isinstance(raw, Mapping):
        raise ConfigError(key, raw, "expected a mapping of the queue: keys, topics: and "
                          "forwarder:", source)
    body = dict(raw)
    topics_raw = body.pop("topics", [])
    own_forwarder = body.pop("forwarder", {}) or {}
    errors: list[ConfigError] = []
    queue = topics = forwarder = None
    try:
        queue = _parse_queue(body, source, prefix=key)
    except ConfigError as exc:
        errors.extend(exc.all)
    try:
        topics = parse_value(list[str], topics_raw, f"{key}.topics", source)
    except ConfigError as exc:
        errors.extend(exc.all)
    if not isinstance(own_forwarder, Mapping):
        errors.append(ConfigError(f"{key}.forwarder", own_forwarder, "expected a mapping",
                                  source))
        own_forwarder = {}
    try:
        merged = {**(forwarder_raw if isinstance(forwarder_raw, Mapping) else {}),
                  **own_forwarder}
        forwarder = parse_dataclass(ForwarderConfig, merged, f"{key}.forwarder", source)
    except ConfigError as exc:
        errors.extend(exc.all)
    raise_config_errors(errors)
    assert queue is not None and topics is not None and forwarder is not None
    return UplinkConfig(name, queue, list(topics), forwarder)


def _parse_queue(raw: Any, source: str, prefix: str = "queue") -> QueueConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError(prefix, raw, "expected a mapping of keys", source)
    type_name = parse_value(str, raw.get("type", "redis"), f"{prefix}.type", source)
    settings_cls = settings_class(type_name, source, prefix)
    common = {k: v for k, v in raw.items() if k in _QUEUE_COMMON and k != "type"}
    own = {k: v for k, v in raw.items() if k not in _QUEUE_COMMON and k != "downlink"}
    errors: list[ConfigError] = []
    base = settings = None
    downlink = DownlinkConfig()
    try:
        downlink = parse_downlink(raw.get("downlink"), f"{prefix}.downlink", source,
                                  settings_cls)
    except ConfigError as exc:
        errors.extend(exc.all)
    try:
        base = parse_dataclass(QueueConfig, common, prefix, source)
    except ConfigError as exc:
        errors.extend(exc.all)
    try:
        settings = parse_dataclass(settings_cls, own, prefix, source)
    except ConfigError as exc:
        errors.extend(exc.all)
    raise_config_errors(errors)
    assert base is not None
    return QueueConfig(type_name, base.request_queue_name, base.response_queue_name,
                       base.dlq_name, settings, downlink)


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express; every failing one is reported."""
    ing, st, fw = cfg.ingress, cfg.store, cfg.forwarder
    p = _Problems(cfg.source)
    gid = cfg.gateway_id
    p.check(0 < len(gid) <= GATEWAY_ID_MAX and gid.isprintable() and gid.strip() == gid,
            "gateway.id", gid, f"must be 1..{GATEWAY_ID_MAX} printable characters without "
            "leading or trailing spaces (it goes on every uplinked message)")
    p.check(1 <= ing.port <= 65535, "ingress.port", ing.port, "must be 1..65535")
    p.check(bool(ing.subscriptions), "ingress.subscriptions", [], "needs at least one topic")
    for i, sub in enumerate(ing.subscriptions):
        p.check(_valid_filter(sub.topic), f"ingress.subscriptions[{i}].topic", sub.topic,
                "not a valid MQTT topic filter")
    for i, excluded in enumerate(ing.exclude):
        p.check(_valid_filter(excluded), f"ingress.exclude[{i}]", excluded,
                "not a valid MQTT topic filter")
    _check_forwarder(p, fw, "forwarder")
    several = len(cfg.uplinks) > 1 or (bool(cfg.uplinks) and cfg.uplinks[0].name != DEFAULT_UPLINK)
    for u in cfg.uplinks if several else []:
        for i, topic in enumerate(u.topics):
            p.check(_valid_filter(topic), f"uplinks.{u.name}.topics[{i}]", topic,
                    "not a valid MQTT topic filter")
        if u.forwarder != fw:
            _check_forwarder(p, u.forwarder, f"uplinks.{u.name}.forwarder")
    p.check(1 <= ing.receive_maximum <= 65535, "ingress.receive_maximum", ing.receive_maximum,
            "must be 1..65535")
    p.check(ing.max_message_bytes > 0, "ingress.max_message_bytes", ing.max_message_bytes,
            "must be positive")
    p.check(st.commit_interval_ms >= 0, "store.commit_interval_ms", st.commit_interval_ms,
            "must not be negative")
    p.check(st.commit_batch_size >= 1, "store.commit_batch_size", st.commit_batch_size,
            "must be at least 1")
    p.check(st.max_messages >= 1, "store.max_messages", st.max_messages, "must be at least 1")
    p.check(st.max_bytes >= 1024, "store.max_bytes", st.max_bytes, "must be at least 1KB")
    p.check(st.max_attempts >= 1, "store.max_attempts", st.max_attempts, "must be at least 1")
    p.check(st.lease > 0, "store.lease", st.lease, "must be positive")
    p.check(st.offline_commit_interval_ms >= st.commit_interval_ms,
            "store.offline_commit_interval_ms", st.offline_commit_interval_ms,
            "must be at least store.commit_interval_ms")
    p.check(4096 <= st.segment_bytes <= 64 * 1024**2, "store.segment_bytes", st.segment_bytes,
            "must be between 4KB and 64MB")
    p.check(st.cursor_sync_interval > 0, "store.cursor_sync_interval", st.cursor_sync_interval,
            "must be positive")
    p.check(st.cursor_sync_messages >= 1, "store.cursor_sync_messages", st.cursor_sync_messages,
            "must be at least 1")
    for u in cfg.uplinks:
        p.found += _downlink_problems(cfg, u, f"uplinks.{u.name}" if several else "queue")
    _check_observability(p, cfg.observability)
    raise_config_errors(p.found)


#: a token is sent in an HTTP header: printable ASCII without spaces, and long enough
_TOKEN = re.compile(r"[\x21-\x7e]{16,}")


def _check_observability(p: _Problems, obs: ObservabilityConfig) -> None:
    if not obs.listen:
        return
    host, _, port = obs.listen.rpartition(":")
    p.check(bool(host) and port.isdigit() and 0 <= int(port) <= 65535,
            "observability.listen", obs.listen, "expected host:port, e.g. 127.0.0.1:9108")
    if obs.token is not None:
        p.check(bool(_TOKEN.fullmatch(obs.token)), "observability.token", obs.token,
                "the token must be at least 16 printable ASCII characters without spaces "
                "(e.g. openssl rand -hex 32)")
    p.check(not host or obs.on_loopback or obs.token is not None or obs.allow_unauthenticated,
            "observability.listen", obs.listen,
            "listens beyond loopback without a token: anyone who reaches the port reads "
            "/metrics and the status page. Set observability.token: ${credential:NAME} (or "
            "${file:/abs/path}), listen on 127.0.0.1, or set "
            "observability.allow_unauthenticated: true if a firewall or proxy protects it")
    cert, key = obs.tls_cert_file, obs.tls_key_file
    p.check(cert is not None or key is None, "observability.tls_cert_file", cert,
            "observability.tls_key_file is set: set both (HTTPS) or neither (HTTP)")
    p.check(key is not None or cert is None, "observability.tls_key_file", key,
            "observability.tls_cert_file is set: set both (HTTPS) or neither (HTTP)")
    readable = [_readable(p, f"observability.{name}", path)
                for name, path in (("tls_cert_file", cert), ("tls_key_file", key))
                if path is not None]
    if len(readable) == 2 and all(readable):
        try:
            observability_tls_context(obs)
        except ConfigError as exc:
            p.found.append(ConfigError(exc.key, exc.value, exc.reason, p.source))


def _readable(p: _Problems, key: str, path: str) -> bool:
    try:
        with open(path, "rb"):
            return True
    except OSError as exc:
        p.check(False, key, path, f"cannot read the file: {exc.strerror}")
        return False


def _check_forwarder(p: _Problems, fw: ForwarderConfig, key: str) -> None:
    for i, route in enumerate(fw.routes):
        p.check(_valid_filter(route.topic), f"{key}.routes[{i}].topic", route.topic,
                "not a valid MQTT topic filter")
        p.check(bool(route.destination), f"{key}.routes[{i}].destination", "",
                "must not be empty")
    p.check(fw.batch_size >= 1, f"{key}.batch_size", fw.batch_size, "must be at least 1")
    p.check(fw.max_batch_bytes >= 1, f"{key}.max_batch_bytes", fw.max_batch_bytes,
            "must be at least 1 byte")
    p.check(fw.max_rate >= 0, f"{key}.max_rate", fw.max_rate, "must not be negative")
    p.check(fw.retry_max_delay >= fw.retry_min_delay, f"{key}.retry_max_delay",
            fw.retry_max_delay, f"must be at least {key}.retry_min_delay")
    p.check(fw.publish_timeout > 0, f"{key}.publish_timeout", fw.publish_timeout,
            "must be positive")
    p.check(fw.max_attempts >= 0, f"{key}.max_attempts", fw.max_attempts,
            "must not be negative (0 = store.max_attempts)")


def _downlink_problems(cfg: Config, uplink: UplinkConfig, prefix: str) -> list[ConfigError]:
    """One uplink's downlink: the loop guard against what this uplink uplinks to."""
    q = uplink.queue
    destinations = [q.request_queue_name, *(r.destination for r in uplink.forwarder.routes)]
    source_name = render_source(q.downlink, q.response_queue_name, cfg.gateway_id)
    found = downlink_problems(
        q.downlink, f"{prefix}.downlink", source=cfg.source, source_name=source_name,
        ingress=IngressView([s.topic for s in cfg.ingress.subscriptions], cfg.ingress.exclude),
        uplink_destinations=destinations)
    if q.downlink.enabled and q.type == "mqtt":
        found += mqtt_source_problem(q.downlink, q.settings, f"{prefix}.downlink",
                                     source_name=source_name, destinations=destinations,
                                     gateway_id=cfg.gateway_id, source=cfg.source)
    return found


class _Problems:
    """Failed checks, collected so that all of them are reported at once."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.found: list[ConfigError] = []

    def check(self, ok: bool, key: str, value: object, reason: str) -> None:
        if not ok:
            self.found.append(ConfigError(key, value, reason, self.source))


def _valid_filter(topic: str) -> bool:
    if not topic or "\0" in topic or len(topic.encode()) > 65535:
        return False
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def effective_config(cfg: Config) -> dict[str, Any]:
    """The config as plain data with secrets masked, each backend's keys flattened as in the
    file: the ``queue:`` section for the single uplink ``default``, else ``uplinks:``."""
    plain: dict[str, Any] = to_plain(cfg, mask=True)
    plain.pop("source", None)
    plain["gateway"]["id"] = cfg.gateway_id  # resolved: the host name when left empty
    uplinks = plain.pop("uplinks")
    queue = plain.pop("queue")
    if len(cfg.uplinks) == 1 and cfg.uplinks[0].name == DEFAULT_UPLINK:
        plain["queue"] = _flat_queue(queue, cfg.queue)
        return plain
    plain["uplinks"] = {u["name"]: {**_flat_queue(u["queue"], config.queue),
                                    "topics": u["topics"], "forwarder": u["forwarder"]}
                        for u, config in zip(uplinks, cfg.uplinks, strict=True)}
    return plain


def _flat_queue(queue: dict[str, Any], config: QueueConfig) -> dict[str, Any]:
    """A queue section as in the file: the backend's keys beside the common ones, the
    downlink's overrides masked by the backend's own secret keys."""
    settings = queue.pop("settings") or {}
    downlink = queue.get("downlink") or {}
    if downlink.get("overrides"):
        downlink["overrides"] = overrides_masked(config.downlink.overrides,
                                                 type(config.settings))
    return {**queue, **settings}
