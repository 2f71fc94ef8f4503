"""LSGD: leader stochastic gradient descent, single- and multi-leader.

Paper: Teng, Gao, Chalus, Choromanska, Goldfarb, Weller, "Leader Stochastic Gradient
Descent for Distributed Training of Deep Learning Models", NeurIPS 2019, arXiv
1905.10395. Discrete form as in the authors' code (yunfei-teng/LSGD).

Single leader (``group_size=0``)::

    every step, after the local optimizer step:
        x_i <- (1 - p/period) x_i + (p/period) xhat         (cached leader copy; once known)
    every `period` steps, first:
        l_i   = mean of worker i's last `avg_size` training losses
        L     = argmin_i l_i  (all-gathered; ties -> lowest rank; NaN counts as +inf)
        xhat  = broadcast of x_L from L
        x_i  <- (1 - c) x_i + c xhat

Multi-leader (``group_size=S``): consecutive ranks form groups of S (the last group takes
the remainder); the rule above runs inside each group with ``pull``/``proximal`` every
``period`` steps, and across the world with ``global_pull``/``global_proximal`` every
``global_period`` steps (a multiple of ``period``), local first when both are due.

Decisions: the communication comes before the per-step proximal pull of the same step,
so at a communication the leader's own state is exactly unchanged (its pull and proximal
pull both act toward itself). Communication is triggered by the step count on every rank
(the authors' code counts total steps on a server; here ranks run in lockstep). Float
buffers follow the parameters' rule; optimizer state stays local.

Hook: ``after_step``. Communication per local communication: all-gather of one float per
worker and a model-size broadcast from the leader within the group; per global
communication the same over the world.

Device and host syncs: the last ``avg_size`` losses stay on the parameters' device, in a
ring of fp32 (float64 for float64 parameters) that every step writes without reading
anything back. The one host synchronisation is the leader choice at a communication
step, because the broadcast needs its source rank as a host integer: one read per
communication step (local and global leaders of a multi-leader step are read together),
none at other steps. ``leader_loss`` stays a tensor until ``metrics()``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..comm import Communicator, accumulation_dtype
from ..core import Hyper, StepContext, due
from . import register
from ._model import ModelAggregator


def elect_leader(losses: torch.Tensor) -> int:
    """Index of the smallest running loss; NaN counts as +inf; ties go to the lowest index."""
    return elect_leaders(losses, [range(losses.numel())])[0]


def elect_leaders(losses: torch.Tensor, candidates: Sequence[range]) -> list[int]:
    """For each range of consecutive indices, the index (within it) of its smallest running
    loss; NaN counts as +inf, ties go to the lowest index. One host read for all ranges:
    the leader is a broadcast source, which must be a host integer (the algorithm's one
    host sync)."""
    clean = torch.where(torch.isnan(losses), torch.full_like(losses, math.inf), losses)
    # argmin returns the first minimum
    picks = torch.stack([torch.argmin(clean[r.start:r.stop]) for r in candidates])
    return picks.tolist()


def make_groups(world_size: int, group_size: int) -> list[list[int]]:
    return [list(range(s, min(s + group_size, world_size)))
            for s in range(0, world_size, group_size)]


@register
class LeaderSGD(ModelAggregator):
    name = "lsgd"
    description = "leader SGD: pull toward the worker with the lowest recent loss"
    paper = "Leader Stochastic Gradient Descent for Distributed Training, arXiv 1905.10395"
    reads_loss = True
    ft_refusal = "its leader groups are process subgroups built once for a fixed N"
    hyperparameters = {
        "period": Hyper(4, int, "steps between (local) leader communications", low=1),
        "pull": Hyper(0.1, float, "c: pull toward the leader at a communication", low=0.0,
                      high=1.0),
        "proximal": Hyper(0.1, float, "p: per-step pull p/period toward the cached leader",
                          low=0.0, high=1.0),
        "avg_size": Hyper(0, int, "losses in the running mean that elects the leader "
                                  "(0: period)", low=0),
        "group_size": Hyper(0, int, "multi-leader: ranks per local group (0: one leader)",
                            low=0),
        "global_period": Hyper(0, int, "multi-leader: steps between global communications "
                                       "(0: 4 x period)", low=0),
        "global_pull": Hyper(0.1, float, "multi-leader: pull toward the global leader",
                             low=0.0, high=1.0),
        "global_proximal": Hyper(0.1, float, "multi-leader: per-step global proximal pull",
                                 low=0.0, high=1.0),
    }

    @classmethod
    def check(cls, hp: Mapping[str, Any], world_size: int) -> None:
        gp = hp["global_period"] or 4 * hp["period"]
        if hp["group_size"] and gp % hp["period"]:
            raise ValueError(f"lsgd: global_period {gp} must be a multiple of period "
                             f"{hp['period']}")

    def __init__(self, params, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        hp = self.hp
        # the last `window` losses (non-finite ones as +inf), a ring on the parameters'
        # device: recording a step's loss reads nothing back to the host
        self.window = hp["avg_size"] or hp["period"]
        self.loss_ring = self.flat.buffer.new_full(
            (self.window,), math.inf, dtype=accumulation_dtype(self.flat.buffer.dtype))
        self.recorded = 0  # losses recorded so far (the ring holds the last `window`)
        self.multi = 0 < hp["group_size"] < self.world_size
        self.global_period = hp["global_period"] or 4 * hp["period"]
        self.local_comm: Communicator | None = None
        self.group_ranks = list(range(self.world_size))
        if self.multi:
            # new_group is collective: every rank creates every group, in the same order
            for ranks in make_groups(self.world_size, hp["group_size"]):
                pg = dist.new_group([self.comm.global_rank(r) for r in ranks])
                if self.rank in ranks:
                    self.local_comm = Communicator(pg, stats=self.comm.stats)
                    self.group_ranks = ranks
        self.leader_copy = self.flat.new_buffer()
        self.global_copy = self.flat.new_buffer() if self.multi else None
        self.have_leader = False
        self.have_global = False
        self.leader = -1
        self.global_leader = -1
        self._gathered: torch.Tensor | None = None  # running losses of the last election

    @torch.no_grad()
    def _record(self, loss: torch.Tensor | float | None) -> None:
        slot = self._slot(self.recorded)
        if loss is None:
            slot.fill_(math.inf)
        elif isinstance(loss, torch.Tensor):
            slot.copy_(loss.detach().reshape(()))  # device to device: no host read
            slot.nan_to_num_(nan=math.inf, posinf=math.inf, neginf=math.inf)
        else:
            slot.fill_(loss if math.isfinite(loss) else math.inf)
        self.recorded += 1

    def _slot(self, i: int) -> torch.Tensor:
        return self.loss_ring[i % self.window]

    def _running_loss(self) -> torch.Tensor:
        """Mean of the recorded losses in the window (+inf before any), a 0-dim tensor."""
        count = min(self.recorded, self.window)
        if count == 0:
            return self.loss_ring.new_full((), math.inf)
        return self.loss_ring[:count].sum() / count

    @torch.no_grad()
    def _follow(self, comm: Communicator, members: list[int], idx: int,
                copy: torch.Tensor, pull: float) -> int:
        """Broadcast the state of ``members[idx]`` (ranks of ``self.comm``, the elected
        leader) over ``comm`` into ``copy`` and pull toward it; returns the leader's rank."""
        x = self.load_state()
        if comm.rank == idx:
            copy.copy_(x)
        comm.broadcast_(copy, src=idx)
        if comm.rank != idx:
            x.lerp_(copy, pull)
            self.store_state(x)
        return members[idx]

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        self._record(ctx.loss)
        hp = self.hp
        if due(ctx.step, hp["period"]):
            losses = self.comm.all_gather(self._running_loss().reshape(1)).reshape(-1)
            self._gathered = losses
            members = self.group_ranks  # consecutive ranks
            everyone = list(range(self.world_size))
            global_due = self.multi and due(ctx.step, self.global_period)
            ranges = [range(members[0], members[-1] + 1)]
            if global_due:
                ranges.append(range(self.world_size))
            picks = elect_leaders(losses, ranges)  # the one host sync of this step
            if self.multi:
                self.leader = self._follow(self.local_comm, members, picks[0],
                                           self.leader_copy, hp["pull"])
                if global_due:
                    self.global_leader = self._follow(self.comm, everyone, picks[1],
                                                      self.global_copy, hp["global_pull"])
                    self.have_global = True
            else:
                self.leader = self._follow(self.comm, members, picks[0],
                                           self.leader_copy, hp["pull"])
                self.global_leader = self.leader
            self.have_leader = True
        self._proximal()

    @torch.no_grad()
    def _proximal(self) -> None:
        hp = self.hp
        pulls = []
        if self.have_leader and hp["proximal"] > 0:
            pulls.append((self.leader_copy, hp["proximal"] / hp["period"]))
        if self.have_global and hp["global_proximal"] > 0:
            pulls.append((self.global_copy, hp["global_proximal"] / self.global_period))
        if not pulls:
            return
        x = self.load_state()
        for copy, weight in pulls:
            x.lerp_(copy, weight)
        self.store_state(x)

    def metrics(self) -> dict[str, float]:
        """Leader ranks of the last communication (-1 before the first) and the leader's
        running loss (NaN before the first)."""
        loss = math.nan if self._gathered is None else float(self._gathered[self.leader])
        return {"leader": float(self.leader), "global_leader": float(self.global_leader),
                "leader_loss": loss}

    def recent_losses(self) -> list[float]:
        """The recorded losses of the window, oldest first (a host read: not per step)."""
        count = min(self.recorded, self.window)
        order = [(self.recorded - count + i) % self.window for i in range(count)]
        return self.loss_ring[order].tolist() if order else []

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "losses": self.recent_losses(),
                "leader_copy": self.leader_copy.clone(), "have_leader": self.have_leader,
                "global_copy": None if self.global_copy is None else self.global_copy.clone(),
                "have_global": self.have_global}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        losses = [float(v) for v in state["losses"]][-self.window:]
        self.loss_ring.fill_(math.inf)
        self.recorded = 0
        for v in losses:
            self._record(v)
        self.leader_copy.copy_(state["leader_copy"])
        self.have_leader = state["have_leader"]
        if self.global_copy is not None and state.get("global_copy") is not None:
            self.global_copy.copy_(state["global_copy"])
            self.have_global = state["have_global"]
