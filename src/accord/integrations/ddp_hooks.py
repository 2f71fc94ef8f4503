"""DDP communication-hook forms of the gradient-phase algorithms.

For users who keep ``torch.nn.parallel.DistributedDataParallel``::

    ddp = DistributedDataParallel(model)
    agg, hook = accord.ddp_hook("acga", ddp, momentum=0.99)
    ddp.register_comm_hook(agg, hook)

The hook's state is the aggregator ``accord.build`` returns (its ``state_dict``,
``metrics`` and ``comm.stats``); it gives the gradients ``after_backward`` gives, up to the
order of the sums. Algorithms: ``allreduce``, ``normalized``, ``acga`` and ``adasum``.

When the work happens: every collective is issued from the hook's call on the backward
thread, in bucket order, never from a future's callback (gloo matches collectives by
issue order). ``allreduce`` averages each bucket as it comes; ``acga`` with
``coefficients=exact`` starts each bucket's sum as it comes and finishes at the last
bucket; ``gather``, ``sketch``, ``normalized`` and ``adasum`` run at the last bucket, on the
aggregator's flat buffers. ``clip_grad_norm=`` clips each rank's gradient before it is
combined (then nothing starts per bucket). In full: docs/design/integrations.md."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from ..algorithms import get
from ..core import Aggregator

log = logging.getLogger(__name__)


def hook_algorithms() -> tuple[str, ...]:
    """Registry names of the algorithms with a DDP communication-hook form (the class
    declares it: ``Aggregator.ddp_hook_form``)."""
    from ..algorithms import REGISTRY, load_plugins

    load_plugins()
    return tuple(name for name, cls in sorted(REGISTRY.items())
                 if cls.ddp_hook_form is not None)


def check_clip_grad_norm(value: Any, where: str) -> float | None:
    """``value`` as a float, or None; a one-line ValueError when it is not a max norm."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            0 < value < float("inf")):
        raise ValueError(f"{where}: clip_grad_norm is {value!r}, allowed: None (no clipping) "
                         "or a finite number > 0 (the max norm of each rank's gradient)")
    return float(value)


