"""Config: the seed's YAML and env variables work verbatim; bad input names key, value, file."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import effective_config, load_config
from gateway.errors import ConfigError

SEED_QUEUES = {
    "redis": """
queue:
  type: redis
  redis_url: "redis://localhost:6379/0"
  request_queue_name: "openhqm-requests"
  response_queue_name: "openhqm-responses"
  dlq_name: "openhqm-dlq"
""",
    "kafka": """
queue:
  type: kafka
  kafka_bootstrap_servers: "localhost:9092,localhost:9093"
  kafka_consumer_group: "openhqm-workers"
  kafka_topics:
    - "openhqm-requests"
    - "openhqm-responses"
""",
    "sqs": """
queue:
  type: sqs
  sqs_region: us-east-1
  sqs_queue_url: "https://sqs.us-east-1.amazonaws.com/123456789/openhqm-requests"
""",
    "azure_eventhubs": """
queue:
  type: azure_eventhubs
  azure_eventhubs_connection_string: "Endpoint=sb://..."
  azure_eventhubs_name: "openhqm"
  azure_eventhubs_consumer_group: "$Default"
  azure_eventhubs_checkpoint_store: "DefaultEndpointsProtocol=https;..."
""",
    "gcp_pubsub": """
queue:
  type: gcp_pubsub
  gcp_project_id: "my-gcp-project"
  gcp_credentials_path: "/path/to/service-account.json"
  gcp_max_messages: 10
""",
    "mqtt": """
queue:
  type: mqtt
  mqtt_broker_host: "mqtt.example.com"
  mqtt_broker_port: 1883
  mqtt_username: "openhqm"
  mqtt_password: "secret"
  mqtt_qos: 1  # 0, 1, or 2
  mqtt_client_id: "openhqm-worker-1"
""",
    "custom": """
queue:
  type: custom
  custom_module: "mycompany.queues.custom_handler"
  custom_class: "MyCustomQueue"
  custom_config:
    connection_string: "myqueue://localhost:5672"
    option1: "value1"
    option2: "value2"
