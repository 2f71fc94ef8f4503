"""Gossip SGD: pull gossip with one random peer, and push-sum (SGP) on an exponential graph.

Papers: Jin, Yuan, Iandola, Keutzer, "How to scale distributed deep learning?",
arXiv 1611.04581 (gossiping SGD); Assran, Loizou, Ballas, Rabbat, "Stochastic Gradient
Push for Distributed Deep Learning", ICML 2019, arXiv 1811.10792 (SGP).

``variant=pull`` (default): every ``period`` steps each rank initiates with probability
``p`` and averages with a peer drawn uniformly among the others, in ``after_backward``::

    x_i <- (x_i + x_j) / 2        (pre-step values)
    x_i <- optimizer_step(x_i, g_i(x_i before mixing))

``variant=push_sum`` (SGP): numerator x_i and weight w_i, the model holds z_i = x_i / w_i;
in ``after_step``::

    x_i <- x_i + (z_i after the optimizer step - z_i before it)
    send (x_i, w_i) / (k + 1) to each of the k out-peers, keep the same share
    x_i, w_i <- kept share + shares received;  z_i <- x_i / w_i

Out-peers at mixing t on the time-varying exponential graph (L = ceil(log2 N)):
i + 2^(t mod L) (``peers=1``), and also i + 2^((t+1) mod L) (``peers=2``, N >= 3).

Communication: pull, one model-size message per (puller, peer) pair; push-sum, k
model-size (+1) messages each way per mixing step. Decisions (in full:
docs/algorithms/gossip.md): peers from a generator seeded by (``seed``, step), identical on
every rank (no all-gather of choices); push-sum numerator and weight kept in fp32 (float64
for float64 models); no host sync on any step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..comm import accumulation_dtype
from ..core import Hyper, StepContext, due
from . import register
from ._model import ModelAggregator


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def random_pulls(world_size: int, p: float, seed: int, step: int) -> list[int | None]:
    """For every rank, the peer it pulls from at ``step`` (None: it does not initiate).
    Identical on every rank."""
    if world_size < 2:
        return [None] * world_size
    gen = step_generator(seed, step)
    # peer choices are host metadata from a CPU generator shared by all ranks: they never
    # touch the parameters' device, so reading them (through numpy) syncs nothing
    coins = torch.rand(world_size, generator=gen).numpy().tolist()  # host: CPU generator
    picks = torch.randint(world_size - 1, (world_size,),  # host: CPU generator
                          generator=gen).numpy().tolist()
    out: list[int | None] = []
    for r in range(world_size):
        if coins[r] >= p:
            out.append(None)
        else:
            j = picks[r]
            out.append(j + 1 if j >= r else j)  # uniform over the others
    return out


def exponential_peers(world_size: int, step: int, peers: int) -> list[int]:
    """Offsets of the out-peers at ``step`` on the exponential graph."""
    levels = max(1, (world_size - 1).bit_length())  # ceil(log2 N)
    offsets = []
    for j in range(peers):
        off = (2 ** ((step + j) % levels)) % world_size
        if off and off not in offsets:
            offsets.append(off)
    return offsets


@register
class Gossip(ModelAggregator):
    name = "gossip"
    description = "gossip SGD: pull-average with a random peer, or push-sum (SGP)"
    paper = "How to scale distributed deep learning?, arXiv 1611.04581; SGP, arXiv 1811.10792"
    ft_refusal = "it sends point to point to peers drawn for a fixed N"
    hyperparameters = {
        "variant": Hyper("pull", str, "pull: average with a random peer; push_sum: SGP",
                         choices=("pull", "push_sum")),
        "period": Hyper(1, int, "steps between gossip exchanges", low=1),
        "p": Hyper(1.0, float, "pull: probability that a rank initiates", low=0.0, high=1.0),
        "peers": Hyper(1, int, "push_sum: out-peers per step (1 or 2)", low=1, high=2),
        "seed": Hyper(0, int, "seed of the peer choices (shared by all ranks)", low=0),
    }

    @classmethod
    def check(cls, hp: Mapping[str, Any], world_size: int) -> None:
        if hp["variant"] == "push_sum" and hp["peers"] == 2 and world_size < 3:
            raise ValueError(f"gossip: peers=2 needs at least 3 workers, got N = {world_size};"
                             " allowed: peers=1")

    @classmethod
    def mixes_before_step(cls, hp: Mapping[str, Any]) -> bool:
        return hp["variant"] == "pull"

    def __init__(self, params, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.peer_buf = self.flat.new_buffer()
        self.sent = self.received = 0
        if self.hp["variant"] == "push_sum":
            # message = numerator then weight, in fp32 at least; z (the model, in the
            # parameters' dtype) = x / w
            buf = self.flat.buffer
            self.x = buf.new_zeros(self.flat.numel + 1, dtype=accumulation_dtype(buf.dtype))
            self.z = self.load_state().clone()
            self.x[:-1].copy_(self.z)
            self.x[-1] = 1.0
            self.share = torch.empty_like(self.x)
            self.incoming = [torch.empty_like(self.x) for _ in range(self.hp["peers"])]

    @property
    def weight(self) -> float:
        """The push-sum weight (a host read: for ``metrics()``, not the step)."""
        return float(self.x[-1]) if self.hp["variant"] == "push_sum" else 1.0

    @torch.no_grad()
    def after_backward(self, ctx: StepContext) -> None:
        if self.hp["variant"] != "pull" or self.world_size == 1:
            return
        if not due(ctx.step, self.hp["period"]):
            self.sent = self.received = 0
            return
        pulls = random_pulls(self.world_size, self.hp["p"], self.hp["seed"], ctx.step)
        x = self.load_state()
        mine = pulls[self.rank]
        sends = [(x, r) for r, peer in enumerate(pulls) if peer == self.rank]
        recvs = [(self.peer_buf, mine)] if mine is not None else []
        self.comm.multi_exchange_(sends, recvs, kind="gossip")
        self.sent, self.received = len(sends), len(recvs)
        if mine is not None:
            x.add_(self.peer_buf).mul_(0.5)
            self.store_state(x)

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        if self.hp["variant"] != "push_sum" or self.world_size == 1:
            return
        now = self.load_state()
        acc = self.x.dtype
        self.x[:-1].add_(now.to(acc) - self.z.to(acc))  # the optimizer's step, on x
        if not due(ctx.step, self.hp["period"]):
            self.z.copy_(self.x[:-1] / self.x[-1])
            self.store_state(self.z)
            self.sent = self.received = 0
            return
        n = self.world_size
        offsets = exponential_peers(n, ctx.step // self.hp["period"], self.hp["peers"])
        share = torch.div(self.x, len(offsets) + 1, out=self.share)
        incoming = self.incoming[: len(offsets)]
        sends = [(share, (self.rank + off) % n) for off in offsets]
        recvs = [(buf, (self.rank - off) % n) for buf, off in zip(incoming, offsets,
                                                                   strict=True)]
        self.comm.multi_exchange_(sends, recvs, kind="push_sum")
        self.x.copy_(share)
        for buf in incoming:
            self.x.add_(buf)
        self.z.copy_(self.x[:-1] / self.x[-1])
        self.store_state(self.z)
        self.sent, self.received = len(sends), len(recvs)

    def metrics(self) -> dict[str, float]:
        return {"sent": float(self.sent), "received": float(self.received),
                "push_sum_weight": self.weight}

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        if self.hp["variant"] == "push_sum":
            out.update({"numerator": self.x.clone(), "z": self.z.clone()})
        return out

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        if self.hp["variant"] == "push_sum":
            self.x.copy_(state["numerator"])
            self.z.copy_(state["z"])