def clip_coefficient(tensors: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The factor ``torch.nn.utils.clip_grad_norm_`` scales ``tensors`` by (their total
    2-norm computed as it does, so the wrapper's and the hook's clips agree), as a tensor:
    no host read."""
    total = torch.nn.utils.get_total_norm(tensors)
    return (max_norm / (total + 1e-6)).clamp(max=1.0)


def _done_future(value: torch.Tensor) -> torch.futures.Future:
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(value)
    return fut


class CommHook:
    """The hook callable for ``register_comm_hook(aggregator, hook)``; one per aggregator.

    ``buckets`` is the number of buckets of the last completed step (DDP rebuilds its
    buckets after the first step, so it may change once).
    """

    def __init__(self, aggregator: Aggregator, clip_grad_norm: float | None = None) -> None:
        self.aggregator = aggregator
        self.clip_grad_norm = clip_grad_norm
        self.comm = aggregator.comm
        # DDP reads the hook's __name__ and __qualname__ (checks, logging)
        self.__name__ = self.__qualname__ = f"accord_{aggregator.name}_hook"
        self.buckets = 0
        self._index = {id(p): i for i, p in enumerate(aggregator.params)}

    def _param_indices(self, bucket: dist.GradBucket) -> list[int]:
        try:
            return [self._index[id(p)] for p in bucket.parameters()]
        except KeyError:
            raise ValueError(
                f"{self.__name__}: a parameter of the DDP model is not among the "
                "aggregator's parameters; build the hook from the DDP model itself "
                "(accord.ddp_hook(name, ddp_model, ...))") from None

    # no annotations: DDP compares them with dist.GradBucket / Future as objects, and this
    # module's annotations are strings
    def __call__(self, state, bucket):
        if state is not self.aggregator:
            raise ValueError(f"{self.__name__}: register it with its own aggregator as the "
                             "state: ddp.register_comm_hook(agg, hook)")
        return self._bucket(bucket)

    def _bucket(self, bucket: dist.GradBucket) -> torch.futures.Future:
        raise NotImplementedError


class AllReduceHook(CommHook):
    """Each bucket averaged as it comes (DDP's default behaviour, counted)."""

    def _bucket(self, bucket: dist.GradBucket) -> torch.futures.Future:
        if bucket.is_last():
            self.buckets = bucket.index() + 1
        return self.comm.all_reduce_async_(bucket.buffer(), op="avg")


class WholeGradientHook(CommHook):
    """Per-bucket work as buckets come (``_start``), the rest once, in the call for the
    last bucket (``_finish``), on the aggregator's flat buffer in parameter order."""

    def __init__(self, aggregator: Aggregator, clip_grad_norm: float | None = None) -> None:
        super().__init__(aggregator, clip_grad_norm)
        flat = aggregator.flat  # type: ignore[attr-defined]
        self._views = [v.reshape(-1) for v in flat.split(flat.buffer)]
        # this step's buckets: (buffer, its per-parameter pieces, parameter indices, future)
        self._pending: list[tuple[torch.Tensor, list[torch.Tensor], list[int],
                                  torch.futures.Future]] = []

    def _bucket(self, bucket: dist.GradBucket) -> torch.futures.Future:
        if bucket.index() == 0:
            self._fail(RuntimeError("the previous backward pass ended before its last bucket"))
        buf = bucket.buffer()
        indices = self._param_indices(bucket)
        pieces = list(buf.split([self._views[i].numel() for i in indices]))
        fut: torch.futures.Future = torch.futures.Future()
        self._pending.append((buf, pieces, indices, fut))
        try:
            self._start(bucket.index(), buf)
            if bucket.is_last():
                with torch.no_grad():
                    for _, parts, idx, _ in self._pending:
                        for piece, i in zip(parts, idx, strict=True):
                            self._views[i].copy_(piece)
                    if self.clip_grad_norm is not None:
                        coef = clip_coefficient(self._views, self.clip_grad_norm)
                        for view in self._views:
                            view.mul_(coef)
                    self._finish()
                    for _, parts, idx, _ in self._pending:
                        for piece, i in zip(parts, idx, strict=True):
                            piece.copy_(self._views[i])
                self.buckets = len(self._pending)
                for b, _, _, f in self._pending:
                    f.set_result(b)
                self._pending = []
        except BaseException as exc:
            self._fail(exc)
            raise
        return fut

    def _fail(self, exc: BaseException) -> None:
        for _, _, _, f in self._pending:
            if not f.done():
                f.set_exception(exc)
        self._pending = []

    def _start(self, index: int, buf: torch.Tensor) -> None:
        """Work on one bucket's local gradients as it comes (default: none)."""

    def _finish(self) -> None:
        """The aggregation of the aggregator's flat buffer (all local gradients, in
        parameter order), in place."""
        raise NotImplementedError


class ClippedAllReduceHook(WholeGradientHook):
    """``allreduce`` with ``clip_grad_norm``: the clip needs the whole local gradient, so
    the average runs once, at the last bucket, on the clipped flat gradient."""

    def _finish(self) -> None:
        self.comm.all_reduce_(self.aggregator.flat.buffer, op="avg")  # type: ignore[attr-defined]


class CombineHook(WholeGradientHook):
    """Form ``combine``: nothing to start per bucket; the aggregator's ``combine_(flat)``
    runs on the whole gradient at the last bucket (normalized's global norm, AdaSum's
    blocking point-to-point exchanges of the whole vector)."""

    def _finish(self) -> None:
        self.aggregator.combine_(self.aggregator.flat.buffer)  # type: ignore[attr-defined]


class ACGAHook(WholeGradientHook):
    def __init__(self, aggregator: Aggregator, clip_grad_norm: float | None = None) -> None:
        super().__init__(aggregator, clip_grad_norm)
        # the sum of clipped gradients needs every bucket's norm first: no early start
        self._early = aggregator.total is not None and clip_grad_norm is None  # type: ignore[attr-defined]
        self._totals: dict[int, torch.Tensor] = {}  # per bucket index, reused every step
        self._sums: list[torch.futures.Future] = []

    def _start(self, index: int, buf: torch.Tensor) -> None:
        if index == 0:
            self._sums = []
        if not self._early:
            return  # gather or sketch (no sum) or a clip: everything runs in _finish
        total = self._totals.get(index)
        if total is None or total.shape != buf.shape or total.dtype != buf.dtype:
            total = self._totals[index] = torch.empty_like(buf)
        total.copy_(buf)
        self._sums.append(self.comm.all_reduce_async_(total))  # s, bucket by bucket

    def _finish(self) -> None:
        agg = self.aggregator
        total = agg.total  # type: ignore[attr-defined]
        if total is None:  # gather or sketch: no sum
            agg.combine_(agg.flat.buffer, None)  # type: ignore[attr-defined]
            return
        if not self._early:  # clipped: s is the sum of the clipped gradients
            total.copy_(agg.flat.buffer)  # type: ignore[attr-defined]
            self.comm.all_reduce_(total, exact=True)
            agg.combine_(agg.flat.buffer, total)  # type: ignore[attr-defined]
            return
        tot_views = [v.reshape(-1) for v in agg.flat.split(total)]  # type: ignore[attr-defined]
        for fut, (_, _, idx, _) in zip(self._sums, self._pending, strict=True):
            parts = fut.wait().split([tot_views[i].numel() for i in idx])
            for piece, i in zip(parts, idx, strict=True):
                tot_views[i].copy_(piece)
        self._sums = []
        agg.combine_(agg.flat.buffer, total)  # type: ignore[attr-defined]


#: ``Aggregator.ddp_hook_form`` -> the hook class that runs it; the aggregator provides
#: ``flat`` (its flat gradient buffer) for every form but ``average``, ``combine_(flat)``
#: for ``combine`` and ``total`` (a buffer for the sum, or None) and
#: ``combine_(flat, total)`` for ``sum_then_combine``
HOOK_FORMS: dict[str, type[CommHook]] = {
    "average": AllReduceHook,
    "combine": CombineHook,
    "sum_then_combine": ACGAHook,
}


def ddp_hook(
    name: str,
    model: torch.nn.Module | Iterable[torch.Tensor],
    *,
    group: dist.ProcessGroup | None = None,
    broadcast: bool = False,
    clip_grad_norm: float | None = None,
    **hyperparameters: Any,
) -> tuple[Aggregator, CommHook]:
    """``(aggregator, hook)`` for ``ddp_model.register_comm_hook(aggregator, hook)``.

    ``model``: the ``DistributedDataParallel`` model (its process group is then the
    aggregator's unless ``group`` is given), the module it wraps, or its parameters.
    ``broadcast`` defaults to False: DDP already makes the replicas identical.
    ``clip_grad_norm``: the max norm of each rank's gradient, clipped inside the hook
    before it is combined (None: no clipping; a ``clip_grad_norm_`` after ``backward``
    would clip the combined gradient instead). Collective: call on every rank, like
    ``accord.build``.
    """
    cls = get(name)
    if cls.ddp_hook_form is None:
        raise ValueError(f"algorithm {name!r} has no DDP communication hook; allowed: "
                         f"{', '.join(hook_algorithms())} (the gradient-phase algorithms "
                         "that declare a ddp_hook_form)")
    params: Iterable[torch.Tensor]
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        if group is None:
            group = model.process_group
        params = model.module.parameters()
    elif isinstance(model, torch.nn.Module):
        params = model.parameters()
    else:
        params = model
    clip = check_clip_grad_norm(clip_grad_norm, "accord.ddp_hook")
    # the class, not accord.build, which refuses a DDP model's parameters
    agg = cls(params, group=group, broadcast=broadcast, **hyperparameters)
    form = cls.ddp_hook_form
    hook = ClippedAllReduceHook if form == "average" and clip is not None else HOOK_FORMS[form]
    return agg, hook(agg, clip)
