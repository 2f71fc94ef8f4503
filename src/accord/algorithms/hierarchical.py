"""Two-level synchronisation: gradient averaging inside islands, any model-phase algorithm
across them.

For clusters whose links are fast inside a node and slow between nodes (torch's
``HierarchicalModelAverager`` does only model averaging at both levels; the two-level
schedule here follows the island/leader structure of hierarchical SGD, e.g. Lin et al.,
"Don't use large mini-batches, use local SGD", arXiv 1808.07217, section on hierarchical
local SGD). The ranks are split into islands of ``island_size`` consecutive ranks (under
torchrun with one island per node: ``island_size`` = processes per node). Per step::

    inside island I:  g_i <- mean_{j in I} g_j                 (every step, fast links)
    optimizer step:   x_i <- opt(x_i, g_i)                     (identical inside I)
    across islands:   the ``outer`` algorithm on the islands' leaders (first rank of
                      each island), with ``outer_hp`` (e.g. "period=32,outer_lr=0.7")
    inside island I:  x_i <- x_leader(I)                       (only after the leader's
                                                                outer step communicated)

Because every member of an island averages the same gradients from the same start, an
island's replicas stay identical; the outer algorithm needs only one of them, so the slow
links carry one model per island (not one per rank). The leader tells its island whether
its outer step communicated (a one-element broadcast per step, inside the island); only
then is the model broadcast.

Communication per step: one model-size average allreduce inside each island (counted as
``island_allreduce``), a 4-byte ``island_flag`` broadcast, a model-size
``island_broadcast`` after each outer exchange, and the outer algorithm's own calls between
leaders under their usual kinds (``allreduce``, ``allgather``, ...): what crosses the slow
links, counted apart. ``island_size`` defaults to 1 (every rank its own island: the outer
algorithm alone); set it to the processes per node.

Decisions. The outer algorithm must be model-phase, may not run a background engine
(``avoids_waits``: its exchanges would leave the island behind its leader) and may not
move the parameters at a step without communicating (the island copies its leader only
after a communicating step; ``lsgd``'s per-step pull and ``easgd``'s asynchronous mode are
refused, in one line). With ``island_size`` = 1 this is the outer algorithm itself; with
one island it is gradient averaging (``allreduce``); both are tested bit for bit.
Optimizer state stays local, as in every model-phase algorithm; it stays identical inside
an island because the gradients are. Refused under ``--fault-tolerant`` (its islands are
process subgroups of a fixed world) and with ``--compress`` (the payload compressor would
act on both levels alike).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from ..comm import Communicator, FlatBuffer
from ..core import Hyper, StepContext
from . import get, register, validate
from ._model import ModelAggregator

#: outer algorithms refused, with the reason (moves without communicating, or a
#: background engine whose exchanges the island cannot follow)
_NOT_OUTER = {
    "lsgd": "it pulls toward its leader copy at every step without communicating",
}


def parse_outer_hp(text: str) -> dict[str, str]:
    """``"period=32,outer_lr=0.7"`` as a dict (ValueError, one line, for a bad item)."""
    out: dict[str, str] = {}
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"hyperparameter 'outer_hp': item {item!r}, allowed: "
                             "KEY=VALUE items separated by commas")
        out[key.strip()] = value.strip()
    return out


@register
class Hierarchical(ModelAggregator):
    name = "hierarchical"
    description = ("two-level sync: gradient averaging inside islands, a model-phase "
                   "algorithm across island leaders")
    paper = "hierarchical local SGD, arXiv 1808.07217 (island/leader schedule)"
    hyperparameters = {
        "island_size": Hyper(1, int, "consecutive ranks per island: set it to the processes "
                             "per node (1: every rank its own island)", low=1),
        # local SGD by default: hierarchical local SGD (arXiv 1808.07217); diloco for slow links
        "outer": Hyper("local_sgd", str, "the model-phase algorithm across island leaders"),
        "outer_hp": Hyper("", str, "its hyperparameters, e.g. period=32,outer_lr=0.7"),
    }
    phase = "model"
    ft_refusal = "its islands and leader group are process subgroups of a fixed world"

    @classmethod
    def rewrites_gradients(cls, hp: Mapping[str, Any]) -> bool:
        return True  # the island average replaces p.grad at every step

    @classmethod
    def check(cls, hp: Mapping[str, Any], world_size: int) -> None:
        size = hp["island_size"]
        if world_size % size:
            raise ValueError(f"hyperparameter 'island_size': got {size}, allowed: a divisor "
                             f"of the world size {world_size}")
        outer = hp["outer"]
        if outer == cls.name or outer in _NOT_OUTER:
            why = _NOT_OUTER.get(outer, "it cannot nest itself")
            raise ValueError(f"hyperparameter 'outer': got {outer!r}, refused: {why}")
        outer_cls = get(outer)  # unknown: one line naming the registered ones
        if outer_cls.phase != "model":
            raise ValueError(f"hyperparameter 'outer': got {outer!r}, allowed: a model-phase "
                             "algorithm (inside an island the gradients are averaged already)")
        outer_hp = validate(outer, parse_outer_hp(hp["outer_hp"]), world_size // size)
        if outer_hp.get("asynchronous") or (outer == "wagma" and outer_hp.get("wait_avoiding")):
            raise ValueError(f"hyperparameter 'outer_hp': {outer!r} with a background engine "
                             "is refused: its exchanges would leave the island behind its "
                             "leader (allowed: the synchronous form)")

    def __init__(self, params, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        if self.group is not None:  # new_group below is a collective of the whole world
            raise ValueError("hierarchical: group must be None (the default group): its "
                             "islands are subgroups that every process creates")
        size = self.hp["island_size"]
        ranks = self.comm.ranks
        islands = [ranks[i:i + size] for i in range(0, len(ranks), size)]
        leaders = [island[0] for island in islands]
        # every rank creates every group, in the same order (a collective of the world)
        island_groups = [dist.new_group(island) if size > 1 else None for island in islands]
        leader_group = dist.new_group(leaders) if len(leaders) > 1 else None
        mine = self.rank // size
        self.island = islands[mine]
        self.leader = self.comm.global_rank(self.rank) == leaders[mine]
        stats = self.comm.stats  # one CommStats: both levels in the run's records
        self.island_comm = (Communicator(island_groups[mine], stats=stats)
                            if size > 1 else None)
        self.single_island = len(islands) == 1  # nothing across islands: no flag either
        self.grads = FlatBuffer(self.params)
        self.flag = torch.zeros(1, dtype=torch.int32, device=self.params[0].device)
        self.outer: Any = None
        if self.leader and leader_group is not None:
            self.outer = get(self.hp["outer"])(
                self.params, group=leader_group, buffers=self.buffers, broadcast=False,
                **parse_outer_hp(self.hp["outer_hp"]))
            self.outer.comm.stats = stats  # what crosses the slow links, under its kinds

    @torch.no_grad()
    def after_backward(self, ctx: StepContext) -> None:
        if self.island_comm is None:
            return
        comm = self.island_comm
        if comm.native_avg:  # NCCL: the collective averages
            buf = comm.all_reduce_(self.grads.load_grads(), op="avg", kind="island_allreduce")
        else:  # gloo: divided as loaded, then summed (what `allreduce` does, bit for bit)
            buf = self.grads.load_grads(scale=1.0 / comm.world_size)
            comm.all_reduce_(buf, op="sum", kind="island_allreduce")
        self.grads.store_grads(buf)

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        if self.outer is not None:
            calls = self.comm.stats.calls
            self.outer.after_step(ctx)
            self.flag.fill_(int(self.comm.stats.calls != calls))
        if self.island_comm is None or self.single_island:
            return
        # the leader is the island's group rank 0; one host read per step decides whether
        # the model follows (the alternative, a model broadcast every step, costs more)
        self.island_comm.broadcast_(self.flag, src=0, kind="island_flag")
        if bool(self.flag.item()):
            state = self.load_state()
            self.island_comm.broadcast_(state, src=0, kind="island_broadcast")
            self.store_state(state)

    def metrics(self) -> dict[str, float]:
        return dict(self.outer.metrics()) if self.outer is not None else {}

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        if self.outer is not None:
            out["outer"] = self.outer.state_dict()
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if self.outer is not None and "outer" in state:
            self.outer.load_state_dict(state["outer"])

    def close(self) -> None:
        if self.outer is not None:
            self.outer.close()
        super().close()
