"""``openhqm-gateway``: a thin command line over the package.

Exit codes: 0 success, 1 runtime failure, 2 invalid configuration (a missing config file
included), 64 usage error (an unknown command or option; sysexits' EX_USAGE).

``-c/--config`` is accepted before or after the command (``openhqm-gateway -c FILE run`` and
``openhqm-gateway run -c FILE`` mean the same).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

import orjson
import yaml

from gateway import __version__
from gateway.config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_UPLINK,
    ENV_CONFIG_PATH,
    Config,
    effective_config,
    load_config,
)
from gateway.errors import ConfigError, GatewayError, raise_config_errors
from gateway.store.db import Limits, StoreDb
from gateway.store.records import DeadLetter

EXIT_CONFIG = 2
EXIT_USAGE = 64
_CONFIG_HELP = (f"config file (default: ${ENV_CONFIG_PATH}, else {DEFAULT_CONFIG_PATH}; "
                "'none' = defaults and OPENHQM_ variables only)")


class _Parser(argparse.ArgumentParser):
    """argparse with EX_USAGE for usage errors: exit 2 stays "invalid configuration"."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _config_option() -> _Parser:
    """``-c`` for every subcommand. SUPPRESS: a subcommand without it keeps the value given
    before the command instead of resetting it."""
    common = _Parser(add_help=False)
    common.add_argument("-c", "--config", default=argparse.SUPPRESS, help=_CONFIG_HELP)
    return common


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="openhqm-gateway", description="MQTT -> durable local store -> cloud uplink")
    p.add_argument("--version", action="version", version=f"openhqm-gateway {__version__}")
    p.add_argument("-c", "--config", help=_CONFIG_HELP)
    common = [_config_option()]
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run", parents=common, help="run the gateway in the foreground")
    cfg = sub.add_parser("config", parents=common, help="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    cfg_sub.add_parser("check", parents=common,
                       help="validate and print the effective config (secrets masked)")
    status = sub.add_parser("status", parents=common,
                            help="buffer and delivery status, read from the store")
    status.add_argument("--json", action="store_true", help="one JSON object")
    status.add_argument("--uplink", metavar="NAME", help="only this uplink (default: every one)")
    dlq = sub.add_parser("dlq", parents=common, help="the dead-letter table")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    lst = dlq_sub.add_parser("list", parents=common, help="show dead letters, oldest first")
    lst.add_argument("--limit", type=int, default=50, metavar="N",
                     help="show at most N dead letters (default: 50)")
    lst.add_argument("--json", action="store_true", help="one JSON object per line")
    lst.add_argument("--uplink", metavar="NAME", help="only this uplink's (default: every one's)")
    for name, what in (("replay", "move dead letters back into the queue"),
                       ("purge", "delete dead letters for good")):
        cmd = dlq_sub.add_parser(name, parents=common, help=what)
        which = cmd.add_mutually_exclusive_group(required=True)
        which.add_argument("--id", action="append", dest="ids", metavar="MESSAGE_ID",
                           help=f"{name} the dead letter with this id (from 'dlq list'); "
                                "repeat for several")
        which.add_argument("--all", action="store_true", help=f"{name} every dead letter")
        cmd.add_argument("--uplink", metavar="NAME",
                         help=f"{name} only this uplink's dead letters (default: every one's)")
    return p


