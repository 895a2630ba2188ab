"""The observability endpoint's protection: config rules and the token check's arithmetic."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest

from gateway.config import effective_config, is_loopback, load_config
from gateway.errors import ConfigError
from gateway.observability.auth import BearerAuth

TOKEN = "0123456789abcdef0123456789abcdef"


def write(tmp_path: Path, observability: str) -> str:
    path = tmp_path / "gateway.yaml"
    path.write_text("observability:\n" + observability)
    return str(path)


def token_file(tmp_path: Path, token: str = TOKEN) -> Path:
    path = tmp_path / "metrics-token"
    path.write_text(token + "\n")
    return path


def errors(exc: ConfigError) -> dict[str, str]:
    return {e.key: e.reason for e in exc.all}


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("localhost", True),
    ("LOCALHOST", True), ("0.0.0.0", False), ("::", False), ("192.168.1.10", False),
    ("gateway.local", False), ("::ffff:10.0.0.1", False)])
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_beyond_loopback_without_token_is_an_error_naming_listen(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, '  listen: "0.0.0.0:9108"\n'), {})
    reason = errors(info.value)["observability.listen"]
    assert "without a token" in reason and "observability.token" in reason
    assert "allow_unauthenticated: true" in reason
    assert "0.0.0.0:9108" in str(info.value)


def test_allow_unauthenticated_and_loopback_need_no_token(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '  listen: "0.0.0.0:9108"\n'
                                      "  allow_unauthenticated: true\n"), {})
    assert cfg.observability.token is None and not cfg.observability.on_loopback
    for listen in ("127.0.0.1:9108", "[::1]:9108", "localhost:9108"):
        cfg = load_config(write(tmp_path, f'  listen: "{listen}"\n'), {})
        assert cfg.observability.on_loopback, listen


def test_token_from_file_and_credential(tmp_path: Path) -> None:
    path = token_file(tmp_path)
    cfg = load_config(write(tmp_path, '  listen: "0.0.0.0:9108"\n'
                                      f"  token: ${{file:{path}}}\n"), {})
    assert cfg.observability.token == TOKEN
    assert effective_config(cfg)["observability"]["token"] != TOKEN  # masked when shown
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "metrics-token").write_text("c" * 20)
    cfg = load_config(write(tmp_path, "  token: ${credential:metrics-token}\n"),
                      {"CREDENTIALS_DIRECTORY": str(creds)})
    assert cfg.observability.token == "c" * 20


@pytest.mark.parametrize("value", [TOKEN, '"prefix-${file:/etc/hostname}"', "${METRICS_TOKEN}",
                                   "12345678901234567890"])
def test_token_in_clear_is_refused_naming_the_key(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, f"  token: {value}\n"), {"METRICS_TOKEN": TOKEN})
    assert info.value.key == "observability.token"
    assert "${credential:NAME}" in info.value.reason and "${file:" in info.value.reason
    assert TOKEN not in str(info.value)  # the refused value is not echoed


def test_token_from_environment_must_be_a_reference_too(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {"OPENHQM_OBSERVABILITY__TOKEN": TOKEN})
    assert info.value.key == "observability.token" and TOKEN not in str(info.value)
    path = token_file(tmp_path)
    cfg = load_config(None, {"OPENHQM_OBSERVABILITY__TOKEN": f"${{file:{path}}}"})
    assert cfg.observability.token == TOKEN


def test_unreadable_or_short_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read file") as info:
        load_config(write(tmp_path, f"  token: ${{file:{tmp_path / 'absent'}}}\n"), {})
    assert info.value.key == "observability.token"
    short = token_file(tmp_path, "tooshort")
    with pytest.raises(ConfigError, match="at least 16 printable") as info:
        load_config(write(tmp_path, f"  token: ${{file:{short}}}\n"), {})
    assert info.value.key == "observability.token" and "tooshort" not in str(info.value)


def make_cert(tmp_path: Path, name: str = "server") -> tuple[Path, Path]:
    cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def test_tls_pair_both_or_neither_and_readable(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    cfg = load_config(write(tmp_path, f"  tls_cert_file: {cert}\n  tls_key_file: {key}\n"), {})
    assert (cfg.observability.tls_cert_file, cfg.observability.tls_key_file) == (str(cert),
                                                                                   str(key))
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, f"  tls_cert_file: {cert}\n"), {})
    assert info.value.key == "observability.tls_key_file"
    assert "set both" in info.value.reason
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, f"  tls_key_file: {key}\n"), {})
    assert info.value.key == "observability.tls_cert_file"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, f"  tls_cert_file: {tmp_path / 'nope.crt'}\n"
                                    f"  tls_key_file: {key}\n"), {})
    assert info.value.key == "observability.tls_cert_file"
    assert "cannot read the file" in info.value.reason


def test_tls_key_that_does_not_match_is_an_error(tmp_path: Path) -> None:
    cert, _ = make_cert(tmp_path, "one")
    _, other_key = make_cert(tmp_path, "two")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, f"  tls_cert_file: {cert}\n  tls_key_file: {other_key}\n"),
                    {})
    assert info.value.key == "observability.tls_cert_file"
    assert "cannot load it" in info.value.reason


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bearer_and_basic_accepted_missing_and_wrong_counted() -> None:
    auth = BearerAuth(TOKEN)
    basic = base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
    assert auth.check("10.0.0.1", f"Bearer {TOKEN}") == "ok"
    assert auth.check("10.0.0.1", f"bearer  {TOKEN} ") == "ok"
    assert auth.check("10.0.0.1", f"Basic {basic}") == "ok"
    assert auth.check("10.0.0.1", None) == "missing_token"
    assert auth.check("10.0.0.1", f"Bearer {TOKEN[:-1]}") == "wrong_token"
    assert auth.check("10.0.0.1", f"Bearer {TOKEN}x") == "wrong_token"
    assert auth.check("10.0.0.1", "Basic !!notbase64") == "wrong_token"
    assert auth.check("10.0.0.1", f"Token {TOKEN}") == "wrong_token"
    assert auth.counts == {"missing_token": 1, "wrong_token": 4, "throttled": 0}
    assert 'openhqm_gateway_http_auth_failures_total{reason="wrong_token"} 4' in \
        auth.metric_lines()


def test_throttled_after_limit_within_window_then_released() -> None:
    clock = Clock()
    auth = BearerAuth(TOKEN, limit=3, window=60, block=30, clock=clock)
    assert [auth.check("a", "Bearer x") for _ in range(3)] == ["wrong_token"] * 3
    # blocked: not even the right token is looked at; other addresses are not affected
    assert auth.check("a", f"Bearer {TOKEN}") == "throttled"
    assert auth.check("b", f"Bearer {TOKEN}") == "ok"
    clock.now += 29.9
    assert auth.check("a", f"Bearer {TOKEN}") == "throttled"
    clock.now += 0.2
    assert auth.check("a", f"Bearer {TOKEN}") == "ok"
    assert auth.counts["throttled"] == 2
    # failures spread wider than the window never block
    for _ in range(6):
        assert auth.check("c", "Bearer x") == "wrong_token"
        clock.now += 31
        assert auth.check("c", "Bearer y") == "wrong_token"
        clock.now += 31


def test_success_forgets_failures_and_memory_is_bounded() -> None:
    auth = BearerAuth(TOKEN, limit=3, max_tracked=100)
    auth.check("a", "Bearer x")
    auth.check("a", "Bearer x")
    assert auth.check("a", f"Bearer {TOKEN}") == "ok"
    assert auth.check("a", "Bearer x") == "wrong_token"  # counting starts again
    assert auth.check("a", "Bearer x") == "wrong_token"
    for n in range(5000):
        auth.check(f"10.{n // 256}.{n % 256}.1", None)
    assert auth.tracked == 100