""",
}


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("backend", sorted(SEED_QUEUES))
def test_seed_yaml_is_accepted_verbatim(tmp_path: Path, backend: str) -> None:
    cfg = load_config(write(tmp_path, SEED_QUEUES[backend]), {})
    assert cfg.queue.type == backend


def test_seed_env_variables(tmp_path: Path) -> None:
    env = {
        "OPENHQM_QUEUE__TYPE": "kafka",
        "OPENHQM_QUEUE__KAFKA_BOOTSTRAP_SERVERS": "kafka1:9092,kafka2:9092",
        "OPENHQM_QUEUE__KAFKA_CONSUMER_GROUP": "openhqm-workers",
        "OPENHQM_QUEUE__KAFKA_TOPICS": '["openhqm-requests"]',
        "OPENHQM_INGRESS__PORT": "1884",
    }
    file_without_redis_url = SEED_QUEUES["redis"].replace('  redis_url: "redis://localhost:6379/0"\n', "")
    cfg = load_config(write(tmp_path, file_without_redis_url), env)
    assert cfg.queue.type == "kafka"
    assert cfg.queue.settings.kafka_topics == ["openhqm-requests"]
    assert cfg.queue.settings.kafka_bootstrap_servers == "kafka1:9092,kafka2:9092"
    assert cfg.ingress.port == 1884


def test_custom_config_from_env_json() -> None:
    cfg = load_config(None, {"OPENHQM_QUEUE__TYPE": "custom",
                             "OPENHQM_QUEUE__CUSTOM_CONFIG": '{"connection_string": "x", "option1": "v"}'})
    assert cfg.queue.settings.custom_config == {"connection_string": "x", "option1": "v"}


def test_env_overrides_file_and_units(tmp_path: Path) -> None:
    path = write(tmp_path, "store:\n  max_bytes: 64MB\n  max_age: 2d\n")
    cfg = load_config(path, {"OPENHQM_STORE__MAX_AGE": "90m"})
    assert cfg.store.max_bytes == 64 * 1024**2
    assert cfg.store.max_age == 90 * 60


def test_forwarder_linger_takes_a_duration(tmp_path: Path) -> None:
    path = write(tmp_path, "forwarder:\n  linger: 250ms\n")
    assert load_config(path, {}).forwarder.linger == 0.25
    assert load_config(path, {"OPENHQM_FORWARDER__LINGER": "2s"}).forwarder.linger == 2.0
    assert load_config(write(tmp_path, "forwarder: {}\n"), {}).forwarder.linger == 0.0


@pytest.mark.parametrize(("text", "key", "fragment"), [
    ("ingress:\n  prot: 5\n", "ingress.prot", "unknown key"),
    ("ingress:\n  port: abc\n", "ingress.port", "whole number"),
    ("ingress:\n  port: 70000\n", "ingress.port", "1..65535"),
    ("store:\n  when_full: drop_newest\n", "store.when_full", "must be one of"),
    ("queue:\n  type: rabbitmq\n", "queue.type", "known types: azure_eventhubs"),
    ("queue:\n  type: redis\n  kafka_topics: [a]\n", "queue.kafka_topics", "unknown key"),
    ("ingress:\n  subscriptions:\n    - topic: a/#/b\n", "ingress.subscriptions[0].topic", "filter"),
    ("bogus: 1\n", "bogus", "unknown section"),
    ("store:\n  max_age: soon\n", "store.max_age", "duration"),
    ("forwarder:\n  max_batch_bytes: 0\n", "forwarder.max_batch_bytes", "at least 1 byte"),
    ("forwarder:\n  linger: -1\n", "forwarder.linger", "must not be negative"),
])
def test_bad_config_names_key_value_and_file(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert info.value.key == key
    assert fragment in str(info.value)
    assert path in str(info.value)


def test_unknown_env_variable_is_an_error() -> None:
    with pytest.raises(ConfigError, match="OPENHQM_QUEUEE__TYPE"):
        load_config(None, {"OPENHQM_QUEUEE__TYPE": "redis"})


def test_secrets_are_masked(tmp_path: Path) -> None:
    path = write(tmp_path, "ingress:\n  password: hunter2\nqueue:\n  type: redis\n"
                           "  redis_url: redis://:pw@h:6379/0\n")
    shown = str(effective_config(load_config(path, {})))
    assert "hunter2" not in shown and "pw@h" not in shown
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "ingress:\n  password: [1]\n"), {})
    assert "[1]" not in str(info.value)


def test_variable_expansion(tmp_path: Path) -> None:
    path = write(tmp_path, "ingress:\n  password: ${MQTT_PW}\n  username: ${MQTT_USER:-gw}\n")
    cfg = load_config(path, {"MQTT_PW": "s3cret"})
    assert (cfg.ingress.password, cfg.ingress.username) == ("s3cret", "gw")
    with pytest.raises(ConfigError, match="MQTT_PW is not set"):
        load_config(path, {})


def test_secrets_from_systemd_credentials_and_files(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("pa${HOME}ss\n")  # read verbatim, never expanded
    (tmp_path / "user").write_text("gw-user")
    path = write(tmp_path, "ingress:\n  password: ${credential:mqtt-password}\n"
                           f"  username: ${{file:{tmp_path / 'user'}}}\n")
    cfg = load_config(path, {"CREDENTIALS_DIRECTORY": str(creds), "HOME": "/root"})
    assert (cfg.ingress.password, cfg.ingress.username) == ("pa${HOME}ss", "gw-user")
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY is not set") as info:
        load_config(path, {})
    assert info.value.key == "ingress.password"
    (creds / "mqtt-password").unlink()
    with pytest.raises(ConfigError, match="cannot read credential 'mqtt-password'"):
        load_config(path, {"CREDENTIALS_DIRECTORY": str(creds)})
    relative = write(tmp_path, "ingress:\n  password: ${file:secret.txt}\n")
    with pytest.raises(ConfigError, match="absolute path"):
        load_config(relative, {})


def test_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "queue: [unclosed\n"), {})


def test_sample_config_is_valid_and_documents_every_option() -> None:
    import dataclasses

    from gateway.config import Config
    from gateway.uplinks.redis.settings import RedisSettings

    sample = Path(__file__).resolve().parents[2] / "config" / "gateway.yaml"
    cfg = load_config(str(sample), {})
    text = sample.read_text()
    for section in ("gateway", "ingress", "store", "forwarder", "logging", "observability"):
        for f in dataclasses.fields(getattr(Config(), section)):
            assert f"  {f.name}:" in text, f"config/gateway.yaml lacks {section}.{f.name}"
    for f in dataclasses.fields(RedisSettings):
        assert f"  {f.name}:" in text, f"config/gateway.yaml lacks queue.{f.name}"
    assert cfg.queue.type == "redis"
