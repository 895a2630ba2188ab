"""Loading a user's MessageQueueInterface class: by module path or by entry point.

Two routes lead here:

- ``type: custom`` names the class with ``custom_module`` + ``custom_class`` and passes
  ``custom_config`` to its constructor. The module is imported when the uplink is created
  (``create_backend``), not while the config is parsed, so a config can be validated on a
  machine where the plugin is not installed yet.
- An installed distribution declares an entry point in the group ``openhqm_gateway.queues``;
  its name becomes a ``queue.type`` of its own, and the constructor's parameters become the
  flat keys of the ``queue:`` section (``OPENHQM_QUEUE__<KEY>`` works for them too).

Either way the class is checked before it is used: a subclass of MessageQueueInterface with
no abstract method left, whose constructor names its options (no ``**kwargs``), and whose
methods the gateway can call the way it calls them: ``async def connect(self)``,
``async def disconnect(self)``, and ``async def publish(self, queue_name, message, ...,
attributes=...)`` (``message_id=`` is passed only when ``publish`` takes it) or an own
``async def publish_batch(self, queue_name, messages)``. Each of these is a ConfigError with
the reason, so ``config check`` reports it and not the first message. The options
are checked against that constructor by the gateway's own settings parser: an unknown key is
a ConfigError naming it, a missing required one too, and annotated scalar types (str, int,
float, bool, Literal, Optional, list, dict) are converted as for every built-in key. Nothing
is dropped silently.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
import typing
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Literal, Union, get_args, get_origin

from gateway import masking
from gateway.errors import ConfigError
from gateway.queue.interface import MessageQueueInterface
from gateway.settings import parse_dataclass

ENTRY_POINT_GROUP = "openhqm_gateway.queues"

_SCALARS: tuple[Any, ...] = (str, int, float, bool, type(None))
_SIMPLE_DEFAULTS = (str, int, float, bool, type(None))


def plugin_entry_points() -> dict[str, EntryPoint]:
    """Installed plugins by type name (the first one wins when two claim a name)."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)
    return found


def load_entry_point(type_name: str, source: str = "") -> type[MessageQueueInterface]:
    ep = plugin_entry_points().get(type_name)
    if ep is None:
        raise ConfigError("queue.type", type_name,
                          f"no installed plugin declares it (entry point group {ENTRY_POINT_GROUP})",
                          source)
    try:
        loaded = ep.load()
    except Exception as exc:  # the plugin's own import failed: say which and why
        raise ConfigError("queue.type", type_name,
                          f"loading the plugin's entry point {ep.value} failed: "
                          f"{type(exc).__name__}: {exc}", source) from exc
    return check_queue_class(loaded, "queue.type", type_name, source)


def load_module_class(module_name: str, class_name: str, source: str = "") -> type[MessageQueueInterface]:
    """``custom_module`` + ``custom_class`` as a checked class."""
    if not module_name:
        raise ConfigError("queue.custom_module", module_name,
                          "type: custom needs the module that holds your class", source)
    if not class_name:
        raise ConfigError("queue.custom_class", class_name,
                          "type: custom needs the name of your class", source)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigError("queue.custom_module", module_name,
                              f"no module named {exc.name!r}; is the package installed in the "
                              "gateway's environment (or on PYTHONPATH)?", source) from None
        raise ConfigError("queue.custom_module", module_name,
                          f"importing it failed: it needs {exc.name!r}, which is not installed",
                          source) from exc
    except Exception as exc:
        raise ConfigError("queue.custom_module", module_name,
                          f"importing it failed: {type(exc).__name__}: {exc}", source) from exc
    loaded = getattr(module, class_name, None)
    if loaded is None:
        raise ConfigError("queue.custom_class", class_name,
                          f"module {module_name} has no attribute {class_name!r}", source)
    return check_queue_class(loaded, "queue.custom_class", class_name, source)


