"""The aggregator interface every algorithm implements, and its typed hyperparameters.

An aggregator plugs into two points of a plain training loop::

    loss.backward()
    agg.after_backward(ctx)   # gradient-phase algorithms rewrite p.grad
    opt.step()
    agg.after_step(ctx)       # model-phase algorithms average / pull / mix parameters

Both hooks must be called on every rank at every step. Whether an algorithm communicates
at a step is decided from ``ctx.step`` and its hyperparameters only (see :func:`due`), so
all ranks always take the same decision and enter the same collectives.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from .comm import Collectives, Communicator


@dataclass
class StepContext:
    """What the training loop knows about the current optimizer step.

    ``step`` counts optimizer steps from 0; ``loss`` is this rank's training loss of the
    step (a detached tensor or a float), used by loss-aware algorithms. ``healthy`` is
    False when this rank's step produced no usable update (its gradient was non-finite and
    excluded); dynamic weighting counts only healthy steps as progress.
    """

    step: int
    loss: torch.Tensor | float | None = None
    healthy: bool = True

    def __post_init__(self) -> None:
        # Checked here, not deep inside an algorithm: a wrong type would otherwise fail
        # (or silently compare wrong) in due() on some ranks only. Metadata only: no sync.
        step = self.step
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(f"StepContext step: got {step!r} ({type(step).__name__}), "
                            "allowed: an integer >= 0")
        if step < 0:
            raise ValueError(f"StepContext step: got {step!r}, allowed: an integer >= 0")
        self.step = int(step)
        loss = self.loss
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"StepContext loss: got a tensor of shape {tuple(loss.shape)}, "
                                 "allowed: one number (a 1-element tensor, a float or None)")
        elif loss is not None and (isinstance(loss, bool) or not isinstance(loss, numbers.Real)):
            raise TypeError(f"StepContext loss: got {loss!r} ({type(loss).__name__}), "
                            "allowed: one number (a 1-element tensor, a float or None)")
        if not isinstance(self.healthy, bool):
            raise TypeError(f"StepContext healthy: got {self.healthy!r}, allowed: True or False")


def cache_dir(kind: str) -> Path:
    """``$ACCORD_CACHE_DIR/<kind>`` (default ``~/.cache/accord/<kind>``): what accord builds
    or derives once per machine (the native sketch kernel, the digits arrays)."""
    root = os.environ.get("ACCORD_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "accord")
    return Path(root) / kind


def due(step: int, period: int, warmup_steps: int = 0) -> bool:
    """True at the last step of every ``period``-step window after ``warmup_steps``.

    With ``period=4`` and no warm-up this is steps 3, 7, 11, ...: the communication
    happens after ``period`` local steps. The one period rule shared by all algorithms.
    """
    if period < 1:
        raise ValueError(f"period must be an integer >= 1, got {period}")
    if step < warmup_steps:
        return False
    return (step - warmup_steps + 1) % period == 0


INT64_MAX = 2**63 - 1

#: the values of ``Aggregator.phase``
PHASES = ("gradient", "model")
#: the values of ``Aggregator.ddp_hook_form`` (besides None), see
#: :mod:`accord.integrations.ddp_hooks`
DDP_HOOK_FORMS = ("average", "combine", "sum_then_combine")


@dataclass(frozen=True)
class Hyper:
    """Declaration of one hyperparameter: type, default, allowed range and help text.

    ``low``/``high`` are inclusive bounds unless ``low_open``/``high_open`` is set.
    ``choices`` restricts string values.
    """

    default: Any
    kind: type
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None

    def allowed(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind is bool:
            return "true or false"
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        kind = {int: "an integer", float: "a number", str: "a string"}.get(self.kind, "a value")
        return kind + (" " + " and ".join(parts) if parts else "")

    def coerce(self, name: str, value: Any) -> Any:
        """Convert ``value`` (possibly a CLI string) to the declared type and check it."""
        bad = ValueError(f"hyperparameter {name!r}: got {value!r}, allowed: {self.allowed()}")
        if value is None and self.default is None:
            return None  # an optional hyperparameter left unset
        if isinstance(value, str) and self.kind is not str:
            text = value.strip().lower()
            if self.kind is bool:
                if text in ("1", "true", "yes", "on"):
                    value = True
                elif text in ("0", "false", "no", "off"):
                    value = False
                else:
                    raise bad
            else:
                try:
                    value = float(text)
                except ValueError:
                    raise bad from None
        if self.kind is bool:
            if not isinstance(value, bool):
                raise bad
        elif self.kind is int:
            # numbers.Integral / Real: numpy scalars (np.int64, np.float32) are numbers too
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise bad
            if not isinstance(value, numbers.Integral):
                number = float(value)
                if not math.isfinite(number) or number != int(number):
                    raise bad
            value = int(value)
            if not -INT64_MAX <= value <= INT64_MAX:  # must fit a tensor / a C++ seed
                raise ValueError(f"hyperparameter {name!r}: got {value!r}, allowed: "
                                 f"{self.allowed()} and within +-(2**63 - 1)")
        elif self.kind is float:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise bad
            try:
                value = float(value)
            except OverflowError:  # an int beyond the float range
                raise bad from None
            if not math.isfinite(value):
                raise bad
        elif self.kind is str:
            if not isinstance(value, str):
                raise bad
        if self.choices is not None and value not in self.choices:
            raise bad
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            raise bad
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            raise bad
        return value


def resolve_hyperparameters(
    algorithm: str, spec: Mapping[str, Hyper], given: Mapping[str, Any]
) -> dict[str, Any]:
    """Defaults overlaid with ``given``, each value checked; a one-line ValueError otherwise."""
    if not isinstance(given, Mapping) or not all(isinstance(k, str) for k in given):
        raise TypeError(f"hyperparameters of {algorithm!r}: got {given!r}, allowed: a dict "
                        "of name -> value")
    unknown = sorted(set(given) - set(spec))
    if unknown:
        allowed = ", ".join(sorted(spec)) or "none"
        raise ValueError(
            f"unknown hyperparameter {unknown[0]!r} for algorithm {algorithm!r}; "
            f"allowed: {allowed}"
        )
    out = {}
    for name, h in spec.items():
        out[name] = h.coerce(name, given[name]) if name in given else h.default
    return out


def _tensors(name: str, given: Any, example: str) -> list[torch.Tensor]:
    """``given`` as a list of distinct tensors; TypeError/ValueError naming ``name``."""
    allowed = f"an iterable of tensors, e.g. {example}"
    if isinstance(given, torch.nn.Module):
        raise TypeError(f"{name}: got a module ({type(given).__name__}); allowed: {allowed}")
    if isinstance(given, torch.Tensor):  # iterating it would yield its rows, as views
        raise TypeError(f"{name}: got a single tensor; allowed: {allowed} (wrap one tensor "
                        "in a list)")
    if isinstance(given, str | bytes | Mapping) or not isinstance(given, Iterable):
        raise TypeError(f"{name}: got {type(given).__name__}; allowed: {allowed}")
    out = list(given)
    seen: set[int] = set()
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: element {i} is {type(t).__name__}; allowed: {allowed}")
        if id(t) in seen:
            raise ValueError(f"{name}: element {i} is listed twice; allowed: distinct tensors")
        seen.add(id(t))
    return out


def _refuse_closed(method):
    """``method`` (a hook) raising a one-line RuntimeError once its aggregator is closed."""

    @functools.wraps(method)
    def hook(self: Aggregator, ctx: StepContext) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} ({self.name!r}): {method.__name__} "
                               "called after close(); allowed: build a new aggregator")
        return method(self, ctx)

    hook._refuses_closed = True  # type: ignore[attr-defined]
    return hook


class Aggregator:
    """Base class: both hooks are no-ops; subclasses override what they need.

    Subclasses declare ``name``, ``description`` and ``hyperparameters``; the base
    constructor validates keyword hyperparameters against that declaration and exposes
    them as ``self.hp`` (a dict). ``group=None`` means the default process group, so a
    user's own ``torchrun`` script can use an aggregator directly.

    ``broadcast=True`` (the default) makes the replicas start identical, as
    ``DistributedDataParallel`` does: the constructor copies every given parameter
    (frozen ones too) and floating-point buffer from the group's rank 0, one flat buffer
    per dtype and device, through ``self.comm`` (counted as ``initial_broadcast``; nothing
    in a group of one). ``broadcast=False`` keeps each rank's own values (replicas that
    are meant to differ, or a caller that already synchronised them).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: the paper this algorithm follows (title, arXiv id) for the README and ``accord list``
    paper: ClassVar[str] = ""
    hyperparameters: ClassVar[dict[str, Hyper]] = {}

    # -- capabilities: everything the rest of accord asks about an algorithm ------------
    #: "gradient": combines the ranks' gradients in ``after_backward`` (before the
    #: optimizer step); "model": acts on the parameters in ``after_step``
    phase: ClassVar[str] = "model"
    #: its payloads travel by sum/average allreduce, which ``--compress bf16|fp16`` may
    #: round (payloads sent point to point or by broadcast are never compressed)
    compressible: ClassVar[bool] = False
    #: the allreduced payload is a gradient (not parameters), so a lossy codec with error
    #: feedback may approximate it (``--compress powersgd|int8|int4|topk``)
    low_rank: ClassVar[bool] = False
    #: the DDP communication-hook form (:data:`accord.integrations.ddp_hooks.HOOK_FORMS`): "average"
    #: (each bucket averaged as it comes), "combine" (``combine_(flat)`` on the whole
    #: gradient at the last bucket), "sum_then_combine" (each bucket's sum started as it
    #: comes, then ``combine_(flat, total)``), or None: no hook form
    ddp_hook_form: ClassVar[str | None] = None
    #: the combination does not change when every gradient is multiplied by one factor
    #: (an fp16 loss scale), so it may run on scaled gradients
    scale_invariant: ClassVar[bool] = False
    #: the combination is linear in the gradients, so applying it to each micro-batch's
    #: partial gradient gives the same result as applying it once
    linear: ClassVar[bool] = False
    #: it reads ``StepContext.loss`` (integrations must pass the loss)
    reads_loss: ClassVar[bool] = False
    #: what it does when the participants change between steps (``--fault-tolerant``), as
    #: one line; None: refused under ``--fault-tolerant`` for :attr:`ft_refusal`
    fault_tolerant: ClassVar[str | None] = None
    #: why ``--fault-tolerant`` refuses it (read when :attr:`fault_tolerant` is None)
    ft_refusal: ClassVar[str] = "it declares no membership rule for a changing world"

    _closed = False  # set by close()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # A closed aggregator has stopped its background engine and may have dropped its
        # buffers: a hook called then would fail deep inside (wagma) or go on without its
        # engine (asynchronous easgd). Every subclass's hooks refuse it in one line instead
        # (a flag read per call: no communication, no sync).
        super().__init_subclass__(**kwargs)
        for hook in ("after_backward", "after_step"):
            method = cls.__dict__.get(hook)
            if method is not None and not getattr(method, "_refuses_closed", False):
                setattr(cls, hook, _refuse_closed(method))

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        *,
        group: dist.ProcessGroup | None = None,
        buffers: Iterable[torch.Tensor] | None = None,
        broadcast: bool = True,
        **hyperparameters: Any,
    ) -> None:
        if not isinstance(broadcast, bool):
            raise TypeError(f"broadcast: got {broadcast!r}, allowed: True or False")
        self.hp = resolve_hyperparameters(self.name, self.hyperparameters, hyperparameters)
        given = given_params = _tensors("params", params, "model.parameters()")
        self.params = [p for p in given if p.requires_grad]
        if not self.params:
            raise ValueError("params: got no tensors that require gradients; allowed: leaf "
                             "tensors with requires_grad=True, e.g. model.parameters()")
        for i, p in enumerate(given):
            if p.requires_grad and not p.is_leaf:  # autograd never fills a view's .grad
                raise ValueError(
                    f"params: tensor {i} (shape {tuple(p.shape)}) is not a leaf tensor (a "
                    "view or the result of an operation), so its gradient is never "
                    "aggregated; allowed: leaf tensors, e.g. model.parameters()")
        # floating-point buffers (BatchNorm statistics); model-phase algorithms apply their
        # rule to them exactly as to the parameters, gradient-phase algorithms ignore them
        given = [] if buffers is None else buffers
        self.buffers = [b for b in _tensors("buffers", given, "model.buffers()")
                        if b.is_floating_point()]
        if group is not None and dist.is_available() and \
                not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"group: got {type(group).__name__}, allowed: None (the default "
                            "group) or a torch.distributed ProcessGroup")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                f"{type(self).__name__} needs an initialised torch.distributed process group "
                "(call torch.distributed.init_process_group first, or use `accord train`)"
            )
        # swapped for a torchft quorum's communicator under --fault-tolerant: algorithms
        # call only what the Collectives protocol has (PointToPoint ones need a fixed world)
        self.comm: Collectives = Communicator(group)
        self.group = group
        self.rank = self.comm.rank
        self.world_size = self.comm.world_size
        self.check(self.hp, self.world_size)
        self._closed = False
        if broadcast and self.world_size > 1:
            # before a subclass snapshots anything (EASGD's centre, LSGD's leader copy), so
            # every snapshot starts from rank 0's model too
            by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
            for t in [*given_params, *self.buffers]:
                by_kind.setdefault((t.dtype, t.device), []).append(t)
            with torch.no_grad():
                for tensors in by_kind.values():
                    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
                    self.comm.broadcast_(flat, src=0, kind="initial_broadcast")
                    for t, v in zip(tensors, flat.split([t.numel() for t in tensors]),
                                    strict=True):
                        t.copy_(v.view_as(t))

    @classmethod
    def check(cls, hp: Mapping[str, Any], world_size: int) -> None:
        """Constraints between hyperparameters and the world size; ValueError if violated.
        Runs before any worker starts (CLI) and again in the constructor."""

    @classmethod
    def rewrites_gradients(cls, hp: Mapping[str, Any]) -> bool:
        """True when, with hyperparameters ``hp``, ``after_backward`` replaces p.grad by a
        combination of every rank's gradients at some step (a second-order optimizer's
        Hessian-vector product then finds no local graph, so it is refused)."""
        return cls.phase == "gradient"

    @classmethod
    def check_fault_tolerant(cls, hp: Mapping[str, Any]) -> None:
        """ValueError (one line) when, with hyperparameters ``hp``, this algorithm cannot
        run under ``--fault-tolerant``."""
        if cls.fault_tolerant is None:
            raise ValueError(f"--fault-tolerant: algorithm {cls.name!r} is refused: "
                             f"{cls.ft_refusal}")

    @classmethod
    def mixes_before_step(cls, hp: Mapping[str, Any]) -> bool:
        """True when, with hyperparameters ``hp``, ``after_backward`` changes the parameters
        in place (mixing before the optimizer step): a second-order optimizer's
        Hessian-vector product then finds its graph's inputs modified, so it is refused."""
        return False

    @property
    def avoids_waits(self) -> bool:
        """True when this aggregator, as configured, never waits for a slow rank's compute
        between its synchronisation points (wait-avoiding WAGMA, asynchronous EASGD). The
        training loop then observes the run without global waits (:mod:`accord.observe`)."""
        return False

    def synchronised(self, step: int) -> bool:
        """True when step ``step`` ended with every rank waiting for every other (a blocking
        global collective, e.g. WAGMA's global average), so a loop may add a global vote
        there without adding a wait. Asked only of aggregators that avoid waits."""
        return False

    def on_world_change(self, launch_world_size: int) -> None:
        """Called under ``--fault-tolerant`` after ``comm``, ``rank`` and ``world_size``
        were pointed at a new quorum: re-derive what depends on N (``launch_world_size``
        is the number of workers launched). Default: nothing depends on N."""

    def consensus_params(self) -> list[torch.Tensor] | None:
        """Tensors (one per parameter, then per buffer) to evaluate as the run's consensus
        model, or None for the mean of the replicas. EASGD returns its centre."""
        return None

    # -- the two plug-in points -------------------------------------------------------
    @_refuse_closed
    def after_backward(self, ctx: StepContext) -> None:
        """Called after ``loss.backward()`` and before ``optimizer.step()``."""

    @_refuse_closed
    def after_step(self, ctx: StepContext) -> None:
        """Called after ``optimizer.step()``."""

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "hyperparameters": dict(self.hp), "world_size": self.world_size}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(
                f"state_dict is for algorithm {state.get('name')!r}, not {self.name!r}"
            )

    def metrics(self) -> dict[str, float]:
        """Per-algorithm observables of the last step (floats only)."""
        return {}

    def close(self) -> None:
        """Release background resources; idempotent."""
        self._closed = True

    def __enter__(self) -> Aggregator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
