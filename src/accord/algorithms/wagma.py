"""WAGMA-SGD: wait-avoiding group model averaging on a rotating butterfly schedule.

Paper: Li, Ben-Nun, Nadiradze, Di Girolamo, Dryden, Alistarh, Hoefler, "Breaking
(Global) Barriers in Parallel Stochastic Optimization with Wait-Avoiding Group
Averaging", IEEE TPDS 32(7), 2021, arXiv 2005.00124. Reference code: the authors' fflib
collective library and TensorFlow optimizer (github.com/Shigangli/WAGMA-SGD).

Update rule (N workers, groups of S, rounds k = 0, 1, ... are the non-global steps)::

    g_i = grad f(x_i)                         (computed at the unmixed model)
    step t is global (due(t, period)):  x_i <- mean_j x_j           blocking allreduce
    otherwise, round k:                 G   = group of i in phase k mod K
                                        m   = sum_{j in G} w_j d_j  (d_j: j's deposit)
                                        x_i <- (S m + x_i) / (S + 1)     self_weight=reference
                                        x_i <- m + w_i (x_i - d_i)       self_weight=mean
    x_i <- optimizer_step(x_i, g_i)

Hook: mixing in ``after_backward`` (before the optimizer step, the reference order).
Communication: per group round one model-size allreduce within the group, a 4-number
all-gather and, wait-avoiding, store messages to activate the round; per global step one
model-size allreduce.

Decisions (in full: docs/algorithms/wagma.md): the schedule (:func:`butterfly_groups`) is
K = ceil(log_S N) phases of sort-by-digit-and-cut, a trailing group of one merged into the
previous group when N is not a power of S; default S the largest power of two <= sqrt(N)
(at least 2); ``period`` 11 (the reference's ``LIMITER 10``); ``wait_avoiding=True`` runs
the rounds on :mod:`accord.exchange.background` (a slow member contributes its last
deposit), the global average waits for everyone (``idle_timeout``, then ``timeout``);
``weighting=dynamic`` fades members without fresh progress; float buffers are mixed with
the parameters, optimizer state stays local."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch

from ..comm import Communicator
from ..core import Hyper, StepContext, due
from ..exchange.background import (
    ExchangeEngine,
    Progress,
    RoundResult,
    Weighting,
    group_round,
    subgroups,
)
from . import register
from ._model import ModelAggregator


def default_group_size(world_size: int) -> int:
    size = 2
    while (size * 2) ** 2 <= world_size:
        size *= 2
    return size


def phases(world_size: int, group_size: int) -> int:
    """K = ceil(log_S N) (at least 1)."""
    k, span = 1, group_size
    while span < world_size:
        span *= group_size
        k += 1
    return k


def butterfly_groups(world_size: int, group_size: int, round_index: int) -> list[list[int]]:
    """The partition of ranks ``0..N-1`` into groups in round ``round_index``."""
    k = phases(world_size, group_size)
    phase = round_index % k

    def digits(r: int) -> list[int]:
        out = []
        for _ in range(k):
            out.append(r % group_size)
            r //= group_size
        return out  # least significant first

    def key(r: int) -> tuple[int, ...]:
        d = digits(r)
        rest = d[:phase] + d[phase + 1:]
        return (*reversed(rest), d[phase])

    order = sorted(range(world_size), key=key)
    groups = [order[i:i + group_size] for i in range(0, world_size, group_size)]
    if len(groups) > 1 and len(groups[-1]) == 1:
        groups[-2].extend(groups.pop())
    return [sorted(g) for g in groups]


def group_of(world_size: int, group_size: int, round_index: int, rank: int) -> list[int]:
    for g in butterfly_groups(world_size, group_size, round_index):
        if rank in g:
            return g
    raise ValueError(f"rank {rank} not in a world of {world_size}")


def mix(x: torch.Tensor, result: RoundResult, self_weight: str) -> None:
    """In place: x <- the round's mix of x (see the module docstring); unchanged when every
    contribution weighed 0. Tensor operations only (a wait-avoiding round's result is in
    host memory and comes to the parameters' device here)."""
    mean = result.mean.to(x.device)
    if self_weight == "reference":
        s = result.meta.shape[0]
        mixed = x.mul(1.0 / (s + 1)).add_(mean, alpha=s / (s + 1))
    else:
        own = result.weight[result.own_index].to(device=x.device, dtype=x.dtype)
        mixed = x.sub(result.own_deposit.to(x.device)).mul_(own).add_(mean)
    x.copy_(torch.where(result.valid.to(x.device), mixed, x))


@register
class WAGMA(ModelAggregator):
    name = "wagma"
    description = ("wait-avoiding group model averaging: rotating butterfly groups, "
                   "global average every `period` steps")
    paper = "Breaking (Global) Barriers ... Wait-Avoiding Group Averaging, arXiv 2005.00124"
    compressible = True
    ft_refusal = "its butterfly groups and subgroup process groups are built once for a fixed N"
    hyperparameters = {
        "group_size": Hyper(None, int, "ranks per group S (default: largest power of two "
                            "<= sqrt(N), at least 2)", low=2),
        "period": Hyper(11, int, "a blocking global average every `period` steps", low=1),
        "wait_avoiding": Hyper(True, bool, "group rounds on the background engine; a slow "
                               "member contributes its last deposit"),
        "self_weight": Hyper("reference", str, "reference: (S m + x)/(S+1); mean: group "
                             "mean with the own current model", choices=("reference", "mean")),
        "weighting": Hyper("uniform", str, "weights of the group's contributions",
                           choices=("uniform", "dynamic")),
        "half_life": Hyper(None, float, "dynamic weighting: staleness (steps) that halves "
                           "a contribution's weight (default: period)", low=0.0, low_open=True),
        "timeout": Hyper(60.0, float, "seconds a started background round may take before "
                         "the worker fails", low=0.0, low_open=True),
        "idle_timeout": Hyper(1800.0, float, "wait-avoiding: seconds a worker may wait at the "
                              "global average for the slowest worker's compute",
                              low=0.0, low_open=True),
    }

    @classmethod
    def check(cls, hp: Mapping[str, Any], world_size: int) -> None:
        size = hp["group_size"]
        if size is not None and size > max(world_size, 2):
            raise ValueError(f"wagma: group_size {size} with N = {world_size}; allowed: "
                             f"2 <= group_size <= {max(world_size, 2)}")

    @classmethod
    def mixes_before_step(cls, hp: Mapping[str, Any]) -> bool:
        return True

    def __init__(self, params, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        hp = self.hp
        n = self.world_size
        self.group_size = hp["group_size"] or default_group_size(n)
        self.k_phases = phases(n, self.group_size)
        self.period = hp["period"]
        self.global_ranks = [self.comm.global_rank(r) for r in range(n)]
        all_groups = [[self.global_ranks[r] for r in g]
                      for k in range(self.k_phases)
                      for g in butterfly_groups(n, self.group_size, k)]
        self.engine: ExchangeEngine | None = None
        self.comms = {}
        self.progress: Progress | None = None
        # used by one thread only: the engine's when wait-avoiding, else the compute thread's
        self.weighting = Weighting(hp["weighting"], hp["half_life"] or float(self.period))
        self._all_groups = all_groups
        if hp["wait_avoiding"] and self.period > 1 and n > 1:
            self.engine = self._make_engine(0)
        elif n > 1:
            self.progress = Progress(self.load_state(), track=hp["weighting"] == "dynamic")
            pgs = subgroups(all_groups, timedelta(seconds=hp["timeout"]))
            self.comms = {g: Communicator(pg, self.comm.stats) for g, pg in pgs.items()}
        self.rounds = 0
        self.global_steps = 0
        self._last_step = 0
        self._last: RoundResult | None = None

    def _make_engine(self, first_round: int) -> ExchangeEngine:
        hp = self.hp
        return ExchangeEngine(self.load_state(), self._group_global, self._all_groups,
                              self.weighting, self.comm.stats, timeout=hp["timeout"],
                              idle_timeout=max(hp["idle_timeout"], hp["timeout"]),
                              on_round=self._keep, first_round=first_round)

    def _keep(self, result: RoundResult) -> RoundResult:
        """What a wait-avoiding round keeps until popped: the reference mix needs the mean
        only, the ``mean`` mix the own deposit too."""
        if self.hp["self_weight"] == "reference":
            result.own_deposit = None
        return result

    def _group_global(self, k: int) -> list[int]:
        g = group_of(self.world_size, self.group_size, k, self.rank)
        return [self.global_ranks[r] for r in g]

    @property
    def avoids_waits(self) -> bool:
        return self.engine is not None

    def synchronised(self, step: int) -> bool:
        # the global average (after an arrival barrier) holds every rank at this step
        return self.world_size > 1 and due(step, self.period)

    @staticmethod
    def round_of(step: int, period: int) -> int:
        """Index of step ``step``'s group round (steps before it that were not global)."""
        return step - step // period

    def groups_at(self, round_index: int) -> list[list[int]]:
        return butterfly_groups(self.world_size, self.group_size, round_index)

    @torch.no_grad()
    def after_backward(self, ctx: StepContext) -> None:
        if self.world_size == 1:
            return
        if due(ctx.step, self.period):
            if self.engine is not None:
                self.engine.arrive()  # the one place that waits for the slowest compute
            self.average_state()
            self.global_steps += 1
            return
        k = self.round_of(ctx.step, self.period)
        x = self.load_state()
        if self.engine is not None:
            self.engine.request(k)
            result = self.engine.pop(k)
        else:
            comm = self.comms.get(tuple(self._group_global(k)))  # None: a group of one
            result = group_round(comm, x, ctx.step, self.progress.observe(x, k),
                                 self.comm.global_rank(self.rank), self.weighting, k)
        self._last_step = ctx.step
        mix(x, result, self.hp["self_weight"])
        self.store_state(x)
        self.rounds += 1
        self._last = result.light()

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        # the model after this step is what the next round contributes
        if self.engine is not None:
            self.engine.note(ctx.healthy)
            self.engine.deposit(self.load_state(), version=ctx.step + 1)
        elif self.progress is not None:
            self.progress.note(ctx.healthy)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rounds": self.rounds,
                "global_steps": self.global_steps, "last_step": self._last_step,
                "last_round": None if self._last is None else self._last.state_dict(),
                "progress": None if self.progress is None else self.progress.state_dict()}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.rounds = int(state.get("rounds", 0))
        self.global_steps = int(state.get("global_steps", 0))
        self._last_step = int(state.get("last_step", 0))
        self._last = RoundResult.from_state(state.get("last_round"))
        if self.progress is not None and state.get("progress") is not None:
            self.progress.load_state_dict(state["progress"])
        if self.engine is not None:
            # a new engine numbered from the checkpoint's round, with the loaded model as
            # its first deposit (collective: every rank loads its state at the same point)
            self.engine.close()
            self.engine = self._make_engine(self.rounds)

    def metrics(self) -> dict[str, float]:
        out = {"group_size": float(self.group_size), "rounds": float(self.rounds),
               "global_steps": float(self.global_steps),
               "use_staleness": 0.0}
        if self._last is not None:
            # steps between this step and the oldest contribution of its last round
            out["use_staleness"] = float(self._last_step - min(self._last.versions))
            out["weight_min"] = float(min(self._last.weights))
            # this worker's own weight relative to uniform (1: uniform; 0: faded out)
            out["weight_own_rel"] = self._last.own_weight * len(self._last.ranks)
            out["staleness_max"] = float(max(self._last.staleness))
        if self.engine is not None:
            out.update(self.engine.metrics())
        return out