def check_queue_class(loaded: object, key: str, value: str, source: str) -> type[MessageQueueInterface]:
    if not (isinstance(loaded, type) and issubclass(loaded, MessageQueueInterface)):
        raise ConfigError(key, value, f"{loaded!r} is not a subclass of "
                          "gateway.queue.interface.MessageQueueInterface", source)
    if inspect.isabstract(loaded):
        missing = ", ".join(sorted(getattr(loaded, "__abstractmethods__", ())))
        raise ConfigError(key, value, f"{loaded.__qualname__} does not implement the abstract "
                          f"methods {missing}", source)
    params = inspect.signature(loaded.__init__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        raise ConfigError(key, value, f"{loaded.__qualname__}.__init__ takes **kwargs; name every "
                          "option as a parameter so the gateway can check the keys", source)
    problem = call_problem(loaded)
    if problem:
        raise ConfigError(key, value, f"the gateway cannot call {loaded.__qualname__}: {problem}",
                          source)
    return loaded


#: method -> (placeholder arguments of the gateway's call, how the call reads)
_CALLS: dict[str, tuple[tuple[Any, ...], dict[str, Any], str]] = {
    "connect": ((), {}, "await uplink.connect()"),
    "disconnect": ((), {}, "await uplink.disconnect()"),
    "publish": (("queue", b""), {"attributes": {}},
                "await uplink.publish(queue_name, message, attributes=...)"),
    "publish_batch": (("queue", []), {}, "await uplink.publish_batch(queue_name, messages)"),
}


def call_problem(cls: type[MessageQueueInterface]) -> str:
    """Why the forwarder's calls would fail on ``cls`` (a TypeError at run time), or ''."""
    used = ["connect", "disconnect"]
    # the inherited publish_batch calls publish; an own publish_batch is called directly
    used.append("publish" if cls.publish_batch is MessageQueueInterface.publish_batch
                else "publish_batch")
    for name in used:
        method = getattr(cls, name)
        args, kwargs, call = _CALLS[name]
        if not inspect.iscoroutinefunction(method):
            return f"{name} must be 'async def' (the gateway runs {call})"
        try:
            inspect.signature(method).bind(None, *args, **kwargs)
        except TypeError as exc:
            return f"{call} would fail: {exc}; its signature is {name}{inspect.signature(method)}"
    return ""


@dataclasses.dataclass(frozen=True, slots=True)
class _Option:
    name: str
    annotation: Any
    required: bool
    default: Any
    #: the constructor's default is not a plain value; leave it to the constructor
    opaque_default: bool


def _options(cls: type[MessageQueueInterface]) -> list[_Option]:
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations: take the values as they come
        hints = {}
    out: list[_Option] = []
    for name, p in list(inspect.signature(cls.__init__).parameters.items())[1:]:
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY):
            continue
        required = p.default is inspect.Parameter.empty
        opaque = not required and not isinstance(p.default, _SIMPLE_DEFAULTS)
        default = None if required or opaque else p.default
        annotation = hints.get(name, Any)
        out.append(_Option(name, annotation if _parseable(annotation) else Any,
                           required, default, opaque))
    return out


def _parseable(tp: Any) -> bool:
    """Types gateway.settings converts; anything else is passed through as given."""
    if tp is Any or tp in _SCALARS:
        return True
    origin = get_origin(tp)
    if origin is Literal:
        return True
    if origin in (Union, types.UnionType):
        return all(_parseable(arg) for arg in get_args(tp))
    if origin is list:
        return all(_parseable(arg) for arg in get_args(tp))
    if origin is dict:
        args = get_args(tp)
        return not args or (args[0] is str and _parseable(args[1]))
    return False


def options_class(cls: type[MessageQueueInterface], key: str, source: str) -> type[Any]:
    """A frozen dataclass whose fields are the constructor's options.

    Parsed with gateway.settings.parse_dataclass, it rejects unknown keys (naming
    ``<key>.<name>``), converts environment strings, and masks values whose name looks secret
    (password, token, key, ...; URLs and connection strings keep their address) when the
    effective config is printed."""
    options = _options(cls)

    def check_required(self: Any) -> None:
        for option in options:
            if option.required and getattr(self, option.name) is None:
                raise ConfigError(f"{key}.{option.name}" if key else option.name, None,
                                  f"required by {cls.__qualname__}", source)

    fields = [(o.name, o.annotation | None if o.annotation is not Any else Any,
               dataclasses.field(default=o.default,
                                 metadata={"secret": masking.kind_for_name(o.name)}))
              for o in options]
    made: type[Any] = dataclasses.make_dataclass(
        f"{cls.__name__}Options", fields, namespace={"__post_init__": check_required,
                                                    "queue_class": cls},
        frozen=True)
    return made


def parse_options(cls: type[MessageQueueInterface], raw: object, key: str, source: str) -> Any:
    return parse_dataclass(options_class(cls, key, source), raw, key, source)


def constructor_kwargs(cls: type[MessageQueueInterface], options: Any) -> dict[str, Any]:
    """The parsed options as keyword arguments; an opaque default left unset is not passed."""
    kwargs: dict[str, Any] = {}
    for option in _options(cls):
        value = getattr(options, option.name)
        if value is None and option.opaque_default:
            continue
        kwargs[option.name] = value
    return kwargs


def instantiate(cls: type[MessageQueueInterface], options: Any, key: str,
                source: str) -> MessageQueueInterface:
    try:
        return cls(**constructor_kwargs(cls, options))
    except ConfigError:
        raise
    except Exception as exc:  # the plugin refused its options: that is a config problem
        raise ConfigError(key, "<options>", f"{cls.__qualname__} refused its options: "
                          f"{type(exc).__name__}: {exc}", source) from exc
