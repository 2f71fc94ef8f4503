"""What a run of a fixed world (local launcher, torchrun) records, as the recorder of the
one loop (:func:`accord.run.loop.run_loop`): every ``log_every`` steps a step record in rank
0's ``metrics.jsonl`` (with the fault events gathered from every rank), the divergence
vote, and the summary at the end.

* :class:`Records` (synchronous algorithms): the record's mean loss and consensus are
  collectives of the loop's own communicator; the vote is a MAX allreduce on the
  idle-bounded group that is also the barrier after rank 0's evaluation (rank 0's
  evaluation is idle time for the others).
* :class:`ObservedRecords` (algorithms that avoid waits, :mod:`accord.observe`): an
  observer thread per rank records without a global wait; the vote is taken only at steps
  where every rank already waits for every other.

Diverged: the replicas' parameters or the consensus model's evaluation became
non-finite; every rank stops at that record (``diverged_step``, ``diverged_reason``).
"""

from __future__ import annotations

import copy
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..comm import Communicator, FlatBuffer
from ..core import Aggregator, StepContext
from ..observe import AsyncObserver, ConsensusProbe, divergence, finite_or_none, state_tensors
from .config import TrainConfig
from .failures import Heartbeat
from .loop import Tally, Worker
from .metrics import MetricsWriter


def idle_group(world: int, idle_timeout: float):
    """A gloo group of every rank whose waits are bounded by ``idle_timeout``: waits for
    another rank's compute (rank 0 evaluating, a straggler finishing its last steps) are
    idle, not failures (None in a world of one)."""
    return dist.new_group(list(range(world)), timeout=timedelta(seconds=idle_timeout),
                          backend="gloo") if world > 1 else None


