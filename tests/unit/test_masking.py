"""Printed config masks only the secret parts: a user sees which server a URL names and
whether an override took effect; passwords and keys never appear."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import effective_config, load_config, parse_config
from gateway.masking import mask_connection_string, mask_url


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://redis:6379/0", "redis://redis:6379/0"),
    ("redis://:hunter2@redis:6379/0", "redis://:***@redis:6379/0"),
    ("rediss://gw:hunter2@cache.example.com:6380/2", "rediss://gw:***@cache.example.com:6380/2"),
    ("redis://gw@redis/0", "redis://gw@redis/0"),
    ("unix://:hunter2@/run/redis.sock?db=1", "unix://:***@/run/redis.sock?db=1"),
    ("redis://redis:6379/0?password=hunter2&db=1", "redis://redis:6379/0?password=***&db=1"),
    ("http://[::1]:8080/x?sig=hunter2", "http://[::1]:8080/x?sig=***"),
    ("not a url hunter2", "***"),
    ("redis://:hunter2@redis:port/0", "***"),
])
def test_urls_keep_their_address_and_lose_their_password(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_connection_strings_keep_the_endpoint_and_hide_the_key() -> None:
    text = ("Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=Root;"
            "SharedAccessKey=hunter2=;EntityPath=hub")
    assert mask_connection_string(text) == ("Endpoint=sb://ns.servicebus.windows.net/;"
                                            "SharedAccessKeyName=Root;SharedAccessKey=***;"
                                            "EntityPath=hub")
    storage = "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=hunter2==;EndpointSuffix=x"
    assert "hunter2" not in mask_connection_string(storage)
    assert "AccountName=acct" in mask_connection_string(storage)
    assert mask_connection_string("SharedAccessSignature=sv=1&sig=hunter2") == (
        "SharedAccessSignature=***")
    assert mask_connection_string("hunter2") == "***"


def _shown(raw: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    if env is not None:
        return effective_config(load_config(None, env))
    return effective_config(parse_config(raw, "test"))


def test_config_check_shows_an_overridden_redis_url() -> None:
    queue = _shown({}, {"OPENHQM_QUEUE__REDIS_URL": "redis://redis:6379/0"})["queue"]
    assert queue["redis_url"] == "redis://redis:6379/0"
    queue = _shown({}, {"OPENHQM_QUEUE__REDIS_URL": "redis://:hunter2@redis:6379/0"})["queue"]
    assert queue["redis_url"] == "redis://:***@redis:6379/0"


def test_event_hubs_strings_show_the_namespace_not_the_key() -> None:
    queue = _shown({"queue": {
        "type": "azure_eventhubs",
        "azure_eventhubs_connection_string":
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=Root;SharedAccessKey=k1",
        "azure_eventhubs_checkpoint_store":
            "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=k2"}})["queue"]
    assert queue["azure_eventhubs_connection_string"].startswith(
        "Endpoint=sb://ns.servicebus.windows.net/;")
    assert "AccountName=acct" in queue["azure_eventhubs_checkpoint_store"]
    assert "k1" not in str(queue) and "k2" not in str(queue)


SECRET = "hunter2-s3cret"


def test_secrets_never_appear() -> None:
    shown = str(_shown({
        "ingress": {"password": SECRET, "tls": {"key_password": SECRET}},
        "queue": {"type": "kafka", "kafka_sasl_password": SECRET,
                  "kafka_ssl_key_password": SECRET}}))
    shown += str(_shown({"queue": {"type": "mqtt", "mqtt_password": SECRET,
                                   "mqtt_key_password": SECRET}}))
    shown += str(_shown({"queue": {
        "type": "custom", "custom_module": "m", "custom_class": "C",
        "custom_config": {"password": SECRET, "api_token": SECRET, "option1": "value1",
                          "connection_string": f"myqueue://user:{SECRET}@localhost:5672",
                          "endpoint_url": "https://queue.example.com/"}}}))
    assert SECRET not in shown
    assert "myqueue://user:***@localhost:5672" in shown  # the custom handler's address
    assert "https://queue.example.com/" in shown and "value1" in shown
