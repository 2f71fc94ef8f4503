"""DDP communication-hook forms of the gradient-phase algorithms.

For users who keep ``torch.nn.parallel.DistributedDataParallel``::

    ddp = DistributedDataParallel(model)
    agg, hook = accord.ddp_hook("acga", ddp, momentum=0.99)
    ddp.register_comm_hook(agg, hook)
    ...
    loss.backward()      # DDP calls the hook per gradient bucket; p.grad is aggregated
    opt.step()
    torch.save(agg.state_dict(), ...)   # ACGA's momentum lives in the aggregator

The hook's state is the aggregator ``accord.build`` returns (same class, same
hyperparameters, same ``state_dict`` / ``metrics`` / ``comm.stats``); every collective goes
through its communicator and is counted there. The hook object only keeps what one
backward pass needs. Algorithms: ``allreduce``, ``normalized``, ``acga`` (global and
``per_layer``) and ``adasum``; they give the gradients ``after_backward`` gives, up to
the floating-point order of the sums.

When the work happens. DDP calls the hook once per bucket, in bucket order, on the thread
that runs the backward pass, on every rank alike; ``bucket.is_last()`` marks the last
bucket of the step. gloo matches collectives by their issue order, so every collective
is issued from that call, never from a future's callback:

* ``allreduce`` averages each bucket as it comes (an asynchronous allreduce; backward
  goes on computing the next buckets meanwhile), exactly as DDP's own hook.
* ``acga`` with ``coefficients=exact`` starts the allreduce of each bucket's raw
  gradients as it comes (the sum s). Its other routes have no sum: ``gather`` (the
  default on small models) all-gathers the whole gradient and ``sketch`` (the default on
  large ones) takes the sketch, both at the end.
  Everything that needs the whole gradient -- <g_i, s> and ||g_i|| over all buckets, the
  all-gather of the coefficients, the weighted second allreduce, the norm limit -- runs
  once, in the call for the last bucket, after waiting for the bucket sums.
* ``normalized`` (the global norm) and ``adasum`` (exchanges of the whole vector) have
  nothing to start per bucket; they run in the call for the last bucket.

For the non-last buckets the hook returns a future that the last call completes, after
the final computation has written the result into every bucket's buffer. The final
computation works on the aggregator's own flat buffers (the bucket gradients are copied
in, in parameter order, and the result copied back), so it is the aggregator's maths on
the aggregator's layout and ``metrics()`` reads the last step as after ``after_backward``
(except ``allreduce``, which keeps no copy: its ``metrics()`` does not see hook steps).

The per-bucket allreduce is asynchronous (``Communicator.all_reduce_async_``), counted in
the aggregator's ``stats`` under ``allreduce`` with the seconds from issue to completion.

Clipping. ``clip_grad_norm=`` clips each rank's gradient before it is combined, as
``accord.wrap(..., clip_grad_norm=)`` does, so both routes train the same model; a
``clip_grad_norm_`` the user calls after ``backward`` sees the combined gradient instead
(a no-op for ``acga`` and ``normalized`` at a max norm of 1 or more: their output norm is
at most 1). The clip needs the norm of the whole local gradient, so with it nothing starts
per bucket: ``allreduce`` averages the clipped flat gradient at the last bucket (one
allreduce per step) and ACGA's sum starts there too (no overlap with backward). Under
fp16's ``GradScaler`` the hook sees gradients still multiplied by the loss scale, so the
clip would compare the scaled norm: clip through ``accord.wrap(..., scaler=,
clip_grad_norm=)`` there (``accord.integrations.accelerate`` moves such runs into the optimizer).

Only gradient-phase algorithms have a hook (model-phase ones do not act on gradients;
use ``accord.build`` for them). Under DDP's ``no_sync`` the hook is not called, so
gradient accumulation works as with DDP; unused parameters count as zero gradients, as
in ``after_backward``.
"""

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
