"""Elastic Gossip: symmetric elastic pulls between random peer pairs.

Paper: Pramod, "Elastic Gossip: Distributing Neural Network Training Using Gossip-like
Protocols", MS thesis, arXiv 1812.02407.

Update rule, every ``period`` steps (pre-step values, in ``after_backward``)::

    each rank initiates with probability p and picks a peer uniformly among the others
    peers(i) = {i's own pick} + {ranks that picked i}          (a set)
    x_i <- x_i - alpha * sum_{j in peers(i)} (x_i - x_j)
    x_i <- optimizer_step(x_i, g_i(x_i before mixing))

Every pull is matched by the opposite pull on the peer, so the sum over ranks of x (and,
for a pair that only exchanged with each other, the pair mean) is preserved; with
``alpha = 1/2`` such a pair averages. ``alpha`` above 1/(number of peers) overshoots (the
thesis code's default 0.5 with several requesters can); allowed as in the thesis. Peer
choices come from a generator seeded by (``seed``, step), identical on every rank, so no
all-gather of choices is needed. Mixing before the optimizer step is the D-PSGD order (see
``gossip``). Communication: one model-size message each way per peer, all of a step
posted together.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..core import Hyper, StepContext, due
from . import register
from ._model import ModelAggregator
from .gossip import random_pulls


def elastic_peers(pulls: list[int | None], rank: int) -> list[int]:
    """Sorted peers of ``rank``: its own pick and every rank that picked it."""
    peers = {r for r, peer in enumerate(pulls) if peer == rank}
    if pulls[rank] is not None:
        peers.add(pulls[rank])
    return sorted(peers)


@register
class ElasticGossip(ModelAggregator):
    name = "elastic_gossip"
    description = "elastic gossip: symmetric elastic pull between random peer pairs"
    paper = "Elastic Gossip, arXiv 1812.02407"
    ft_refusal = "it sends point to point to peers drawn for a fixed N"
    hyperparameters = {
        "alpha": Hyper(0.5, float, "elastic pull toward each peer", low=0.0, high=1.0,
                       low_open=True),
        "period": Hyper(1, int, "steps between exchanges", low=1),
        "p": Hyper(1.0, float, "probability that a rank initiates", low=0.0, high=1.0),
        "seed": Hyper(0, int, "seed of the peer choices (shared by all ranks)", low=0),
    }

    @classmethod
    def mixes_before_step(cls, hp: Mapping[str, Any]) -> bool:
        return True

    def __init__(self, params, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.peers: list[int] = []

    @torch.no_grad()
    def after_backward(self, ctx: StepContext) -> None:
        self.peers = []
        if self.world_size == 1 or not due(ctx.step, self.hp["period"]):
            return
        pulls = random_pulls(self.world_size, self.hp["p"], self.hp["seed"], ctx.step)
        self.peers = elastic_peers(pulls, self.rank)
        if not self.peers:
            return
        x = self.load_state()
        incoming = [torch.empty_like(x) for _ in self.peers]
        self.comm.multi_exchange_([(x, j) for j in self.peers],
                                  list(zip(incoming, self.peers, strict=True)),
                                  kind="elastic_gossip")
        pull = torch.zeros_like(x)
        for buf in incoming:  # fixed order: ascending peer rank
            pull.add_(x - buf)
        x.sub_(pull, alpha=self.hp["alpha"])
        self.store_state(x)

    def metrics(self) -> dict[str, float]:
        return {"peers": float(len(self.peers))}
