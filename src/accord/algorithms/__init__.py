"""Registry of aggregation algorithms: ``build(name, params, **hyperparameters)``.

Built-in algorithms are the modules of this package. Third-party ones arrive as plugins:

* an installed package declares an entry point in the group ``accord.algorithms``, e.g.
  ``[project.entry-points."accord.algorithms"] my_algos = "my_pkg.algos"`` (a module whose
  import registers its classes with :func:`register`, or ``"my_pkg.algos:MyAlgo"``, an
  :class:`~accord.core.Aggregator` subclass registered on load). Entry points load on the
  first registry lookup; one that fails is named in the unknown-algorithm error, never
  fatal for the others.
* a module that is not installed: ``accord train --plugin my_pkg.algos`` (or
  ``--plugin path/to/algos.py``), or :func:`load_plugin` from Python. The CLI hands the
  plugins to every worker (local launcher, torchrun, ``--fault-tolerant``).

Everything the rest of accord asks about an algorithm is declared on its class (the
capability attributes of :class:`~accord.core.Aggregator`); :func:`register` checks the
declaration, so a wrong one fails at import with one line, not deep inside a run.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from .._ddp import refuse_ddp_params
from ..core import DDP_HOOK_FORMS, PHASES, Aggregator, resolve_hyperparameters

REGISTRY: dict[str, type[Aggregator]] = {}


#: plugin spec -> the one-line reason it failed to load
PLUGIN_ERRORS: dict[str, str] = {}
_ENTRY_POINTS_LOADED = False
ENTRY_POINT_GROUP = "accord.algorithms"


def register(cls: type[Aggregator]) -> type[Aggregator]:
    """Class decorator: add an :class:`~accord.core.Aggregator` subclass to the registry
    under ``cls.name`` (ValueError, one line, for a bad name or declaration)."""
    if not (isinstance(cls, type) and issubclass(cls, Aggregator)):
        raise TypeError(f"register: got {cls!r}, allowed: a subclass of "
                        "accord.core.Aggregator")
    name = cls.name
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"algorithm {cls.__name__}: name {name!r}, allowed: a non-empty "
                         "identifier (letters, digits, underscores)")
    if name in REGISTRY:
        if REGISTRY[name] is cls:
            return cls
        raise ValueError(f"algorithm name {name!r} is already registered by "
                         f"{REGISTRY[name].__module__}.{REGISTRY[name].__qualname__}")
    check_declaration(cls)
    REGISTRY[name] = cls
    return cls


def check_declaration(cls: type[Aggregator]) -> None:
    """ValueError (one line) for an inconsistent capability declaration."""
    where = f"algorithm {cls.name!r} ({cls.__qualname__})"
    if cls.phase not in PHASES:
        raise ValueError(f"{where}: phase {cls.phase!r}, allowed: {', '.join(PHASES)}")
    if cls.ddp_hook_form is not None:
        if cls.ddp_hook_form not in DDP_HOOK_FORMS:
            raise ValueError(f"{where}: ddp_hook_form {cls.ddp_hook_form!r}, allowed: None or "
                             f"{', '.join(DDP_HOOK_FORMS)}")
        if cls.phase != "gradient":
            raise ValueError(f"{where}: ddp_hook_form {cls.ddp_hook_form!r} needs phase "
                             "'gradient' (a DDP hook combines gradients)")
        if cls.ddp_hook_form != "average" and not callable(getattr(cls, "combine_", None)):
            raise ValueError(f"{where}: ddp_hook_form {cls.ddp_hook_form!r} needs a "
                             "combine_ method (the hook calls it on the whole gradient)")
    if cls.low_rank and not cls.compressible:
        raise ValueError(f"{where}: low_rank=True needs compressible=True")
    if cls.fault_tolerant is not None and not (
            isinstance(cls.fault_tolerant, str) and cls.fault_tolerant.strip()):
        raise ValueError(f"{where}: fault_tolerant {cls.fault_tolerant!r}, allowed: None "
                         "(refused) or its membership rule as one line")


def load_plugin(spec: str) -> list[str]:
    """Import plugin ``spec`` (``my_pkg.algos``, ``path/to/algos.py``, or either with
    ``:ClassName`` to register one class) and return the algorithm names it added; a
    one-line ValueError when it cannot be loaded or adds nothing."""
    from .._imports import import_target

    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"plugin: got {spec!r}, allowed: my_pkg.algos, path/to/algos.py "
                         "or either with :ClassName")
    before = set(REGISTRY)
    target, attr = spec, ""
    head, sep, tail = spec.rpartition(":")
    if sep and tail.isidentifier() and head:
        target, attr = head, tail
    module = import_target(target, f"plugin {spec!r}", prefix="accord_plugin_")
    if attr:
        cls = getattr(module, attr, None)
        if not (isinstance(cls, type) and issubclass(cls, Aggregator)):
            raise ValueError(f"plugin {spec!r}: {attr!r} is "
                             f"{'missing' if cls is None else type(cls).__name__}, allowed: "
                             "a subclass of accord.core.Aggregator")
        register(cls)
        return [cls.name]
    added = sorted(set(REGISTRY) - before)
    if not added and not any(getattr(c, "__module__", None) == module.__name__
                             for c in REGISTRY.values()):
        raise ValueError(f"plugin {spec!r}: registers no algorithm; allowed: a module whose "
                         "Aggregator subclasses carry @accord.algorithms.register")
    return added


def plugin_source(spec: str) -> dict[str, Any]:
    """What a run records of plugin ``spec`` (loaded): the spec, the file of its module and
    that file's SHA-256."""
    from .._imports import code_source, import_target

    head, sep, tail = spec.rpartition(":")
    target = head if sep and tail.isidentifier() and head else spec
    module = import_target(target, f"plugin {spec!r}", prefix="accord_plugin_")
    return code_source(spec, getattr(module, "__file__", None))