class Records:
    """The recorder of a synchronous run (module docstring)."""

    inline = True  # the record's collectives on the loop's own communicator

    def __init__(self, cfg: TrainConfig, worker: Worker, tally: Tally,
                 writer: MetricsWriter | None, heartbeat: Heartbeat, comm: Communicator,
                 idle, world: int, device: torch.device) -> None:
        self.cfg, self.w, self.tally, self.writer = cfg, worker, tally, writer
        self.heartbeat, self.comm, self.idle = heartbeat, comm, idle
        self.world, self.device = world, device
        self.diverged: dict[str, Any] | None = None
        self.probe = ConsensusProbe(worker.model, comm) if self.inline else None

    def due(self, step: int) -> bool:
        return (step + 1) % self.cfg.log_every == 0 or step == self.cfg.steps - 1

    def on_record(self, step: int, ctx: StepContext) -> None:
        if not self.due(step):
            return
        began = time.perf_counter()
        try:
            self._record(step, ctx, began)
        finally:  # the record's time (evaluation, the probe's traffic) is not the run's
            self.tally.pause(time.perf_counter() - began)

    def _record(self, step: int, ctx: StepContext, began: float) -> None:
        w, writer = self.w, self.writer
        self.heartbeat.beat(step, "record")
        mean_loss = self.comm.all_reduce_(ctx.loss.reshape(1).clone(), op="avg")
        consensus_model, distance = self.probe.measure(w.agg)
        new_events = gather_events(w.injector.drain(), self.world)
        if writer is not None:
            for event in new_events:
                writer.write({"type": "event", **event})
                self.tally.count(event["kind"])
            evaluation = w.task.evaluate(consensus_model)
            replica = w.task.evaluate(w.model)
            stats = w.agg.comm.stats
            writer.write({"type": "step", "step": step + 1,
                          "loss": finite_or_none(float(mean_loss)),
                          **{k: finite_or_none(v) for k, v in evaluation.items()},
                          **{f"rank0_{k}": finite_or_none(v) for k, v in replica.items()},
                          "consensus_distance": finite_or_none(distance),
                          "time_s": began - self.tally.start,
                          "comm_bytes": stats.bytes, "comm_calls": stats.calls,
                          "comm_s": stats.seconds, "events": len(new_events),
                          "algo": {k: finite_or_none(v) for k, v in w.agg.metrics().items()}})
            writer.last_eval = {k: finite_or_none(v) for k, v in evaluation.items()}
        # diverged: non-finite parameters anywhere, or a non-finite evaluation; the flag is
        # agreed on by an allreduce that is also the barrier after rank 0's evaluation
        # (nobody enters a timed collective while rank 0 evaluates)
        reason = divergence(distance, evaluation if writer is not None else {})
        if agree(reason is not None, self.idle):
            self.diverged = {"diverged_step": step + 1,
                             "diverged_reason": reason or "non-finite on another rank"}
            return
        self.postfix()

    def postfix(self) -> None:
        if self.tally.bar is not None:
            self.tally.bar.set_postfix(loss=f"{float(self.tally.running):.4g}", refresh=False)

    def on_commit(self, step: int, committed: bool) -> None:
        pass  # a fixed world commits every step, and the record is written

    def should_stop(self, step: int) -> bool:
        return self.diverged is not None

    def flush(self) -> None:
        """Every record taken so far is written (before a checkpoint)."""

    def settle(self) -> None:
        """Every record written, and the divergence they showed (at the end)."""

    def finish(self) -> dict[str, Any] | None:
        """The summary (rank 0's, also written; None on the other ranks). Collective."""
        tally, w, writer, device = self.tally, self.w, self.writer, self.device
        elapsed = time.perf_counter() - tally.start
        self.settle()
        if self.idle is not None:  # fast workers of an asynchronous run wait for the slow ones
            dist.barrier(group=self.idle)
        self.heartbeat.beat(tally.steps_done, "summary")
        # rank 0's bytes are not every worker's (a broadcast counts on the sender only)
        stats = w.agg.comm.stats
        mean_bytes = self.comm.all_reduce_(torch.tensor([float(stats.bytes)],
                                                        dtype=torch.float64, device=device),
                                           op="avg")
        # each worker's own wall time: asynchronous algorithms let fast workers finish first
        worker_times = self.comm.all_gather(torch.tensor([tally.train_end - tally.start],
                                                         dtype=torch.float64, device=device))
        if writer is None:
            return None
        # the run's wall time from its first attempt's start (restarts and lost work
        # included); train_s is the loop's clock, continued from checkpoints
        now = time.time()
        attempts = writer.attempts
        summary = {"type": "summary", "status": "ok" if self.diverged is None else "diverged",
                   **(self.diverged or {}), "steps": tally.steps_done,
                   "time_s": now - attempts[0]["started"] - tally.recorded,
                   "train_s": elapsed, "record_s": tally.recorded,
                   "attempts": [
                       {"from_step": a["from_step"],
                        "seconds": (b["started"] if b is not None else now) - a["started"]}
                       for a, b in zip(attempts, [*attempts[1:], None], strict=True)],
                   "steps_per_s": tally.steps_done / elapsed,
                   "comm_bytes": stats.bytes, "comm_bytes_mean": float(mean_bytes),
                   "comm_calls": stats.calls,
                   "comm_s": stats.seconds, "comm": stats.as_dict(),
                   "worker_time_s": [float(t) for t in worker_times.reshape(-1)],
                   "events": tally.events, **writer.last_eval}
        writer.write(summary)
        return summary


