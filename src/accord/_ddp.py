"""Which parameters belong to a live ``DistributedDataParallel`` model.

An aggregator built on a DDP model's parameters (``accord.wrap``/``accord.build`` on
``ddp.parameters()``) would see gradients DDP has already averaged: ``local_sgd`` becomes
exactly DDP, ``acga`` a normalised mean with twice the traffic, and nothing says so. To
refuse that in one line we need to know, from the parameters alone, whether a DDP model
holds them. Nothing on a parameter says so (DDP's reducer hooks live in C++), and scanning
the garbage collector's objects took 0.33 s per call with Lightning and accelerate
imported (400k objects), so every DDP model is noted when it is built: a global module
registration hook (a public torch API, called when ``DistributedDataParallel.__init__``
assigns ``self.module``) keeps it in a weak set, which costs one function call per
submodule assignment anywhere in the process and nothing per step. DDP models built
before ``import accord`` are not seen.

A DDP model whose only communication hook is :func:`local_gradients` (DDP's allreduce
switched off, as ``accord.integrations.accelerate`` does for model-phase algorithms) is allowed.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

_LIVE: weakref.WeakSet[DistributedDataParallel] = weakref.WeakSet()


def _note(module: torch.nn.Module, name: str, submodule: Any) -> None:
    if isinstance(module, DistributedDataParallel):
        _LIVE.add(module)


torch.nn.modules.module.register_module_module_registration_hook(_note)


def local_gradients(state, bucket):
    """DDP communication hook that leaves each bucket's local gradients as they are: no
    collective, so DDP's gradient averaging is off. (No annotations: DDP compares them
    with its own types as objects.)"""
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def _averages(ddp: DistributedDataParallel) -> bool:
    hooks = getattr(ddp, "_comm_hooks", None)
    return not hooks or any(hook is not local_gradients for hook, _ in hooks)


def owning_ddp(params: list[Any]) -> DistributedDataParallel | None:
    """A live DDP model that averages gradients and holds one of ``params``, or None."""
    ids = {id(p) for p in params}
    for ddp in list(_LIVE):
        module = getattr(ddp, "module", None)
        if isinstance(module, torch.nn.Module) and _averages(ddp) and any(
                id(p) in ids for p in module.parameters()):
            return ddp
    return None


def refuse_ddp_params(params: Any, where: str, algorithm: Any) -> Any:
    """``params``, as a list when it had to be read, unless a DDP model that averages
    gradients holds one of them: then a one-line ValueError naming the fixes. Anything
    that is not an iterable is returned as it is (the aggregator's own checks word the
    error)."""
    if not _LIVE:
        return params  # the usual case: no DDP model alive, nothing to read
    if isinstance(params, torch.Tensor) or not isinstance(params, Iterable):
        return params
    params = list(params)
    if owning_ddp(params) is not None:
        gc.collect()  # a DDP model the user dropped may only wait for the cycle collector
        if owning_ddp(params) is not None:
            raise ValueError(
                f"{where}: the parameters belong to a DistributedDataParallel model, which "
                f"averages the gradients before {algorithm!r} sees them (local_sgd would be "
                "plain DDP, acga a normalised mean at twice the traffic); allowed: the plain "
                "model without DDP (model = ddp.module, drop the DDP wrapper: accord "
                "broadcasts rank 0's weights when it is built), or keep DDP and use "
                "accord.ddp_hook (allreduce, normalized, acga, adasum)")
    return params
