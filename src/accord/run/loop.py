"""The one training loop: the local launcher's and torchrun's workers and the workers of
``accord train --fault-tolerant`` all run :func:`run_loop` (its settings:
:mod:`accord.run.config`).

The loop knows no launch mode, algorithm or fault: it calls objects at named points::

    for step in membership:              # the next step: range(first, steps), or
                                         # a torchft quorum's (accord.ft.loop)
        hook.before_step(step)           # heartbeat; crash / kill / hang
        ctx = step_fn(step)              # Step: gradients, guard, aggregator, optimizer
        hook.after_step(step, ctx)       # running loss, progress
        recorder.on_record(step, ctx)    # a record when due, the divergence vote
        committed = membership.commit(step)   # fault-tolerant: committed or discarded
        recorder.on_commit(step, committed)
        if committed and recorder.should_stop(step): stop   # diverged
        if committed: hook.after_commit(step)                # checkpoint
    recorder.finish()                    # the summary (or a replica's last record)

:class:`Step` (the step function) is the same on every launch mode::

    faults: freeze snapshot
    zero grads in place; accum_steps x (forward, backward of loss / accum_steps)
    faults: delay / slow sleep, nan gradients, frozen rank's gradients zeroed
    non-finite guard (``nonfinite``)
    agg.after_backward(ctx); (oracle lr) optimizer.step()
    faults: frozen rank back to its snapshot (the aggregator sees the frozen model)
    agg.after_step(ctx)
    faults: frozen rank back to its snapshot

Gradients of the ``accum_steps`` micro-batches are averaged locally without
communication before the aggregator sees them.

The non-finite guard (``TrainConfig.nonfinite``, ``--nonfinite``) checks the local
gradient after backward and before the aggregator's first hook:

* ``exclude`` (default): a rank whose gradient holds a NaN or Inf zeroes it for this step
  and takes part as usual (its model is finite, its gradient contributes zero, so an
  allreduce average is scaled by (n-1)/n that step; the optimizer still applies momentum
  and weight decay). The step is passed to the aggregator as ``StepContext(healthy=False)``
  (dynamic weighting does not count it as progress). Purely local: no extra
  communication, fine for asynchronous algorithms.
* ``skip``: one 1-number MAX allreduce on the loop's own communicator (not counted as the
  algorithm's traffic) per step; if any rank's gradient is non-finite, every rank skips
  the whole step (no aggregator hook, no optimizer step).
* ``off``: no check; a NaN spreads through the aggregation.

:func:`nonfinite_grads` is the same check for Python API users.
"""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .. import algorithms, checkpoint
from ..core import Aggregator, StepContext
from ..observe import state_tensors
from ..tasks import Task, get_task, stream_seed, to_device
from . import faults
from .config import SECOND_ORDER, TrainConfig
from .failures import Heartbeat

#: key of the global generators' seed, beside (seed, rank): distinct from the data stream's
RNG_KEY = 0x5EED


# -- the loop and its points ----------------------------------------------------------------

class Membership(Protocol):
    """Which step comes next (iterating) and whether a step counts (``commit``)."""

    def __iter__(self) -> Iterator[int]: ...

    def commit(self, step: int) -> bool: ...


class Recorder(Protocol):
    """A run's records: ``on_record`` at every step (a record when due, the divergence
    vote), ``on_commit`` once the step is committed or discarded, ``should_stop`` after a
    committed step (the run diverged: ``diverged`` says where), ``finish`` at the end."""

    diverged: dict[str, Any] | None

    def on_record(self, step: int, ctx: StepContext) -> None: ...

    def on_commit(self, step: int, committed: bool) -> None: ...

    def should_stop(self, step: int) -> bool: ...

    def finish(self) -> Any: ...


class Hook:
    """An object the loop calls around every step; each point does nothing by default."""

    def before_step(self, step: int) -> None:
        pass

    def after_step(self, step: int, ctx: StepContext) -> None:
        pass

    def after_commit(self, step: int) -> None:
        pass