class ObservedRecords(Records):
    """The recorder of an algorithm that avoids waits: records by an
    :class:`accord.observe.AsyncObserver` (module docstring)."""

    def __init__(self, cfg: TrainConfig, worker: Worker, tally: Tally,
                 writer: MetricsWriter | None, heartbeat: Heartbeat, comm: Communicator,
                 idle, world: int, device: torch.device, rank: int) -> None:
        super().__init__(cfg, worker, tally, writer, heartbeat, comm, idle, world, device)
        self.observer = AsyncObserver(worker.model, worker.agg, world, rank, cfg.idle_timeout,
                                      async_writer(worker.task, worker.model, writer, tally))

    def on_record(self, step: int, ctx: StepContext) -> None:
        w, observer = self.w, self.observer
        if self.due(step):
            self.heartbeat.beat(step, "record")
            observer.submit(step + 1, ctx.loss, w.injector.drain(), None if self.writer is None
                            else record_fields(w.agg, self.tally.start))
            self.postfix()
        # stop only where every rank already waits for every other: the vote adds no wait
        # there (a diverged run without such a step ends at its last step)
        if w.agg.synchronised(step) and agree(observer.diverged is not None, self.idle):
            observer.flush()
            self.diverged = observer.diverged or {"diverged_step": step + 1,
                                                  "diverged_reason": "non-finite"}

    inline = False

    def flush(self) -> None:
        self.observer.flush()

    def settle(self) -> None:
        self.observer.flush()
        if self.diverged is None and self.observer.diverged is not None:
            self.diverged = self.observer.diverged  # found after the last synchronised step


def record_fields(agg: Aggregator, start: float) -> dict[str, Any]:
    """Rank 0's part of an asynchronous step record, taken at the step itself."""
    stats = agg.comm.stats
    return {"time_s": time.perf_counter() - start, "comm_bytes": stats.bytes,
            "comm_calls": stats.calls, "comm_s": stats.seconds,
            "algo": {k: finite_or_none(v) for k, v in agg.metrics().items()}}


def async_writer(task, model: torch.nn.Module, writer: MetricsWriter | None, tally: Tally):
    """What rank 0's observer thread does with a record's gathered numbers: evaluate the
    consensus and rank 0's own snapshot on copies of the model, write the fault events and
    the step record (the same fields as the inline path's, plus how stale it is)."""
    if writer is None:
        return lambda obs, result: None
    consensus, replica = copy.deepcopy(model), copy.deepcopy(model)
    into_consensus = FlatBuffer(state_tensors(consensus))
    into_replica = FlatBuffer(state_tensors(replica))

    def write(obs, result: dict[str, Any]) -> dict[str, float]:
        for event in result["events"]:
            writer.write({"type": "event", **event})
            tally.count(event["kind"])
        into_consensus.store_values(result["mean"] if result["centre"] is None
                                    else result["centre"])
        into_replica.store_values(result["own"])
        evaluation = task.evaluate(consensus)
        own = task.evaluate(replica)
        fields = dict(obs.record)
        algo = fields.pop("algo", {})
        writer.write({"type": "step", "step": obs.step, "loss": finite_or_none(result["loss"]),
                      **{k: finite_or_none(v) for k, v in evaluation.items()},
                      **{f"rank0_{k}": finite_or_none(v) for k, v in own.items()},
                      "consensus_distance": finite_or_none(result["distance"]), **fields,
                      "events": len(result["events"]),
                      "consensus_steps": result["consensus_steps"],
                      "record_lag_s": result["record_lag_s"], "algo": algo})
        writer.last_eval = {k: finite_or_none(v) for k, v in evaluation.items()}
        return evaluation

    return write


def agree(flag: bool, group) -> bool:
    """Whether any rank raised ``flag`` (a MAX allreduce on ``group``, also a barrier)."""
    if group is None:
        return flag
    t = torch.tensor([float(flag)])  # host: the idle group is gloo, on the CPU
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t[0] > 0)


def gather_events(mine: list[dict[str, Any]], world: int) -> list[dict[str, Any]]:
    """Every rank's events since the last record, on rank 0 (collective), ordered by
    (step, rank)."""
    if world == 1:
        return mine
    gathered: list[list[dict[str, Any]] | None] = [None] * world
    dist.all_gather_object(gathered, mine)
    out = [e for part in gathered for e in (part or [])]
    return sorted(out, key=lambda e: (e["step"], e["rank"]))
