"""Registry of aggregation algorithms: ``build(name, params, **hyperparameters)``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from .._ddp import refuse_ddp_params
from ..core import Aggregator, resolve_hyperparameters

REGISTRY: dict[str, type[Aggregator]] = {}


def register(cls: type[Aggregator]) -> type[Aggregator]:
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"algorithm name {cls.name!r} is empty or already registered")
    REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> type[Aggregator]:
    allowed = ", ".join(sorted(REGISTRY))
    if not isinstance(name, str):
        raise TypeError(f"algorithm name: got {name!r} ({type(name).__name__}), allowed: "
                        f"one of {allowed}")
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; allowed: {allowed}") from None


def list_algorithms() -> dict[str, str]:
    """Registry name -> one-line description."""
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
