"""Reload (SIGHUP): what of a newly read config the running daemon takes, and what waits.

``plan_reload(running, new)`` compares the config the daemon runs with the one just read
(file + OPENHQM_ environment + credentials, by the same ``load_config`` as at start) and
returns a ``ReloadPlan``:

- applied live: ``logging.level``; an uplink's forwarder settings (batch size, byte limit,
  rate, retry delays, publish timeout, routes), taken by its forwarder between batches; an
  uplink's backend settings (``type``, URL, credentials, names...): that uplink's forwarder
  is stopped (its in-flight batch released to the store), its backend closed and built
  again, and a new forwarder drains the same store cursor.
- needs a restart, named and not applied: ``gateway.*``, ``store.*``, ``ingress.*``,
  ``observability.*``, ``logging`` other than ``level``, uplinks added or removed, an
  uplink's ``topics``, ``forwarder.max_attempts`` (both registered with the store at start)
  and ``downlink`` settings, and the backend settings of an uplink whose downlink is
  enabled (the downlink holds its own client).

Invariants: the plan never names a secret's value (keys only); ``plan.config`` is the config
the daemon runs after the reload: the new one with every needs-restart part kept as it runs
now, so a later reload names those keys again until the restart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from gateway.config import DEFAULT_UPLINK, Config, UplinkConfig
from gateway.downlink.settings import DownlinkConfig
from gateway.settings import to_plain

#: top-level sections taken only at start
RESTART_SECTIONS = ("gateway", "store", "ingress", "observability")
#: logging keys applied live
LIVE_LOGGING = frozenset({"level"})
#: forwarder keys registered with the store at start
RESTART_FORWARDER = frozenset({"max_attempts"})
#: compared separately (needs a restart)
_NO_DOWNLINK = DownlinkConfig()


@dataclass(slots=True)
class ReloadPlan:
    #: the config to run from now on
    config: Config
    #: dotted keys that changed and wait for a restart
    restart: list[str] = field(default_factory=list)
    #: dotted keys that changed and are applied now
    live: list[str] = field(default_factory=list)
    #: the new logging level, when it changed
    log_level: str | None = None
    #: uplink name -> its new forwarder settings (backend unchanged)
    forwarders: dict[str, UplinkConfig] = field(default_factory=dict)
    #: uplinks whose backend is rebuilt (with their forwarder)
    rebuild: dict[str, UplinkConfig] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.restart or self.live)


def changed_keys(old: Any, new: Any, prefix: str) -> list[str]:
    """Dotted keys whose values differ between two dataclass trees (lists compared whole)."""
    return _diff(to_plain(old, mask=False), to_plain(new, mask=False), prefix)


def _diff(old: Any, new: Any, prefix: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys: list[str] = []
        for k in [*old, *(k for k in new if k not in old)]:
            keys += _diff(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return keys
    return [] if old == new else [prefix]


def _single(cfg: Config) -> bool:
    return len(cfg.uplinks) == 1 and cfg.uplinks[0].name == DEFAULT_UPLINK


def plan_reload(running: Config, new: Config) -> ReloadPlan:
    plan = ReloadPlan(running)
    for section in RESTART_SECTIONS:
        plan.restart += changed_keys(getattr(running, section), getattr(new, section), section)
    for key in changed_keys(running.logging, new.logging, "logging"):
        (plan.live if key == "logging.level" else plan.restart).append(key)
    if running.logging.level != new.logging.level:
        plan.log_level = new.logging.level
    single = _single(running) and _single(new)
    new_uplinks = {u.name: u for u in new.uplinks}
    old_names = {u.name for u in running.uplinks}
    if not single:
        plan.restart += [f"uplinks.{n}" for n in new_uplinks if n not in old_names]
        plan.restart += [f"uplinks.{u.name}" for u in running.uplinks
                         if u.name not in new_uplinks]
    uplinks = [_plan_uplink(plan, u, new_uplinks.get(u.name), single)
               for u in running.uplinks]
    logging_ = dataclasses.replace(running.logging, level=new.logging.level)
    plan.config = dataclasses.replace(
        running, logging=logging_, uplinks=uplinks, queue=uplinks[0].queue,
        forwarder=uplinks[0].forwarder if single else running.forwarder, source=new.source)
    return plan


def _plan_uplink(plan: ReloadPlan, old: UplinkConfig, new: UplinkConfig | None,
                 single: bool) -> UplinkConfig:
    """What of one uplink's new settings runs now; records its keys in the plan."""
    if new is None:
        return old
    qkey = "queue" if single else f"uplinks.{old.name}"
    fkey = "forwarder" if single else f"uplinks.{old.name}.forwarder"
    topics = changed_keys(old.topics, new.topics, f"{qkey}.topics")
    downlink = changed_keys(old.queue.downlink, new.queue.downlink, f"{qkey}.downlink")
    # the backend's own keys sit beside the common ones, as in the file
    backend = [k.replace(f"{qkey}.settings.", f"{qkey}.")
               for k in changed_keys(dataclasses.replace(old.queue, downlink=_NO_DOWNLINK),
                                     dataclasses.replace(new.queue, downlink=_NO_DOWNLINK),
                                     qkey)
               if not k.startswith(f"{qkey}.downlink")]
    fwd = changed_keys(old.forwarder, new.forwarder, fkey)
    fwd_restart = [k for k in fwd if k.rpartition(".")[2] in RESTART_FORWARDER]
    fwd_live = [k for k in fwd if k not in fwd_restart]
    plan.restart += topics + downlink + fwd_restart
    forwarder = dataclasses.replace(new.forwarder, **{
        k: getattr(old.forwarder, k) for k in RESTART_FORWARDER})
    queue = old.queue
    if backend and (old.queue.downlink.enabled or new.queue.downlink.enabled):
        plan.restart += backend  # the downlink's own client keeps the old settings
    elif backend:
        queue = dataclasses.replace(new.queue, downlink=old.queue.downlink)
        plan.live += backend
    plan.live += fwd_live
    running = dataclasses.replace(old, queue=queue, forwarder=forwarder)
    if queue is not old.queue:
        plan.rebuild[old.name] = running
    elif fwd_live:
        plan.forwarders[old.name] = running
    return running

