"""Observing a run: the consensus model, its distance, and records that never add a wait.

A metrics record needs every rank: the mean training loss, the consensus model (the mean
of the replicas, or the algorithm's centre) and the consensus distance, the fault events
of every rank, and rank 0's evaluation. Two paths gather them.

**Inline** (:class:`ConsensusProbe`, synchronous algorithms): at a record step every rank
enters the collectives on the loop's communicator and rank 0 evaluates; the divergence
vote that follows doubles as the barrier after rank 0's evaluation. A synchronous
algorithm waits for the slowest rank at its next collective anyway, so this adds no wait
that the algorithm avoids.

**Asynchronous** (:class:`AsyncObserver`, algorithms whose :attr:`~accord.core.Aggregator.
avoids_waits` is true: wait-avoiding WAGMA, asynchronous EASGD). A global collective at
every record would make the fast ranks run at the slowest rank's pace (measured: 4
workers, two of them slowed by 50 ms a step, WAGMA with a record every 10 steps ran its
fast ranks 6x slower than with no records). Instead, at a record step the compute thread
*only copies*: its model state to a host snapshot, its loss, the fault events since the
last record, and (rank 0) the algorithm's metrics, its traffic counters and the centre.
A thread per rank (the observer) then runs the record's collectives on a gloo group of
its own, one record after another in step order, so the records of every rank match;
rank 0's observer evaluates and writes the record. The compute thread never waits for
it: a fast rank's observer waits for a slow rank's observer to reach the same record,
and meanwhile the fast rank trains on.

* What a record measures is exact: the consensus of record ``s`` is the mean of the
  replicas *at step s* on every rank, the same numbers the inline path gives for the
  same models. A record carries ``consensus_steps`` = [lowest, highest] step of the
  snapshots it averaged ([s, s] unless the snapshot pool ran out, below) and
  ``record_lag_s``, how long after rank 0 reached the step the record was computed.
* Memory: at most :data:`SNAPSHOTS` model-size host snapshots per rank wait for their
  record. A rank so far ahead that the pool is exhausted puts its newest state into its
  newest waiting snapshot instead (that record then averages a later model of this rank,
  which ``consensus_steps`` shows), so memory stays bounded and the compute never waits.
* Divergence (a non-finite consensus distance, or a non-finite evaluation on rank 0) is
  found by the observers, later than the step it happened at. Stopping must happen at the
  same step on every rank, so the loop votes only at steps where the algorithm has just
  synchronised every rank anyway (:meth:`~accord.core.Aggregator.synchronised`: WAGMA's
  global average) and at the end; the summary's ``diverged_step`` is the first record
  that showed it. An asynchronous run without such steps (asynchronous EASGD) runs to its
  last step and is then marked ``diverged``.
* A checkpoint waits for every rank anyway (see :func:`accord.run.train._checkpoint`); the
  loop first lets the observers finish every record up to it, so the records and the
  checkpoint agree.
* A failure in the observer (a peer gone mid-collective, which the group's
  ``idle_timeout`` bounds) is raised in the compute thread at its next record.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .comm import Communicator, FlatBuffer

#: host snapshots of the model a rank keeps for records not yet observed
SNAPSHOTS = 4


def state_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """What a model-phase algorithm averages: the parameters and floating-point buffers."""
    return [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]


def finite_or_none(x: float) -> float | None:
    return x if x == x and abs(x) != float("inf") else None


def divergence(distance: float, evaluation: dict[str, float]) -> str | None:
    """Why this record shows a diverged run, or None (the training loss alone does not
    count: a rank's non-finite loss is what the non-finite guard handles)."""
    if not (distance == distance and abs(distance) != float("inf")):
        return "non-finite parameters"
    for key, value in evaluation.items():
        if not (value == value and abs(value) != float("inf")):
            return f"non-finite {key} of the consensus model"
    return None


class ConsensusProbe:
    """The consensus model (mean of the replicas, or the algorithm's centre such as EASGD's)
    and ``consensus_distance`` = mean over replicas of ||x_i - mean||^2 (parameters and float
    buffers), measured on a copy: training state and the algorithm's counters are untouched.
    Collective: every rank calls ``measure``; rank 0 gets the model to evaluate."""

    def __init__(self, model: torch.nn.Module, comm: Communicator) -> None:
        self.comm = comm
        self.flat = FlatBuffer(state_tensors(model))
        self.mean = self.flat.new_buffer()
        self.model = copy.deepcopy(model) if comm.rank == 0 else None
        self.target = FlatBuffer(state_tensors(self.model)) if self.model is not None else None

    @torch.no_grad()
    def measure(self, agg) -> tuple[torch.nn.Module | None, float]:
        x = self.flat.load_values()
        self.mean.copy_(x)
        self.comm.all_reduce_(self.mean, op="avg")
        sq = (x - self.mean).double().pow(2).sum().reshape(1)
        distance = float(self.comm.all_reduce_(sq, op="avg"))
        if self.target is None:
            return None, distance
        self.target.store_values(self.mean)
        centre = agg.consensus_params()
        if centre is not None:
            if len(centre) != len(self.target.tensors):
                raise RuntimeError(f"{agg.name}: consensus_params gave {len(centre)} tensors "
                                   f"for a model state of {len(self.target.tensors)}")
            for t, c in zip(self.target.tensors, centre, strict=True):
                t.copy_(c)
        return self.model, distance


class _Snapshot:
    """A host copy of this rank's model state, shared by the records that use it."""

    def __init__(self, numel: int, dtype: torch.dtype) -> None:
        self.values = torch.empty(numel, dtype=dtype)  # host: the observer's group is gloo
        self.version = 0
        self.users = 0


@dataclass
class Observation:
    """What the compute thread hands over at a record step (after step ``step - 1``)."""

    step: int  # the record's step (steps done)
    loss: float  # this rank's training loss of the step
    events: list[dict[str, Any]]
    snapshot: _Snapshot
    taken: float  # time.perf_counter() when the compute thread took it
    # rank 0 only: the rest of the step record, and the centre to evaluate (or None)
    record: dict[str, Any] = field(default_factory=dict)
    centre: torch.Tensor | None = None


class AsyncObserver:
    """Records of an asynchronous run without a global wait (see the module docstring).

    Every rank builds one (collective: it creates the observer's process group) and calls
    :meth:`submit` at the same record steps; :meth:`flush` waits until every submitted
    record is done (before a checkpoint and at the end); :meth:`close` stops the thread.
    ``write(observation, result)`` runs on rank 0's observer thread with the gathered
    numbers and returns the step record's evaluation (or None)."""

    def __init__(self, model: torch.nn.Module, agg, world: int, rank: int, idle_timeout: float,
                 write: Callable[[Observation, dict[str, Any]], dict[str, float] | None]) -> None:
        self.rank, self.world = rank, world
        self.agg = agg
        self.write = write
        self.flat = FlatBuffer(state_tensors(model))
        values = self.flat.buffer
        self.dtype = values.dtype
        # a wait here is a peer's compute (it has not reached the record yet): idle time
        self.group = dist.new_group(list(range(world)), backend="gloo",
                                    timeout=timedelta(seconds=idle_timeout))
        self.pool = [_Snapshot(values.numel(), values.dtype) for _ in range(SNAPSHOTS)]
        self.mean = torch.empty(values.numel(), dtype=values.dtype)  # host: gloo group
        self.queue: deque[Observation] = deque()
        self.cond = threading.Condition()
        self.busy = False  # the thread is working on an observation it popped
        self.stopping = False
        self.error: BaseException | None = None
        self.failed_step: int | None = None
        #: {"diverged_step", "diverged_reason"} of the first record that showed divergence
        self.diverged: dict[str, Any] | None = None
        self.thread = threading.Thread(target=self._run, name="accord-observer", daemon=True)
        self.thread.start()

    # -- the compute thread ------------------------------------------------------------
    @torch.no_grad()
    def submit(self, step: int, loss: torch.Tensor, events: list[dict[str, Any]],
               record: dict[str, Any] | None = None) -> None:
        """Hand over record ``step``: copies only, never a wait for another rank."""
        self.check()
        centre = None
        if record is not None:
            params = self.agg.consensus_params()
            if params is not None:
                centre = torch.cat([p.detach().reshape(-1).to("cpu", self.dtype)
                                    for p in params])
        with self.cond:
            snap = next((s for s in self.pool if s.users == 0), None)
            if snap is None:  # the pool is exhausted: refresh the newest waiting snapshot
                snap = self.queue[-1].snapshot
            self.flat.load_values(snap.values)  # device to host, one copy
            snap.version = step
            snap.users += 1
            self.queue.append(Observation(step, float(loss), list(events), snap,
                                          time.perf_counter(), dict(record or {}), centre))
            self.cond.notify_all()

    def flush(self) -> None:
        """Wait until every submitted record is done (a peer's observer may be waited for:
        call it where the loop waits for every rank anyway)."""
        with self.cond:
            while (self.queue or self.busy) and self.error is None:
                self.cond.wait(0.5)
        self.check()

    def check(self) -> None:
        if self.error is not None:
            where = f" at the record of step {self.failed_step}" if self.failed_step else ""
            raise RuntimeError(f"observer{where}: {self.error}") from self.error

    def close(self, abort: bool = False) -> None:
        with self.cond:
            self.stopping = True
            if abort:
                self.queue.clear()
            self.cond.notify_all()
        if not abort:
            self.thread.join()
        else:  # a thread inside a collective ends with the group (timeout or teardown)
            self.thread.join(timeout=1.0)

    # -- the observer thread ---------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.stopping:
                    self.cond.wait()
                if not self.queue:
                    return
                obs = self.queue.popleft()
                self.busy = True
            try:
                self._observe(obs)
            except BaseException as exc:  # noqa: BLE001 - handed to the compute thread
                with self.cond:
                    self.error, self.failed_step = exc, obs.step
                    self.queue.clear()
                    self.busy = False
                    self.cond.notify_all()
                return
            with self.cond:
                obs.snapshot.users -= 1
                self.busy = False
                self.cond.notify_all()

    @torch.no_grad()
    def _observe(self, obs: Observation) -> None:
        group, n = self.group, self.world
        with self.cond:  # the compute thread may refresh a waiting snapshot: copy under lock
            x = obs.snapshot.values.clone()
            version = obs.snapshot.version
        head = torch.tensor([obs.loss, float(version), -float(version)],  # host: gloo group
                            dtype=torch.float64)
        lows = head.clone()
        dist.all_reduce(head, group=group)  # sum of the losses (the rest is overwritten)
        dist.all_reduce(lows, op=dist.ReduceOp.MIN, group=group)
        self.mean.copy_(x)
        dist.all_reduce(self.mean, group=group)
        self.mean.div_(n)
        sq = (x - self.mean).double().pow(2).sum().reshape(1)
        dist.all_reduce(sq, group=group)
        distance = float(sq[0]) / n
        gathered: list[Any] = [None] * n
        dist.all_gather_object(gathered, obs.events, group=group)
        evaluation = None
        if self.rank == 0:
            evaluation = self._write(obs, x, head, lows, distance, gathered)
        reason = divergence(distance, evaluation or {})
        if reason is not None and self.diverged is None:
            self.diverged = {"diverged_step": obs.step, "diverged_reason": reason}

    def _write(self, obs: Observation, x: torch.Tensor, head: torch.Tensor, lows: torch.Tensor,
               distance: float, gathered: list[Any]) -> dict[str, float] | None:
        n = self.world
        events = sorted((e for part in gathered for e in (part or [])),
                        key=lambda e: (e["step"], e["rank"]))
        result = {"loss": float(head[0]) / n, "distance": distance, "events": events,
                  "mean": self.mean, "centre": obs.centre,
                  "consensus_steps": [int(lows[1]), int(-lows[2])],
                  "record_lag_s": time.perf_counter() - obs.taken, "own": x}
        return self.write(obs, result)
