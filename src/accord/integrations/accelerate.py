"""Hugging Face accelerate: accord's algorithms in an ``Accelerator`` training script.

::

    accelerator = Accelerator()                  # Accelerator(cpu=True) on CPU
    model, optimizer, agg = accord.integrations.accelerate.prepare(accelerator, model, optimizer,
                                                      "acga", momentum=0.99)
    loader = accelerator.prepare(loader)         # data loaders, schedulers: as usual
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = loss_fn(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()

:func:`prepare` stands in for ``accelerator.prepare(model, optimizer)`` and returns what
that returns (the ``DistributedDataParallel`` model and the ``AcceleratedOptimizer``) plus
the accord :class:`~accord.Aggregator` (``metrics()``, ``comm.stats``, ``state_dict()``).
Launch with ``torchrun --nproc_per_node N`` or ``accelerate launch --multi_gpu``.
Importing this module needs accelerate (without it the import fails with one line naming
``pip install 'accord[accelerate]'``); ``import accord`` does not import it.

Two paths, chosen from the algorithm:

* **Gradient phase** (``allreduce``, ``normalized``, ``acga``, ``adasum``): the DDP
  communication hook of :func:`accord.ddp_hook`, registered on the DDP model that
  ``accelerator.prepare`` built (accelerate's ``DistributedDataParallelKwargs(comm_hook=
  ...)`` takes only its own hook names and ignores a callable). The optimizer is
  accelerate's, untouched. The aggregator is registered with
  ``accelerator.register_for_checkpointing`` so that ``save_state`` / ``load_state`` keep
  its state (ACGA's momentum).
* **Model phase** (every other registered algorithm: ``local_sgd``, ``diloco``,
  ``easgd``, ``wagma``, ...): DDP still wraps the model (accelerate always builds it in a
  multi-process run), but its gradient allreduce is switched off by a communication hook
  that hands back each bucket's local gradients and communicates nothing. The user's
  optimizer is wrapped by :func:`accord.wrap` *before* accelerate wraps it, so the
  ``AcceleratedOptimizer`` (which steps only when gradients sync) runs the aggregator's
  hooks once per real optimizer step, never per micro-batch. ``optimizer.optimizer`` is
  then the :class:`~accord.AggregatedOptimizer` (its ``steps`` counts real steps) and
  its ``state_dict()``, hence accelerate's checkpoint, holds the aggregator's state.

Decisions:

* **Buffers.** Under the model phase the algorithm treats floating-point buffers
  (BatchNorm statistics) as it treats the parameters, as ``accord train`` does. DDP's
  default ``broadcast_buffers`` would overwrite every rank's buffers with rank 0's at
  every forward (and pay a broadcast for it), so :func:`prepare` switches it off on that
  path. Under the gradient phase DDP's setting is kept (buffers follow rank 0, as with
  plain DDP).
* **Initial consensus.** DDP broadcasts rank 0's parameters and buffers when it is
  built, so the aggregator is built with ``broadcast=False`` (no second broadcast).
* **Order.** The model is prepared (moved to ``accelerator.device`` and wrapped) before
  the aggregator is built, so the aggregator's buffers live on the parameters' device.
  The optimizer must hold the model's own parameters.
* **Mixed precision.** bf16 needs nothing. fp16 brings a ``GradScaler``: model-phase
  algorithms get it through ``accord.wrap(..., scaler=accelerator.scaler)`` (gradients
  unscaled before the aggregator, an overflow skips the step on every rank). ``acga`` and
  ``normalized`` return a direction whose size does not follow the loss scale, so a DDP
  hook would hand the scaler a gradient it then divides by the scale; under a scaler they
  take the model-phase path instead (DDP's allreduce off, the aggregator inside the
  optimizer). ``allreduce`` and ``adasum`` scale with their inputs and keep the hook.
  On the model-phase path a step that any rank's overflow skipped is reported by
  ``optimizer.step_was_skipped`` on every rank (accelerate's scheduler then holds the
  learning rate; this sets accelerate's private ``_accelerate_step_called``, the flag it
  infers skips from). Not run here (fp16 needs a GPU); the scaler path is tested with a
  CPU ``GradScaler``.
* **The loss.** ``AcceleratedOptimizer.step`` takes no ``loss``, and LSGD elects its
  leader from the training loss: call :func:`note_loss` with each micro-batch's loss; the
  step passes their mean as ``StepContext.loss``. A ``lsgd`` step with no loss noted
  raises (otherwise every worker's loss would count as +inf and rank 0 would always
  lead). Other algorithms ignore the loss; ``note_loss`` is accepted and costs nothing.
* **Gradient clipping.** ``prepare(..., clip_grad_norm=C)`` clips each rank's gradient
  before the algorithm combines it, on both paths (in the DDP hook, or in the wrapped
  optimizer's step after the unscale), as ``accord.wrap`` and the Lightning strategy do;
  under fp16's scaler it moves every algorithm to the model-phase path (the hook would
  clip gradients still multiplied by the loss scale). Not
  ``accelerator.clip_grad_norm_``: it clips what ``backward`` left in ``.grad``, which on
  the hook path is the aggregated gradient (a no-op for ``acga`` and ``normalized``, whose
  direction has norm at most 1) and on the model-phase path the local one.
* **One process.** Refused with a one-line error: accelerate then builds no process group
  and no DDP, and an algorithm in a world of one is not plain training either (ACGA would
  train on unit-norm gradients). On a machine without GPUs accelerate only goes
  multi-process with ``Accelerator(cpu=True)``; the error says so when ``WORLD_SIZE`` > 1.
* **Refused before anything is prepared** (one line naming the problem and what is
  allowed): an unknown algorithm or hyperparameter, a model or optimizer that
  ``accelerator.prepare`` already wrapped, an optimizer ``accord.wrap`` already wrapped,
  an optimizer holding parameters that are not the model's, DeepSpeed / FSDP / XLA /
  Megatron / tensor parallelism (accord aggregates data-parallel replicas held whole on
  each rank), a ``DistributedDataParallelKwargs(comm_hook=...)`` (DDP takes one hook),
  and ``sync_each_batch=True`` with ``normalized`` / ``acga`` / ``adasum``, whose hooks
  would then combine every micro-batch's partial sum (a nonlinear map applied repeatedly
  is not the map of the accumulated gradient).
* **Checkpoints.** ``accelerator.save_state`` writes from the main process, so it holds
  rank 0's model and optimizer (with rank 0's aggregator state). That is the whole state
  for gradient-phase algorithms; for model-phase algorithms whose replicas differ
  between communications, ``load_state`` restarts every rank from rank 0's replica.
* **Not tested here:** ``accelerate launch --multi_gpu`` and NCCL (nothing in this
  module depends on the device type: the same calls run under every ``MULTI_*``
  distributed type), and ``torch.compile`` through accelerate's dynamo option (the DDP
  model is found under the compiled wrapper).
"""

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
