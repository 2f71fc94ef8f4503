"""A run setting declared once: a dataclass field whose metadata drives everything else.

:func:`setting` makes the field of :class:`accord.run.config.TrainConfig`; from its metadata
come the ``accord train`` option (:func:`add_arguments`), the config built from parsed
options (:func:`from_args`), the argument list that rebuilds a config in a worker process
(:func:`to_argv`), the words of a one-line validation error (``allowed``), whether
``--set`` reaches it, whether a resumed run may change it, the value an older record that
lacks it ran with, and whether it belongs to the fault-tolerant mode. A new setting is
one field here and its check in :func:`accord.run.validation.validate`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Iterator
from typing import Any

_UNSET: Any = object()


def setting(
    default: Any = _UNSET,
    *,
    help: str,  # noqa: A002 - argparse's word
    factory: Callable[[], Any] | None = None,
    allowed: str | None = None,
    flag: str | None = None,
    metavar: str | None = None,
    cli: bool = True,
    settable: bool = False,
    resumable: bool = False,
    added: Any = _UNSET,
    ft: bool = False,
    parse_default: Any = _UNSET,
    const: Any = _UNSET,
) -> Any:
    """A config field. ``help``: the option's help; ``allowed``: what it allows, in words
    (for errors); ``flag``: the option (default ``--name-with-dashes``); ``cli=False``: no
    option of its own; ``settable``: reachable with ``--set key=value``; ``resumable``: a
    resumed run may change it; ``added``: the value a record written before the field
    existed ran with; ``ft``: a fault-tolerant setting (recorded only in such runs);
    ``parse_default``: the option's default when it differs from the field's (None: "not
    given", resolved later); ``const``: the value of the bare option (``nargs="?"``)."""
    meta = {"help": help, "allowed": allowed, "flag": flag, "metavar": metavar, "cli": cli,
            "settable": settable, "resumable": resumable, "ft": ft}
    for key, value in (("added", added), ("parse_default", parse_default), ("const", const)):
        if value is not _UNSET:
            meta[key] = value
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def fields(cls: type) -> Iterator[dataclasses.Field]:
    """The fields of ``cls`` declared with :func:`setting`."""
    return (f for f in dataclasses.fields(cls) if "help" in f.metadata)


def names(cls: type, key: str) -> tuple[str, ...]:
    """The fields whose metadata ``key`` is true (``settable``, ``resumable``, ``ft``)."""
    return tuple(f.name for f in fields(cls) if f.metadata.get(key))


def added_defaults(cls: type) -> dict[str, Any]:
    """Field -> the value a record written before the field existed ran with."""
    return {f.name: f.metadata["added"] for f in fields(cls) if "added" in f.metadata}


def allowed(cls: type, name: str) -> str | None:
    """What field ``name`` allows, in words, or None when it is not declared."""
    for f in fields(cls):
        if f.name == name:
            return f.metadata["allowed"]
    return None


def _kind(f: dataclasses.Field) -> str:
    """"bool", "int", "float", "list" or "str" from the field's annotation (a string)."""
    text = str(f.type)
    for kind in ("bool", "list", "int", "float"):
        if text.startswith(kind):
            return kind
    return "str"


def _flag(f: dataclasses.Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per declared field (bool: a switch; list: repeatable; a field whose
    default is True: ``--no-<name>``)."""
    for f in fields(cls):
        if not f.metadata["cli"]:
            continue
        kind, default, flag = _kind(f), f.metadata.get("parse_default", _default(f)), _flag(f)
        extra: dict[str, Any] = {"help": f.metadata["help"], "dest": f.name}
        if f.metadata["metavar"]:
            extra["metavar"] = f.metadata["metavar"]
        if kind == "bool":
            extra.pop("metavar", None)
            action = "store_false" if default else "store_true"
            parser.add_argument(flag, action=action, default=default, **extra)
        elif kind == "list":
            parser.add_argument(flag, action="append", default=[], **extra)
        else:
            convert = {"int": int, "float": float}.get(kind)
            if convert:
                extra["type"] = convert
            if "const" in f.metadata:
                extra.update(nargs="?", const=f.metadata["const"])
            parser.add_argument(flag, default=default, **extra)


def from_args(cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """The config the parsed options describe (``given`` overrides them)."""
    values = {}
    for f in fields(cls):
        if f.metadata["cli"]:
            value = getattr(args, f.name)
            if "parse_default" in f.metadata and value == f.metadata["parse_default"]:
                continue  # not given: the field's own default
            values[f.name] = list(value) if isinstance(value, list) else value
    return cls(**{**values, **given})


def to_argv(cfg: Any) -> list[str]:
    """Options that rebuild ``cfg`` through :func:`add_arguments` (for worker processes):
    every setting that differs from its default, and ``--set algo.KEY=VALUE`` for the
    algorithm's hyperparameters."""
    argv: list[str] = []
    ft = bool(getattr(cfg, "fault_tolerant", False))
    for f in fields(type(cfg)):
        if not f.metadata["cli"] or (f.metadata["ft"] and not ft):
            continue
        value, default, flag, kind = getattr(cfg, f.name), _default(f), _flag(f), _kind(f)
        if kind == "bool":
            if bool(value) != bool(default):
                argv.append(flag)
        elif kind == "list":
            for item in value:
                argv += [flag, str(item)]
        elif "const" in f.metadata and value is f.metadata["const"]:
            argv.append(flag)  # the bare option (e.g. --respawn)
        elif value != default:
            if value is None:
                continue  # back to the default, which is None only for optional fields
            argv += [flag, repr(value) if kind == "float" else str(int(value))
                     if kind == "int" else str(value)]
    for key, value in getattr(cfg, "hyperparameters", {}).items():
        if value is None:  # an unset optional hyperparameter
            continue
        text = json.dumps(value) if isinstance(value, bool) else str(value)
        argv += ["--set", f"algo.{key}={text}"]
    return argv