def _config_path(arg: str | None) -> str | None:
    """The file to read; None for ``none``. A missing file, the default one included, is an
    error naming the path (load_config raises it): defaults alone are asked for with
    ``-c none``, never fallen back to silently."""
    path = arg or os.environ.get(ENV_CONFIG_PATH) or DEFAULT_CONFIG_PATH
    return None if path == "none" else path


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(_config_path(args.config))
    except ConfigError as exc:
        print(f"invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return _dispatch(args, config)
    except ConfigError as exc:
        print(f"invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except GatewayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace, config: Config) -> int:
    if args.command == "config":
        _check_uplink(config)
        print(f"# valid configuration from {config.source}")
        print(yaml.safe_dump(effective_config(config), sort_keys=False), end="")
        return 0
    if args.command == "run":
        return _run(config, _config_path(args.config))
    if args.command == "status":
        return _status(config, as_json=args.json, only=args.uplink)
    return _dlq(args, config)


def _check_uplink(config: Config) -> None:
    """Build every uplink without connecting: a missing extra, a custom class that does not
    load, or an MQTT uplink that would re-ingest its own messages fails here, not at run."""
    from gateway.errors import BackendNotInstalled, NotSupportedError
    from gateway.queue.registry import create_backend

    problems: list[ConfigError] = []
    for u in config.uplinks:
        single = u.name == DEFAULT_UPLINK and len(config.uplinks) == 1
        key = "queue.type" if single else f"uplinks.{u.name}.type"
        try:
            create_backend(config.uplink_view(u))
        except (BackendNotInstalled, NotSupportedError) as exc:
            problems.append(ConfigError(key, u.queue.type, str(exc), config.source))
        except ConfigError as exc:
            problems.extend(exc.all)
    raise_config_errors(problems)


def _run(config: Config, path: str | None) -> int:
    from gateway.observability.logs import setup_logging
    from gateway.service import run_gateway

    _check_state_dir(config)
    setup_logging(config.logging)
    # SIGHUP reads the same file, environment and credentials again
    asyncio.run(run_gateway(config, loader=lambda: load_config(path)))
    return 0


def _check_state_dir(config: Config) -> None:
    """The store's directory exists (or can be made) and is writable: said in one line, not
    as a traceback from deep in the store (a first run as a user who cannot write
    /var/lib/openhqm-gateway)."""
    directory = os.path.dirname(os.path.abspath(config.store_path))
    try:
        os.makedirs(directory, exist_ok=True)
        writable = os.access(directory, os.W_OK | os.X_OK)
        reason = "not writable by this user"
    except OSError as exc:
        writable, reason = False, exc.strerror or str(exc)
    if not writable:
        raise GatewayError(f"cannot keep the store in {directory}: {reason}. Create it for this "
                           "user, run as the service user, or set gateway.state_dir "
                           "(OPENHQM_GATEWAY__STATE_DIR)")


def _open_db(config: Config, readonly: bool) -> StoreDb:
    """The store as a reader, or (``readonly=False``) as a side user that writes dead letters
    and replays only: the daemon may own it meanwhile."""
    db = StoreDb(config.store_path, Limits.from_config(config.store), readonly=readonly,
                 owner=False)
    if readonly and not os.path.exists(config.store_path):
        raise GatewayError(f"no store at {config.store_path} (has the gateway run yet?)")
    try:
        db.open()
    except Exception as exc:
        raise GatewayError(f"cannot open the store {config.store_path}: {exc}") from exc
    return db


def status_report(config: Config, only: str | None = None) -> dict[str, Any]:
    """Store and per-uplink figures, read from the file: every configured uplink, and any other
    queue the store holds (a ``type: sqlite`` backend's); ``only`` picks one uplink."""
    from gateway.forwarder import UPLINK_QUEUE
    from gateway.store.db import Destination

    db = _open_db(config, readonly=True)
    try:
        now = time.time()
        types = {u.name: _uplink_label(config.uplink_view(u)) for u in config.uplinks}
        db.register(UPLINK_QUEUE, [Destination(u.name, tuple(u.topics)) for u in config.uplinks])
        names = [*types, *sorted(n for n in db.queues() if n not in types and n != UPLINK_QUEUE)]
        if only is not None:
            if only not in names:
                raise GatewayError(f"no uplink {only!r}; configured: {', '.join(types)}")
            names = [only]
        uplinks: dict[str, Any] = {}
        for name in names:
            st = db.stats(name, now)
            uplinks[name] = {
                "type": types.get(name, "sqlite"),
                "depth": st.depth, "in_flight": st.in_flight,
                "oldest_age_seconds": None if st.oldest_age_seconds is None
                else round(st.oldest_age_seconds, 3),
                "dead_letter": st.dead_letter, "delivered_total": st.delivered_total,
                "dropped": st.dropped,
            }
        quarantined = db.counter(UPLINK_QUEUE, "quarantined_files")
        return {"store": {"path": config.store_path, "bytes": db.file_bytes(),
                          "messages": db.count, "quarantined_files": quarantined,
                          "unrouted": db.counter(UPLINK_QUEUE, "unrouted")},
                "uplinks": uplinks}
    finally:
        db.close()


def _uplink_label(config: Config) -> str:
    """The uplink as logs and metrics name it: ``type: custom`` by its class."""
    custom_class = getattr(config.queue.settings, "custom_class", "")
    if config.queue.type == "custom" and custom_class:
        return f"custom ({custom_class})"
    return config.queue.type


def _status(config: Config, as_json: bool, only: str | None = None) -> int:
    report = status_report(config, only)
    if as_json:
        print(orjson.dumps(report).decode())
        return 0
    store = report["store"]
    print(f"store    {store['path']}: {store['messages']} messages, {store['bytes']} bytes on disk")
    if store["quarantined_files"]:
        print(f"WARNING  {store['quarantined_files']} damaged store file(s) were moved aside "
              f"(<path>.corrupt-*); see the log")
    for name, u in report["uplinks"].items():
        age = "-" if u["oldest_age_seconds"] is None else f"{u['oldest_age_seconds']:.1f}s"
        in_flight = "-" if u["in_flight"] is None else u["in_flight"]
        dropped = ", ".join(f"{k}={v}" for k, v in sorted(u["dropped"].items())) or "none"
        print(f"uplink   {name} ({u['type']}): depth {u['depth']}, in flight {in_flight}, "
              f"oldest {age}, delivered {u['delivered_total']}, dead letters {u['dead_letter']}, "
              f"dropped {dropped}")
    return 0


def _dead_letter_json(d: DeadLetter) -> dict[str, Any]:
    try:
        body: Any = d.payload.decode("utf-8")
        encoding = "utf-8"
    except UnicodeDecodeError:
        body, encoding = d.payload.hex(), "hex"
    return {"id": d.id, "queue": d.queue, "topic": d.topic, "reason": d.reason,
            "attempts": d.attempts, "received_at": d.received_at, "failed_at": d.failed_at,
            "bytes": len(d.payload), "payload": body, "payload_encoding": encoding,
            "attributes": d.attributes}


def _dlq(args: argparse.Namespace, config: Config) -> int:
    if args.dlq_command == "list":
        db = _open_db(config, readonly=True)
        try:
            letters = db.list_dead(_uplink_arg(args, config), args.limit)
        finally:
            db.close()
        for d in letters:
            if args.json:
                print(orjson.dumps(_dead_letter_json(d)).decode())
            else:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d.failed_at))
                print(f"{d.id}  {when}  {d.topic}  {len(d.payload)}B  {d.reason}")
        if not args.json:
            print(f"{len(letters)} dead letter(s) shown")
        return 0
    db = _open_db(config, readonly=False)
    try:
        ids = None if args.all else list(args.ids)
        only = _uplink_arg(args, config)
        if args.dlq_command == "replay":
            n = db.replay_dead(only, ids)
            print(f"replayed {n} dead letter(s) into the queue")
        else:
            n = db.purge_dead(only, ids)
            print(f"purged {n} dead letter(s)")
    finally:
        db.close()
    return 0


def _uplink_arg(args: argparse.Namespace, config: Config) -> str | None:
    name: str | None = getattr(args, "uplink", None)
    if name is not None and name not in {u.name for u in config.uplinks}:
        raise GatewayError(f"no uplink {name!r}; configured: "
                           f"{', '.join(u.name for u in config.uplinks)}")
    return name


if __name__ == "__main__":
    raise SystemExit(main())
