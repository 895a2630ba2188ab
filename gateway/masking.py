"""Showing a config value without its secret part.

``config check`` prints the effective config and logs name the address an uplink tries; a
user must see *which* server and whether an override took effect, never a password or key.

- ``mask_url``: scheme, user, host, port and path stay; the password becomes ``***``, and so
  does the value of a query parameter whose name looks secret (``password``, ``token``,
  ``sig``, ``key`` ...). ``redis://:hunter2@redis:6379/0`` -> ``redis://:***@redis:6379/0``.
- ``mask_connection_string``: ``Name=value;...`` pairs (Azure Event Hubs, Storage) keep their
  endpoint, names and paths (``SharedAccessKeyName`` names a policy: shown); values whose
  name looks secret (``SharedAccessKey``, ``AccountKey``, ``SharedAccessSignature`` ...)
  become ``***``.
- Options known only by their name (a custom uplink's constructor parameters, the entries
  of ``custom_config``): ``kind_for_name`` decides. A name with ``url`` or
  ``connection_string`` is shown like a URL or a connection string, whichever it parses as;
  a name with password, secret, token, key or credential is masked whole.
- Anything that does not parse as the kind it claims to be is masked whole.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit

MASK = "***"

#: settings field metadata ``{"secret": KIND}``: True masks the whole value
URL = "url"
CONNECTION_STRING = "connection_string"
#: a URL or a connection string, whichever the value is
ADDRESS = "address"
#: a mapping whose entries are masked by their names (``kind_for_name``)
BY_NAME = "by_name"

_SECRET_WORDS = ("password", "secret", "token", "key", "credential")

_SECRET_NAME = re.compile(r"password|passwd|pwd|secret|token|key|sig|signature|credential",
                          re.IGNORECASE)


def mask_value(value: Any, kind: Any) -> Any:
    """``value`` as it may be shown, for a field marked ``{"secret": kind}``."""
    if value is None or value == "":
        return value
    if kind == BY_NAME and isinstance(value, dict):
        return {k: _mask_named(str(k), v) for k, v in value.items()}
    if kind == URL and isinstance(value, str):
        return mask_url(value)
    if kind == CONNECTION_STRING and isinstance(value, str):
        return mask_connection_string(value)
    if kind == ADDRESS and isinstance(value, str):
        return mask_address(value)
    return MASK


def mask_address(text: str) -> str:
    """A URL or a ``Name=value;...`` connection string, whichever ``text`` is, masked."""
    if "://" in text and ";" not in text:
        return mask_url(text)
    return mask_connection_string(text)


def kind_for_name(name: str) -> Any:
    """The masking of an option known only by its name: ADDRESS, True (whole) or None."""
    lowered = name.lower()
    if "connection_string" in lowered or lowered.endswith("url"):
        return ADDRESS
    if any(word in lowered for word in _SECRET_WORDS):
        return True
    return None


def _mask_named(name: str, value: Any) -> Any:
    kind = kind_for_name(name)
    return value if kind is None else mask_value(value, kind)


def mask_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a port that is not a number
    except ValueError:
        return MASK
    if not parts.scheme or not parts.netloc:
        return MASK
    netloc = parts.hostname or ""
    if ":" in netloc:  # an IPv6 literal
        netloc = f"[{netloc}]"
    if port is not None:
        netloc = f"{netloc}:{port}"
    if parts.username is not None or parts.password is not None:
        user = parts.username or ""
        netloc = f"{user}:{MASK}@{netloc}" if parts.password is not None else f"{user}@{netloc}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, MASK if _SECRET_NAME.search(k) else v) for k, v in pairs],
                          safe="*")
    return SplitResult(parts.scheme, netloc, parts.path, query, parts.fragment).geturl()


def mask_connection_string(text: str) -> str:
    pairs = [p for p in text.split(";") if p.strip()]
    if not pairs or any("=" not in p for p in pairs):
        return MASK
    shown = []
    for pair in pairs:
        name, _, value = pair.partition("=")
        hidden = _SECRET_NAME.search(name) and not name.lower().endswith("name")
        shown.append(f"{name}={MASK if hidden else value}")
    return ";".join(shown)