def run_loop(membership: Membership, step_fn, recorder: Recorder,
             hooks: Sequence[Hook] = ()) -> Any:
    """Train until ``membership`` has no step left or ``recorder`` stops the run (it
    diverged); returns ``recorder.finish()``. The module docstring names every point."""
    for step in membership:
        for hook in hooks:
            hook.before_step(step)
        ctx = step_fn(step)
        for hook in hooks:
            hook.after_step(step, ctx)
        recorder.on_record(step, ctx)
        committed = membership.commit(step)
        recorder.on_commit(step, committed)
        if committed and recorder.should_stop(step):
            break
        if committed:
            for hook in hooks:
                hook.after_commit(step)
    return recorder.finish()


class Steps:
    """The membership of a fixed world (local launcher, torchrun): steps ``first`` ..
    ``last - 1``, each one committed."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.first, self.last))

    def commit(self, step: int) -> bool:
        return True


class Liveness(Hook):
    """The heartbeat file's ``compute`` phase at the start of every step (the launchers
    read it: a worker whose heartbeat stops is hung)."""

    def __init__(self, heartbeat: Heartbeat) -> None:
        self.heartbeat = heartbeat

    def before_step(self, step: int) -> None:
        self.heartbeat.beat(step, "compute")


class Faults(Hook):
    """The injected faults of the start of a step (crash, kill, hang); the others act
    inside :class:`Step`."""

    def __init__(self, injector: faults.Injector) -> None:
        self.injector = injector

    def before_step(self, step: int) -> None:
        self.injector.before_step(step)


class Tally(Hook):
    """What the loop's objects share: the loop's clock (``start``, continued from a
    checkpoint; it stands still while a record is taken, :meth:`pause`), the running loss
    (on the device, read at records only), the steps done, when the last step's own work
    ended, fault events counted by kind, the progress bar."""

    def __init__(self, running: torch.Tensor | None = None, first: int = 0,
                 events: dict[str, int] | None = None, bar: Any = None,
                 recorded: float = 0.0) -> None:
        self.running, self.steps_done = running, first
        self.events = dict(events or {})
        self.bar = bar
        self.recorded = recorded  # seconds spent taking records, left out of the clock
        self.start_clock()

    def start_clock(self, elapsed: float = 0.0) -> None:
        """The loop's clock starts now, at ``elapsed`` seconds (a resumed run's continues
        from its checkpoint's)."""
        self.start = time.perf_counter() - elapsed
        self.train_end = time.perf_counter()  # a resume at the last step runs no step

    def pause(self, seconds: float) -> None:
        """Leave ``seconds`` (a record just taken, after the last step's end) out of the
        loop's clock: measuring does not lengthen the run it measures."""
        self.start += seconds
        self.train_end += seconds
        self.recorded += seconds

    def after_step(self, step: int, ctx: StepContext) -> None:
        self.train_end = time.perf_counter()  # before the record's collectives wait
        self.running = ctx.loss.clone() if self.running is None \
            else self.running.lerp_(ctx.loss, 0.1)
        if self.bar is not None:
            self.bar.update(1)
        self.steps_done = step + 1

    def count(self, kind: str) -> None:
        self.events[kind] = self.events.get(kind, 0) + 1


# -- one rank's parts ------------------------------------------------------------------------

@dataclass
class Worker:
    """What one rank trains (:func:`build_worker`); ``first`` and ``extra``: the step and
    the extra state of the checkpoint it resumed from."""

    task: Task
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    agg: Aggregator
    injector: faults.Injector
    first: int = 0
    extra: dict[str, Any] | None = None