def absolute_spec(spec: str) -> str:
    """``spec`` with a file path made absolute (a run records it so, and a worker or a
    resumed run started elsewhere finds the same file); a module path unchanged."""
    from .._imports import is_file

    if not isinstance(spec, str):
        return spec
    head, sep, tail = spec.rpartition(":")
    target, suffix = (head, sep + tail) if sep and tail.isidentifier() and head else (spec, "")
    if not is_file(target):
        return spec
    import os

    return os.path.abspath(target) + suffix


def load_plugins(specs: Iterable[str] = ()) -> None:
    """Load the installed entry points (once) and then ``specs`` (ValueError for a spec)."""
    global _ENTRY_POINTS_LOADED
    if not _ENTRY_POINTS_LOADED:
        _ENTRY_POINTS_LOADED = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                load_plugin(ep.value)
            except Exception as e:  # noqa: BLE001 - one broken plugin must not stop accord
                PLUGIN_ERRORS[f"entry point {ep.name!r} ({ep.value})"] = (
                    (str(e).splitlines() or [type(e).__name__])[0])
    for spec in specs:
        load_plugin(spec)


def get(name: str) -> type[Aggregator]:
    if name not in REGISTRY:
        load_plugins()
    allowed = ", ".join(sorted(REGISTRY))
    if not isinstance(name, str):
        raise TypeError(f"algorithm name: got {name!r} ({type(name).__name__}), allowed: "
                        f"one of {allowed}")
    try:
        return REGISTRY[name]
    except KeyError:
        failed = "".join(f"; {where} failed to load: {why}"
                         for where, why in PLUGIN_ERRORS.items())
        raise ValueError(f"unknown algorithm {name!r}; allowed: {allowed}{failed}") from None


def list_algorithms() -> dict[str, str]:
    """Registry name -> one-line description."""
    load_plugins()
    return {name: cls.description for name, cls in sorted(REGISTRY.items())}


def validate(
    name: str, hyperparameters: dict[str, Any], world_size: int | None = None
) -> dict[str, Any]:
    """Check an algorithm name and its hyperparameters without a process group; with a
    world size, also the constraints between them."""
    cls = get(name)
    hp = resolve_hyperparameters(name, cls.hyperparameters, hyperparameters)
    if world_size is not None:
        cls.check(hp, world_size)
    return hp


def build(
    name: str,
    params: Iterable[torch.Tensor],
    *,
    group: dist.ProcessGroup | None = None,
    buffers: Iterable[torch.Tensor] | None = None,
    **hyperparameters: Any,
) -> Aggregator:
    """Construct the algorithm registered as ``name`` (collective: call on every rank).

    ``buffers`` (e.g. ``model.buffers()``) lets model-phase algorithms treat BatchNorm
    statistics like parameters; without it they stay local. The parameters of a
    ``DistributedDataParallel`` model are refused (use :func:`accord.ddp_hook` there)."""
    cls = get(name)
    params = refuse_ddp_params(params, "accord.build", name)
    return cls(params, group=group, buffers=buffers, **hyperparameters)


def _import_all() -> None:
    """Import every module of this package: each registers its algorithms."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()
