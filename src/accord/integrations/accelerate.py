"""Hugging Face accelerate: accord's algorithms in an ``Accelerator`` training script.

::

    accelerator = Accelerator()                  # Accelerator(cpu=True) on CPU
    model, optimizer, agg = accord.integrations.accelerate.prepare(accelerator, model, optimizer,
                                                      "acga", momentum=0.99)
    loader = accelerator.prepare(loader)         # data loaders, schedulers: as usual

:func:`prepare` stands in for ``accelerator.prepare(model, optimizer)`` and returns what
that returns plus the accord :class:`~accord.Aggregator`. Needs ``pip install
'accord[accelerate]'``; ``import accord`` does not import this module.

Two paths, chosen from the algorithm: gradient-phase algorithms run as the DDP hook of
:func:`accord.ddp_hook` on the DDP model accelerate built (the aggregator registered for
``save_state``); every other algorithm runs inside the optimizer through
:func:`accord.wrap` (before accelerate wraps it, so once per real step), with DDP's
gradient allreduce and buffer broadcast switched off.

Decisions (each in full: docs/design/integrations.md): no second initial broadcast; under
fp16's scaler ``acga`` and ``normalized`` move into the optimizer; LSGD needs
:func:`note_loss`; ``clip_grad_norm=`` clips each rank's gradient before it is combined;
refused in one line: one process, DeepSpeed / FSDP / XLA / tensor parallelism, a
``comm_hook`` of the user's, already-prepared objects and ``sync_each_batch=True`` with a
nonlinear gradient algorithm; ``save_state`` keeps rank 0's replica."""

from __future__ import annotations

import os
import weakref
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .._ddp import local_gradients
from .._extras import require
from ..algorithms import get, validate
from ..core import Aggregator
from .ddp_hooks import check_clip_grad_norm, ddp_hook
from .wrap import AggregatedOptimizer

# here, not at call time: importing this module is the user's statement of intent, and a
# missing accelerate is best reported by that import (one line naming the pip extra)
accelerate = require("accelerate", "accelerate")
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402
from accelerate.utils import DDPCommunicationHookType, DistributedType  # noqa: E402

__all__ = ["note_loss", "prepare"]

# AcceleratedOptimizers returned on the hook path (note_loss accepts them as no-ops)
_HOOKED: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()