def build_worker(cfg: TrainConfig, rank: int, world: int, device: torch.device, logs: Path,
                 resume: Path | None = None) -> Worker:
    """Seed, build the task, model, optimizer, aggregator and fault injector of ``rank``,
    and restore them from the checkpoint ``resume`` if given."""
    seed_worker(cfg.seed, rank)  # before the task builds anything (a resume restores it)
    task = get_task(cfg.task)(cfg.seed, cfg.data_dir, split=cfg.eval_split).to(device)
    model = task.build_model().to(device)
    optimizer = make_optimizer(cfg, model.parameters())
    saved = None
    if resume is not None:
        # the model and optimizer first: an aggregator snapshots the model when it is built
        # (EASGD's centre, the background engine's first deposit)
        saved = checkpoint.read(resume, map_location=device)
        checkpoint.restore(saved, model, optimizer, rng=False)
    # every rank built the same model from the run seed: no initial broadcast, so the
    # algorithm's traffic counts only what it sends per step
    agg = algorithms.build(cfg.algo, model.parameters(), buffers=model.buffers(),
                           broadcast=False, **algorithm_hyperparameters(cfg))
    injector = faults.Injector([faults.parse(s, world, cfg.steps) for s in cfg.faults], rank,
                               world, cfg.seed, fired_dir=logs)
    worker = Worker(task, model, optimizer, agg, injector)
    if saved is not None:
        checkpoint.restore(saved, aggregator=agg, rng=True)
        worker.first, worker.extra = int(saved["step"]), saved.get("extra", {})
    return worker


