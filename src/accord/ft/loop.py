"""A fault-tolerant worker's objects for the one loop (:func:`accord.run.loop.run_loop`):
its membership (the torchft quorum of every step, committed or discarded) and its
recorder (the worker's own file ``logs/ft<i>.jsonl``, which the launcher merges into
``metrics.jsonl``, see :mod:`accord.ft.launcher`).

Every step is bracketed by ``FTWorker.begin``/``end``: :class:`FTMembership` yields the
committed step of the quorum (a step lost at the quorum is discarded without training;
a joiner that finds itself alone at step 0 ends, the run is over) and commits it.
:class:`FTRecords` takes the record's mean loss and consensus through the loop's own
:class:`accord.ft.membership.FTCommunicator` inside the bracket (a failure discards the step); the
quorum's rank 0 evaluates and writes the record once the step is committed. Divergence is
the local loop's (:mod:`accord.run.records`): non-finite parameters on any replica or a
non-finite evaluation of the consensus model, agreed by a MAX inside the step, so every
participant stops at the same committed record.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..comm import FlatBuffer
from ..core import StepContext
from ..observe import divergence, finite_or_none, state_tensors
from ..run.config import TrainConfig
from ..run.failures import Heartbeat
from ..run.loop import Tally, Worker

#: a replica's divergence reason when only another replica's evaluation was non-finite
ANOTHER = "non-finite on another replica"

Emit = Callable[[dict[str, Any]], None]


class FTMembership:
    """The steps of a fault-tolerant worker: a quorum before each (``FTWorker.begin``), a
    commit after it (``FTWorker.end``: committed, or rolled back to the snapshot)."""

    def __init__(self, ft_worker: Any, worker: Worker, emit: Emit, heartbeat: Heartbeat,
                 steps: int, replica: int, joiner: bool) -> None:
        self.ft, self.w, self.emit, self.heartbeat = ft_worker, worker, emit, heartbeat
        self.steps, self.replica, self.joiner = steps, replica, joiner
        #: a joiner found no live peer: the run had ended, it wrote its last record
        self.alone = False

    def __iter__(self) -> Iterator[int]:
        ft, first = self.ft, True
        while ft.step < self.steps:
            self.heartbeat.beat(ft.step, "quorum")
            step = ft.begin()
            if first and self.joiner and ft.participants == [self.replica] and step == 0:
                # alone at step 0: the peers are gone (the split-brain guard keeps a lone
                # joiner out of a quorum while they heartbeat), so the run has ended; do
                # not train alone from scratch
                self.emit({"type": "done", "rank": self.replica, "steps": 0, "discarded": 0,
                           "note": "no live peer to join"})
                self.alone = True
                return
            first = False
            if ft.healed and step > 0 and hasattr(self.w.agg, "note_join"):
                self.w.agg.note_join(step)  # joined the running job: e.g. EASGD's fade-in
            for event in ft.drain_events():
                self.emit({**event, "time": time.time()})
            if step >= self.steps:
                return
            if ft.step_lost:
                self.emit({"type": "event", "kind": "discarded", "step": step,
                           "rank": self.replica, "reason": "lost at the quorum",
                           "time": time.time()})
                ft.end()
                continue
            yield step

    def commit(self, step: int) -> bool:
        participants = list(self.ft.participants or [])
        committed = self.ft.end()
        for event in self.w.injector.drain():
            self.emit({"type": "event", **event})
        if not committed:
            self.emit({"type": "event", "kind": "discarded", "step": step,
                       "rank": self.replica, "participants": participants,
                       "time": time.time()})
        return committed


class FTRecords:
    """A fault-tolerant worker's recorder (module docstring); ``finish`` writes its last
    record (``done``) and says whether the run diverged."""

    def __init__(self, cfg: TrainConfig, worker: Worker, tally: Tally,
                 membership: FTMembership, book: Any, emit: Emit, heartbeat: Heartbeat,
                 replica: int) -> None:
        self.cfg, self.w, self.tally, self.membership = cfg, worker, tally, membership
        self.book, self.emit, self.heartbeat, self.replica = book, emit, heartbeat, replica
        self.flat = FlatBuffer(state_tensors(worker.model))
        self.eval_model: torch.nn.Module | None = None
        self.record: dict[str, Any] | None = None
        self.flagged: dict[str, Any] | None = None
        self.diverged: dict[str, Any] | None = None

    def on_record(self, step: int, ctx: StepContext) -> None:
        self.record = self.flagged = None
        cfg = self.cfg
        if not ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            return
        began = time.perf_counter()
        try:
            self._record(step, ctx, began)
        finally:  # the record's time is left out of the run's clock, as in the local loop
            self.tally.pause(time.perf_counter() - began)

    def _record(self, step: int, ctx: StepContext, began: float) -> None:
        w, book, ft = self.w, self.book, self.membership.ft
        self.heartbeat.beat(step, "record")
        n, rank = book.world_size, book.rank
        participants = list(ft.participants or [])
        mean_loss = book.all_reduce_(ctx.loss.reshape(1).clone(), op="avg")
        x = self.flat.load_values()
        mean = x.clone()
        book.all_reduce_(mean, op="avg")
        sq = (x - mean).double().pow(2).sum().reshape(1)
        distance = float(book.all_reduce_(sq, op="avg"))
        evaluation: dict[str, Any] = {}
        if rank == 0 and not ft.step_lost:
            evaluation = w.task.evaluate(self.consensus(mean))
            replica_eval = w.task.evaluate(w.model)
            stats = w.agg.comm.stats
            self.record = {
                "type": "step", "step": step + 1, "loss": finite_or_none(float(mean_loss)),
                **{k: finite_or_none(v) for k, v in evaluation.items()},
                **{f"rank0_{k}": finite_or_none(v) for k, v in replica_eval.items()},
                "consensus_distance": finite_or_none(distance),
                "time_s": began - self.tally.start,
                "comm_bytes": stats.bytes, "comm_calls": stats.calls, "comm_s": stats.seconds,
                "participants": participants, "n": n, "writer": self.replica,
                "algo": {k: finite_or_none(v) for k, v in w.agg.metrics().items()}}
        # diverged, as in the local loop: non-finite parameters on any replica (the
        # distance), or a non-finite evaluation of the consensus model (quorum rank 0's);
        # agreed by a MAX inside the step, so every participant stops at the same
        # committed record
        reason = divergence(distance, evaluation)
        flag = book.all_reduce_(torch.tensor([float(reason is not None)]),  # host: gloo
                                op="max", kind="diverged")
        if bool(flag[0] > 0):
            self.flagged = {"diverged_step": step + 1, "diverged_reason": reason or ANOTHER}

    def consensus(self, mean: torch.Tensor) -> torch.nn.Module:
        """A copy of the model holding the consensus: the replicas' mean, or the
        algorithm's own centre (e.g. EASGD's)."""
        if self.eval_model is None:
            self.eval_model = copy.deepcopy(self.w.model)
        target = FlatBuffer(state_tensors(self.eval_model))
        target.store_values(mean)
        centre = self.w.agg.consensus_params()
        if centre is not None:
            with torch.no_grad():
                for t, c in zip(target.tensors, centre, strict=True):
                    t.copy_(c)
        return self.eval_model

    def on_commit(self, step: int, committed: bool) -> None:
        if committed and self.record is not None:
            self.emit(self.record)
        if committed and self.flagged is not None:
            self.diverged = self.flagged

    def should_stop(self, step: int) -> bool:
        return self.diverged is not None

    def finish(self) -> bool:
        if self.membership.alone:
            return False
        ft, stats = self.membership.ft, self.w.agg.comm.stats
        self.heartbeat.beat(ft.step, "done")
        self.emit({"type": "done", "rank": self.replica, "steps": ft.step,
                   "discarded": ft.discarded, "participants": ft.participants,
                   "time_s": time.perf_counter() - self.tally.start, "comm_bytes": stats.bytes,
                   "comm_calls": stats.calls, "comm_s": stats.seconds, "comm": stats.as_dict(),
                   **(self.diverged or {})})
        return self.diverged is not None