class _StepWithNotedLoss(AggregatedOptimizer):
    """An :class:`~accord.AggregatedOptimizer` whose ``step`` (called by accelerate's
    ``AcceleratedOptimizer.step``, which passes no loss) uses the mean of the losses given
    to :meth:`note_loss` since the previous step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        # the AcceleratedOptimizer around this one (set by prepare), told about AMP skips
        self.accelerated: weakref.ref[AcceleratedOptimizer] | None = None

    def note_loss(self, loss: torch.Tensor | float) -> None:
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError("accord.integrations.accelerate.note_loss: got a tensor of shape "
                                 f"{tuple(loss.shape)}, allowed: one number")
            value = loss.detach().reshape(()).float()
        elif isinstance(loss, int | float) and not isinstance(loss, bool):
            value = torch.tensor(float(loss))  # host: a Python float; moved on first sum
        else:
            raise TypeError(f"accord.integrations.accelerate.note_loss: got {type(loss).__name__}, "
                            "allowed: a 1-element tensor or a float")
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value.to(
            self._loss_sum.device)
        self._loss_count += 1

    def step(  # type: ignore[override]
        self, closure: Any = None, *, loss: torch.Tensor | float | None = None,
        healthy: bool = True,
    ) -> Any:
        if loss is None and self._loss_sum is not None:
            loss = self._loss_sum / self._loss_count
        self._loss_sum, self._loss_count = None, 0
        if loss is None and self.aggregator.reads_loss:
            raise RuntimeError(
                f"accord.integrations.accelerate: {self.aggregator.name} needs the training "
                "loss; call accord.integrations.accelerate.note_loss(optimizer, loss) after each "
                "backward, before "
                "optimizer.step()")
        skipped = self.skipped_steps
        out = super().step(closure, loss=loss, healthy=healthy)
        outer = self.accelerated() if self.accelerated is not None else None
        if self.skipped_steps != skipped and hasattr(outer, "_accelerate_step_called"):
            # accelerate infers a skip from its patched inner step not being called; this
            # step is always called (the skip is agreed across ranks inside it), so say it
            outer._accelerate_step_called = False
        return out


def note_loss(optimizer: torch.optim.Optimizer, loss: torch.Tensor | float) -> None:
    """Give this rank's training loss of a micro-batch to the aggregator behind
    ``optimizer`` (the one :func:`prepare` returned). The next real optimizer step passes
    the mean of the losses noted since the previous one. Needed by ``lsgd``; a no-op for
    algorithms that do not read the loss. Local: no communication, no host read."""
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, _StepWithNotedLoss):
        inner.note_loss(loss)
    elif optimizer not in _HOOKED:
        raise TypeError("accord.integrations.accelerate.note_loss: got "
                        f"{type(optimizer).__name__}, "
                        "allowed: the optimizer accord.integrations.accelerate.prepare returned")


def _find_ddp(model: nn.Module) -> DistributedDataParallel | None:
    """The DDP module ``accelerator.prepare`` returned, under a torch.compile wrapper."""
    while not isinstance(model, DistributedDataParallel):
        model = getattr(model, "_orig_mod", None)
        if model is None:
            return None
    return model


def _check(accelerator: Any, model: Any, optimizer: Any, algorithm: Any,
           hyperparameters: dict[str, Any], clip_grad_norm: Any) -> None:
    """Every refusal, before anything is prepared or communicated (same on every rank)."""
    where = "accord.integrations.accelerate.prepare"
    check_clip_grad_norm(clip_grad_norm, where)
    if not isinstance(accelerator, accelerate.Accelerator):
        raise TypeError(f"{where}: accelerator is {type(accelerator).__name__}, allowed: an "
                        "accelerate.Accelerator")
    get(algorithm)  # unknown name: one line listing the registered ones
    kind = accelerator.distributed_type
    if kind == DistributedType.NO or accelerator.num_processes < 2:
        hint = ""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and accelerator.device.type == "cpu":
            hint = " (on CPU accelerate needs Accelerator(cpu=True) to see the other processes)"
        raise RuntimeError(
            f"{where}: the accelerator runs one process{hint}; allowed: a multi-process run, "
            "launched by torchrun --nproc_per_node N or accelerate launch --multi_gpu "
            "(N >= 2); for one process use accelerator.prepare without accord")
    if not kind.name.startswith("MULTI_") or getattr(accelerator, "parallelism_config",
                                                           None) is not None:
        what = "a parallelism_config" if kind.name.startswith("MULTI_") else kind.name
        raise ValueError(f"{where}: {what} is not supported; allowed: plain data parallelism "
                         "(DistributedType MULTI_GPU, MULTI_CPU and the other MULTI_* types, "
                         "where accelerate wraps the model in DistributedDataParallel)")
    validate(algorithm, hyperparameters, accelerator.num_processes)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model is {type(model).__name__}, allowed: a torch.nn.Module")
    if isinstance(model, DistributedDataParallel) or getattr(model, "_is_accelerate_prepared",
                                                             False):
        raise ValueError(f"{where}: the model was already prepared or wrapped in "
                         "DistributedDataParallel; allowed: the plain model (prepare wraps it)")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if not trainable:
        raise ValueError(f"{where}: the model has no parameters that require gradients; "
                         "allowed: a model with trainable parameters")
    if isinstance(optimizer, AcceleratedOptimizer):
        raise ValueError(f"{where}: the optimizer was already prepared by accelerator.prepare; "
                         "allowed: the plain torch optimizer (prepare wraps it)")
    if isinstance(optimizer, AggregatedOptimizer):
        raise ValueError(f"{where}: the optimizer was already wrapped by accord.wrap; allowed: "
                         "the plain torch optimizer (prepare wraps it where needed)")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{where}: optimizer is {type(optimizer).__name__}, allowed: a "
                        "torch.optim.Optimizer over the model's parameters")
    if any(id(p) not in trainable for g in optimizer.param_groups for p in g["params"]):
        raise ValueError(f"{where}: the optimizer holds a tensor that is not a trainable "
                         "parameter of the model; allowed: an optimizer over "
                         "model.parameters()")
    handler = accelerator.ddp_handler
    if handler is not None and handler.comm_hook != DDPCommunicationHookType.NO:
        hook = getattr(handler.comm_hook, "value", handler.comm_hook)
        raise ValueError(f"{where}: DistributedDataParallelKwargs(comm_hook={hook!r}) "
                         "conflicts with accord's own DDP hook; allowed: comm_hook left at "
                         "'no'")
    cls = get(algorithm)
    nonlinear = not cls.linear or clip_grad_norm is not None
    if nonlinear and not _native(accelerator, algorithm, clip_grad_norm) \
            and accelerator.gradient_state.plugin_kwargs.get("sync_each_batch", False):
        what = f"{algorithm}'s DDP hook" if clip_grad_norm is None else "the clip in the DDP hook"
        raise ValueError(f"{where}: sync_each_batch=True would run {what} on every "
                         "micro-batch's partial gradient; allowed: sync_each_batch=False "
                         "(the default)")


def _native(accelerator: Any, algorithm: str, clip_grad_norm: float | None) -> bool:
    """Whether the algorithm runs inside the optimizer (DDP's allreduce off) rather than
    as a DDP hook. Under a scaler the hook would see scaled gradients, wrong for a
    scale-invariant algorithm and for a clip alike."""
    cls = get(algorithm)
    # a scale-invariant combination of scaled gradients would not be scaled: the optimizer
    # path unscales first (the fp16 GradScaler's order)
    return cls.ddp_hook_form is None or (accelerator.scaler is not None and (
        cls.scale_invariant or clip_grad_norm is not None))


def prepare(
    accelerator: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    algorithm: str,
    *,
    clip_grad_norm: float | None = None,
    **hyperparameters: Any,
) -> tuple[nn.Module, torch.optim.Optimizer, Aggregator]:
    """``accelerator.prepare(model, optimizer)`` with ``algorithm`` (an ``accord list``
    name) aggregating the replicas; returns ``(model, optimizer, aggregator)``.

    ``model`` and ``optimizer`` are the plain ones (the optimizer over the model's
    parameters); the returned model is accelerate's ``DistributedDataParallel`` and the
    optimizer its ``AcceleratedOptimizer``, used exactly as ``accelerator.prepare``'s.
    Collective: call on every rank, with the same arguments. Prepare data loaders and
    schedulers with ``accelerator.prepare`` as usual. ``clip_grad_norm``: the max norm of
    each rank's gradient, clipped before the algorithm combines it, on both paths (None:
    no clipping). See the module docstring for the two paths and what is refused."""
    _check(accelerator, model, optimizer, algorithm, hyperparameters, clip_grad_norm)
    if not _native(accelerator, algorithm, clip_grad_norm):
        prepared, opt = accelerator.prepare(model, optimizer)
        ddp = _find_ddp(prepared)
        if ddp is None:
            raise RuntimeError("accord.integrations.accelerate.prepare: accelerator.prepare "
                               "returned "
                               f"{type(prepared).__name__}, expected DistributedDataParallel")
        agg, hook = ddp_hook(algorithm, ddp, clip_grad_norm=clip_grad_norm, **hyperparameters)
        ddp.register_comm_hook(agg, hook)
        accelerator.register_for_checkpointing(agg)
        _HOOKED.add(opt)
        return prepared, opt, agg
    prepared = accelerator.prepare(model)
    ddp = _find_ddp(prepared)
    if ddp is None:
        raise RuntimeError("accord.integrations.accelerate.prepare: accelerator.prepare returned "
                           f"{type(prepared).__name__}, expected DistributedDataParallel")
    ddp.register_comm_hook(None, local_gradients)
    ddp.broadcast_buffers = False  # the algorithm averages the buffers itself
    module_params = {id(p) for p in ddp.module.parameters()}
    if any(id(p) not in module_params for g in optimizer.param_groups for p in g["params"]):
        raise RuntimeError("accord.integrations.accelerate.prepare: moving the model replaced its "
                           "parameters, so the optimizer no longer holds them; build the "
                           "optimizer on model.parameters() after model.to(accelerator.device)")
    inner = _StepWithNotedLoss(optimizer, algorithm, buffers=list(ddp.module.buffers()),
                               broadcast=False, scaler=accelerator.scaler,
                               clip_grad_norm=clip_grad_norm, **hyperparameters)
    opt = accelerator.prepare(inner)
    inner.accelerated = weakref.ref(opt)
    return prepared, opt, inner.aggregator
