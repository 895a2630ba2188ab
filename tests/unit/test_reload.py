"""gateway/reload.py: which changes of a reloaded config apply live and which wait."""

from __future__ import annotations

from typing import Any

from gateway.config import Config, ObservabilityConfig, parse_config
from gateway.observability.http import Snapshot, readiness, readiness_notes, render_metrics
from gateway.reload import plan_reload


def single(**sections: Any) -> Config:
    raw: dict[str, Any] = {"queue": {"type": "redis", "redis_url": "redis://:old@127.0.0.1:1/0"}}
    raw.update(sections)
    return parse_config(raw, "test.yaml")


def several(a: dict[str, Any] | None = None, b: dict[str, Any] | None = None,
            **sections: Any) -> Config:
    uplinks = {"a": {"type": "redis", "redis_url": "redis://127.0.0.1:1/0", "topics": ["a/#"],
                     **(a or {})},
               "b": {"type": "redis", "redis_url": "redis://127.0.0.1:2/0", **(b or {})}}
    return parse_config({"uplinks": uplinks, **sections}, "test.yaml")


def test_nothing_changed() -> None:
    plan = plan_reload(single(), single())
    assert not plan.changed and not plan.rebuild and not plan.forwarders
    assert plan.config == single()


def test_log_level_applies_live() -> None:
    plan = plan_reload(single(), single(logging={"level": "DEBUG"}))
    assert plan.live == ["logging.level"] and plan.restart == []
    assert plan.log_level == "DEBUG" and plan.config.logging.level == "DEBUG"


def test_logging_format_needs_a_restart() -> None:
    plan = plan_reload(single(), single(logging={"format": "json"}))
    assert plan.restart == ["logging.format"] and plan.log_level is None
    assert plan.config.logging.format == "text"


def test_credentials_rebuild_the_backend_and_keep_the_rest() -> None:
    new = single(queue={"type": "redis", "redis_url": "redis://:new@127.0.0.1:1/0"})
    plan = plan_reload(single(), new)
    assert plan.live == ["queue.redis_url"] and plan.restart == []
    assert list(plan.rebuild) == ["default"]
    assert plan.config.queue.settings.redis_url == "redis://:new@127.0.0.1:1/0"
    assert plan.config.uplinks[0].queue == plan.config.queue


def test_store_path_and_ingress_wait_for_a_restart() -> None:
    old = single()
    plan = plan_reload(old, single(store={"path": "/elsewhere/store.db"},
                                   ingress={"port": 1884}, gateway={"id": "other"}))
    assert sorted(plan.restart) == ["gateway.id", "ingress.port", "store.path"]
    assert plan.live == [] and plan.config.store == old.store
    assert plan.config.ingress == old.ingress and plan.config.gateway == old.gateway


def test_forwarder_settings_apply_live_but_max_attempts_waits() -> None:
    plan = plan_reload(single(), single(forwarder={"batch_size": 7, "max_rate": 10,
                                                   "max_attempts": 3}))
    assert sorted(plan.live) == ["forwarder.batch_size", "forwarder.max_rate"]
    assert plan.restart == ["forwarder.max_attempts"]
    fwd = plan.forwarders["default"].forwarder
    assert (fwd.batch_size, fwd.max_rate, fwd.max_attempts) == (7, 10, 0)
    assert not plan.rebuild


def test_several_uplinks_named_by_uplink() -> None:
    plan = plan_reload(several(), several(a={"forwarder": {"retry_max_delay": "5s"}},
                                          b={"redis_url": "redis://127.0.0.1:3/0"}))
    assert sorted(plan.live) == ["uplinks.a.forwarder.retry_max_delay", "uplinks.b.redis_url"]
    assert list(plan.forwarders) == ["a"] and list(plan.rebuild) == ["b"]


def test_topics_and_added_or_removed_uplinks_need_a_restart() -> None:
    old = several()
    new = parse_config({"uplinks": {
        "a": {"type": "redis", "redis_url": "redis://127.0.0.1:1/0", "topics": ["x/#"]},
        "c": {"type": "redis"}}}, "test.yaml")
    plan = plan_reload(old, new)
    assert sorted(plan.restart) == ["uplinks.a.topics", "uplinks.b", "uplinks.c"]
    assert [u.name for u in plan.config.uplinks] == ["a", "b"]
    assert plan.config.uplinks[0].topics == ["a/#"]


def test_secrets_are_named_not_shown() -> None:
    new = single(queue={"type": "redis", "redis_url": "redis://:sekrit@127.0.0.1:1/0"})
    plan = plan_reload(single(), new)
    assert "sekrit" not in " ".join(plan.live + plan.restart)


def test_a_later_reload_names_the_waiting_keys_again() -> None:
    new = single(store={"path": "/elsewhere/store.db"})
    first = plan_reload(single(), new)
    assert plan_reload(first.config, new).restart == ["store.path"]


def test_a_refused_reload_is_a_metric_and_a_readiness_note_not_a_failure() -> None:
    def snap(error: str) -> Snapshot:
        return Snapshot(taken_at=0, started_at=0, ingress_connected=True, store_ok=True,
                        store_messages=0, store_bytes=0, store_file_bytes=0, commits=0,
                        commit_seconds_total=0.0, uplinks=[],
                        counters={"config_reloads": 2, "config_reload_failures": 1},
                        config_reload_error=error)

    refused = snap("forwarder.batch_size='lots': expected an integer")
    text = render_metrics(refused)
    assert "openhqm_gateway_config_reloads_total 2" in text
    assert "openhqm_gateway_config_reload_failures_total 1" in text
    assert "openhqm_gateway_config_last_reload_success 0" in text
    assert readiness(refused, ObservabilityConfig()) == []
    assert "forwarder.batch_size" in readiness_notes(refused)[0]
    assert "openhqm_gateway_config_last_reload_success 1" in render_metrics(snap(""))
    assert readiness_notes(snap("")) == []
