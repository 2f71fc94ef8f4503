"""``accord.wrap``: an aggregator inside an optimizer, the two-line change to a user's loop.

::

    opt = accord.wrap(torch.optim.AdamW(model.parameters(), lr=3e-4), "acga", momentum=0.99)
    for x, y in loader:
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step(loss=loss.detach())    # after_backward, inner step, after_step
        opt.zero_grad()

``wrap`` builds the aggregator on every parameter of the optimizer's param groups
(collective; by default it broadcasts rank 0's parameters and ``buffers``) and returns an
:class:`AggregatedOptimizer`, whose ``step`` runs ``after_backward``, the inner step and
``after_step`` with a step counter of its own.

Decisions (each in full: docs/design/integrations.md): ``param_groups``, ``defaults`` and
``state`` are the inner optimizer's (schedulers work; ``add_param_group`` is refused); the
counter counts optimizer steps taken (an AMP-skipped step does not count) and is
checkpointed; gradient accumulation is the loop's (one ``step`` per optimizer step); no
closures; under a ``GradScaler`` (``scaler=``) the ranks agree on ``found_inf`` (one
1-number MAX allreduce, ``amp_found_inf``), skip an overflowing step everywhere and
unscale before ``after_backward``; a live DDP model's parameters are refused;
``clip_grad_norm=`` clips this rank's gradient before it is combined (the rule of every
route); ``state_dict()`` holds the inner optimizer's, the aggregator's and the counters."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from .._ddp import refuse_ddp_params
from ..algorithms import get
from ..core import Aggregator, StepContext
from .ddp_hooks import check_clip_grad_norm, clip_coefficient

log = logging.getLogger(__name__)

_STATE_KEYS = ("optimizer", "aggregator", "steps", "skipped_steps")


class AggregatedOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose ``step`` runs an aggregator's two hooks around the
    wrapped optimizer's step. Build it with :func:`wrap`; see the module docstring."""

    # GradScaler.step then calls our step on every rank, with found_inf and grad_scale
    _step_supports_amp_scaling = True

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        algorithm: str,
        *,
        group: dist.ProcessGroup | None = None,
        buffers: Iterable[torch.Tensor] | None = None,
        broadcast: bool = True,
        scaler: torch.amp.GradScaler | None = None,
        clip_grad_norm: float | None = None,
        **hyperparameters: Any,
    ) -> None:
        # Optimizer.__init__ is not called on purpose: the inner optimizer owns the groups
        if isinstance(optimizer, AggregatedOptimizer):
            raise TypeError("optimizer: got an optimizer that accord.wrap already wrapped; "
                            "allowed: a plain torch.optim.Optimizer (wrap it once)")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: got {type(optimizer).__name__}, allowed: a "
                            "torch.optim.Optimizer, e.g. torch.optim.AdamW(model.parameters())")
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler: got {type(scaler).__name__}, allowed: None or a "
                            "torch.amp.GradScaler")
        self.clip_grad_norm = check_clip_grad_norm(clip_grad_norm, "accord.wrap")
        cls = get(algorithm)
        params = refuse_ddp_params([p for g in optimizer.param_groups for p in g["params"]],
                                   "accord.wrap", algorithm)
        self.optimizer = optimizer
        self.aggregator: Aggregator = cls(params, group=group, buffers=buffers,
                                          broadcast=broadcast, **hyperparameters)
        self.scaler = scaler
        self._device = self.aggregator.params[0].device
        self._steps = 0
        self._skipped = 0
        self._witness: torch.optim.Optimizer | None = None

    # -- the inner optimizer's groups, defaults and state -----------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def steps(self) -> int:
        """Optimizer steps taken (the next step's ``StepContext.step``)."""
        return self._steps

    @property
    def skipped_steps(self) -> int:
        """Steps skipped on every rank because some rank's scaled gradient overflowed."""
        return self._skipped

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.aggregator.name!r}, {self.optimizer!r})"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise RuntimeError(
            "accord.wrap: the aggregator was built for the optimizer's parameters at wrap "
            "time and cannot take new ones (they would drift apart across ranks); add the "
            "group to the inner optimizer, then wrap it again")

    # -- the step -----------------------------------------------------------------------
    def step(  # type: ignore[override]
        self, closure: Any = None, *, loss: torch.Tensor | float | None = None,
        healthy: bool = True,
    ) -> Any:
        """One optimizer step: ``after_backward``, the inner step, ``after_step``.

        ``loss``: this rank's training loss of the step (loss-aware algorithms such as LSGD
        need it); ``healthy``: passed to the hooks as ``StepContext.healthy``. Call it on
        every rank at every optimizer step, directly or through ``scaler.step(opt, ...)``.
        Returns the inner step's return value, or None for a skipped step."""
        if closure is not None:
            raise ValueError(
                "accord.wrap: step() takes no closure (the inner optimizer would re-evaluate "
                "the gradients after the aggregator combined them); call backward() "
                "yourself, then step(loss=...)")
        ctx = StepContext(step=self._steps, loss=loss, healthy=healthy)
        # GradScaler.step sets these two attributes for the duration of this call only
        found_inf = self.__dict__.get("found_inf")
        if found_inf is not None and not self._amp_proceed(found_inf,
                                                           self.__dict__.get("grad_scale")):
            return None
        if self.clip_grad_norm is not None:
            self._clip()
        self.aggregator.after_backward(ctx)
        out = self.optimizer.step()
        self.aggregator.after_step(ctx)
        self._steps += 1
        return out

    @torch.no_grad()
    def _amp_proceed(self, found_inf: torch.Tensor, grad_scale: torch.Tensor | None) -> bool:
        """Agree on the scaler's found_inf across ranks; on a skip, make every rank's
        scaler back off; otherwise unscale the gradients. True when the step proceeds."""
        if self.scaler is None:
            # the scaler deletes its two attributes only when step returns
            self.__dict__.pop("found_inf", None)
            self.__dict__.pop("grad_scale", None)
            raise RuntimeError(
                "accord.wrap: scaler.step(opt) was called, but the wrapper was built without "
                "scaler=; pass accord.wrap(..., scaler=scaler) so that every rank's scaler "
                "lowers its scale alike when one rank's gradient overflows")
        flag = found_inf.detach().reshape(1).to(self._device, torch.float32, copy=True)
        self.aggregator.comm.all_reduce_(flag, op="max", kind="amp_found_inf")
        if bool(flag[0] > 0):  # the one host read: whether to run the step at all
            self.scaler.unscale_(self._inf_witness())
            self._skipped += 1
            log.debug("accord.wrap: step %d skipped on every rank (inf/NaN gradient under "
                      "AMP)", self._steps)
            return False
        if grad_scale is not None:  # None: the user already called scaler.unscale_(opt)
            inv = grad_scale.double().reciprocal().float()
            per_device: dict[torch.device, torch.Tensor] = {}
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        d = p.grad.device
                        if d not in per_device:
                            per_device[d] = inv.to(d)
                        p.grad.mul_(per_device[d])
        return True

    @torch.no_grad()
    def _clip(self) -> None:
        """This rank's gradient scaled to norm at most ``clip_grad_norm`` (the formula of
        ``torch.nn.utils.clip_grad_norm_``, shared with the DDP hook's clip)."""
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"]
                 if p.grad is not None]
        if grads:
            coef = clip_coefficient(grads, self.clip_grad_norm)
            for grad in grads:
                grad.mul_(coef.to(grad.device))

    def _inf_witness(self) -> torch.optim.Optimizer:
        """A one-element optimizer whose gradient is inf: the scaler's inf check of it
        reports the agreed skip (never stepped)."""
        if self._witness is None:
            t = torch.zeros(1, device=self._device, requires_grad=True)
            t.grad = torch.full((1,), float("inf"), device=self._device)
            self._witness = torch.optim.SGD([t], lr=0.0)
        return self._witness

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's state dict, the aggregator's and the step counters."""
        return {"optimizer": self.optimizer.state_dict(),
                "aggregator": self.aggregator.state_dict(),
                "steps": self._steps, "skipped_steps": self._skipped}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        if not isinstance(state_dict, Mapping) or any(k not in state_dict
                                                      for k in _STATE_KEYS):
            raise ValueError("accord.wrap load_state_dict: got "
                             f"{type(state_dict).__name__}, allowed: the dict of an "
                             f"AggregatedOptimizer.state_dict() (keys {', '.join(_STATE_KEYS)})")
        counters = {k: state_dict[k] for k in ("steps", "skipped_steps")}
        for key, value in counters.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"accord.wrap load_state_dict: {key} is {value!r}, "
                                 "allowed: an integer >= 0")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.aggregator.load_state_dict(state_dict["aggregator"])
        self._steps = counters["steps"]
        self._skipped = counters["skipped_steps"]

    def close(self) -> None:
        """Close the aggregator (stops background threads); idempotent."""
        self.aggregator.close()

    def __enter__(self) -> AggregatedOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wrap(
    optimizer: torch.optim.Optimizer,
    algorithm: str,
    *,
    group: dist.ProcessGroup | None = None,
    buffers: Iterable[torch.Tensor] | None = None,
    broadcast: bool = True,
    scaler: torch.amp.GradScaler | None = None,
    clip_grad_norm: float | None = None,
    **hyperparameters: Any,
) -> AggregatedOptimizer:
    """Wrap ``optimizer`` with the aggregator registered as ``algorithm`` (collective: call
    on every rank). ``group``, ``buffers``, ``broadcast`` and the hyperparameters go to
    :func:`accord.build`; ``scaler`` is the ``torch.amp.GradScaler`` that will call
    ``scaler.step(opt)``, if any; ``clip_grad_norm`` the max norm of this rank's gradient,
    clipped before the aggregator combines it (None: no clipping). Returns an
    :class:`AggregatedOptimizer`. The optimizer of a ``DistributedDataParallel`` model is
    refused: drop DDP (see the module docstring) or use :func:`accord.ddp_hook`, and so is
    an optimizer whose step needs a closure (LBFGS)."""
    _refuse_closure_optimizer(optimizer)
    return AggregatedOptimizer(optimizer, algorithm, group=group, buffers=buffers,
                               broadcast=broadcast, scaler=scaler,
                               clip_grad_norm=clip_grad_norm, **hyperparameters)


def _refuse_closure_optimizer(optimizer: Any) -> None:
    """TypeError (one line) for an optimizer whose ``step`` requires a closure (LBFGS): the
    wrapper steps without one (see "No closures" above), so it would fail only at the first
    step, inside torch, after the collective construction on every rank."""
    import inspect

    step = getattr(type(optimizer), "step", None)
    if not isinstance(optimizer, torch.optim.Optimizer) or step is None:
        return  # the wrapper's own checks name the wrong type
    try:
        params = list(inspect.signature(step).parameters.values())[1:]
    except (TypeError, ValueError):
        return
    required = [p.name for p in params if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if required:
        raise TypeError(f"optimizer: got {type(optimizer).__name__}, whose step() requires "
                        f"{', '.join(required)} (a closure re-evaluating the loss, which the "
                        "aggregator's replicas would not agree on); allowed: an optimizer "
                        "whose step() takes no closure, e.g. SGD, Adam, AdamW")