def algorithm_hyperparameters(cfg: TrainConfig) -> dict[str, Any]:
    """The run's hyperparameters, and the run's ``timeout`` and ``idle_timeout`` for an
    algorithm that takes them and was not given its own (background rounds follow the
    run's timeouts)."""
    hp = dict(cfg.hyperparameters)
    spec = algorithms.get(cfg.algo).hyperparameters
    for key in ("timeout", "idle_timeout"):
        if key in spec and key not in hp:
            hp[key] = getattr(cfg, key)
    return hp


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    lr, wd, mom = cfg.resolved_lr(), cfg.weight_decay, cfg.resolved_momentum()
    if cfg.optimizer in ("sgd", "nesterov"):
        return torch.optim.SGD(params, lr=lr, momentum=mom, weight_decay=wd,
                               nesterov=cfg.optimizer == "nesterov" and mom > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if cfg.optimizer == "adahessian":  # pytorch-optimizer's (extra: adahessian)
        from .._extras import require

        return require("pytorch_optimizer", "adahessian").AdaHessian(params, lr=lr,
                                                                       weight_decay=wd)
    if cfg.optimizer == "muon":
        from ..optim import MuonAdamW

        return MuonAdamW(params, lr=lr, weight_decay=wd, momentum=mom)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


def seed_worker(seed: int, rank: int) -> None:
    """Seed every global generator a task, model, optimizer or user code may draw from
    (torch on the CPU and every GPU, numpy, ``random``) from (run seed, rank): dropout masks
    and AdaHessian's Hutchinson probes then repeat from run to run and differ between ranks,
    as the data streams do. (Initial models come from the task's own seeded generator and
    data streams from generators keyed (seed, rank), so neither depends on this.)"""
    value = stream_seed(seed, rank, RNG_KEY)
    torch.manual_seed(value)  # also seeds every CUDA device
    np.random.seed(value % 2**32)
    random.seed(value)


# -- the step function -----------------------------------------------------------------------

class Batches:
    """A rank's training stream with its position in micro-batches: ``skip_to(step)``
    continues it where ``step`` starts (a resumed run, a replica that joined late)."""

    def __init__(self, stream: Iterator[Any], accum_steps: int) -> None:
        self.stream, self.accum_steps, self.used = stream, accum_steps, 0

    def skip_to(self, step: int) -> None:
        while self.used < step * self.accum_steps:
            next(self.stream)
            self.used += 1

    def __next__(self) -> Any:
        self.used += 1
        return next(self.stream)


class Step:
    """One optimizer step of one rank (module docstring); returns its StepContext.
    ``comm``: the loop's own communicator (the guard's ``skip`` vote)."""

    def __init__(self, cfg: TrainConfig, worker: Worker, batches: Batches,
                 heartbeat: Heartbeat, comm: Any, device: torch.device, rank: int) -> None:
        self.cfg, self.w, self.batches, self.heartbeat = cfg, worker, batches, heartbeat
        self.comm, self.device, self.rank = comm, device, rank
        self.state = state_tensors(worker.model)
        self.params = list(worker.model.parameters())
        self.second_order = cfg.optimizer in SECOND_ORDER
        if self.second_order:  # torch warns of a .grad cycle that zero_grad(set_to_none) breaks
            warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph")

    def __call__(self, step: int) -> StepContext:
        cfg, w, injector, second_order = self.cfg, self.w, self.w.injector, self.second_order
        frozen = injector.freeze_active(step)
        if frozen:
            injector.freeze_snapshot(step, self.state)
        self.batches.skip_to(step)  # a replica that joined late continues at the live step
        # zeroed in place: gradient-phase aggregators bind .grad to their flat buffer,
        # so backward accumulates straight into it (no copy in or out)
        # (a second-order optimizer's gradients carry their graph: set to None, which
        # frees it, as torch advises for create_graph=True)
        w.optimizer.zero_grad(set_to_none=second_order)
        loss_sum = torch.zeros((), device=self.device)
        compute_start = time.perf_counter()
        for _ in range(cfg.accum_steps):
            loss = w.task.loss(w.model, to_device(next(self.batches), self.device))
            # a second-order optimizer differentiates the gradient again
            (loss / cfg.accum_steps).backward(create_graph=second_order)
            loss_sum += loss.detach()
        injector.after_compute(step, time.perf_counter() - compute_start)
        self.heartbeat.beat(step, "aggregate")
        injector.corrupt_grads(step, self.params)
        if frozen:
            injector.freeze_grads(step, self.state, self.params)
        proceed, healthy = guard(cfg.nonfinite, self.params, self.comm, injector, step,
                                 self.rank)
        ctx = StepContext(step=step, loss=loss_sum / cfg.accum_steps, healthy=healthy)
        if proceed:
            w.agg.after_backward(ctx)
            if cfg.oracle_lr:
                for group in w.optimizer.param_groups:
                    group["lr"] = w.task.oracle_lr(w.model)
            if not (frozen and second_order):
                # (a frozen rank's zeroed gradient has no graph for a Hessian-vector
                # product: no second-order step, which hold() would undo anyway)
                w.optimizer.step()
            if frozen:  # the aggregator sees the frozen model, whatever the optimizer did
                injector.hold(self.state)
            w.agg.after_step(ctx)
        if frozen:
            injector.restore(step, self.state)
        return ctx


def nonfinite_grads(params) -> bool:
    """True if any gradient of ``params`` holds a NaN or an Inf (parameters without a
    gradient are ignored). Local and exact: huge finite values are not flagged, and the
    result is read with a single synchronisation."""
    flags = [torch.isfinite(p.grad.detach()).all() for p in params if p.grad is not None]
    return bool(flags) and not bool(torch.stack(flags).all())


def guard(mode: str, params, comm: Any, injector: faults.Injector, step: int,
          rank: int) -> tuple[bool, bool]:
    """The non-finite gradient guard: (proceed, healthy). ``proceed`` is False when this
    step must be skipped (every rank then skips it); ``healthy`` is False when this rank's
    gradient was excluded. exclude: a rank with a non-finite gradient zeroes it (local);
    skip: one 1-number MAX allreduce, and all ranks skip if any had one; off: nothing."""
    if mode == "off":
        return True, True
    bad = nonfinite_grads(params)
    if mode == "exclude":
        if bad:
            for p in params:
                if p.grad is not None:
                    p.grad.zero_()
            injector.events.append({"step": step, "rank": rank, "kind": "nonfinite_grad",
                                    "action": "excluded"})
        return True, not bad
    flag = comm.all_reduce_(torch.tensor([float(bad)], device=params[0].device), op="max")
    if bool(flag[0] > 0):
        if bad:
            injector.events.append({"step": step, "rank": rank, "kind": "nonfinite_grad",
                                    "action": "skipped step"})
        return False, not bad
    return True, True
