"""D-PSGD: decentralized parallel SGD with synchronous ring mixing.

Paper: Lian, Zhang, Zhang, Hsieh, Zhang, Liu, "Can Decentralized Algorithms Outperform
Centralized Algorithms?", NeurIPS 2017, arXiv 1705.09056.

Update rule, every ``period`` steps (default every step), in ``after_backward``::

    x_i <- (x_{i-1} + x_i + x_{i+1}) / 3        N >= 3 (ring, doubly stochastic)
    x_i <- (x_0 + x_1) / 2                      N = 2
    x_i <- optimizer_step(x_i, g_i(x_i before mixing))

the gradient applied after mixing, as in the WAGMA repository's D-PSGD baseline. On 3
workers the ring is the full mean. Communication: the model to both neighbours and from
both, one batch per step, blocking (a slow neighbour delays its neighbours, and through
them everyone). Float buffers mix with the parameters; optimizer state stays local. The
mix is summed in fp32 (float64 for float64 parameters) and rounded once into the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..comm import accumulation_dtype
from ..core import Hyper, StepContext, due
from . import register
from ._model import ModelAggregator


def ring_neighbours(rank: int, world_size: int) -> list[int]:
    if world_size == 1:
        return []
    if world_size == 2:
        return [1 - rank]
    return [(rank - 1) % world_size, (rank + 1) % world_size]


@register
class DPSGD(ModelAggregator):
    name = "dpsgd"
    description = "D-PSGD: synchronous ring mixing (1/3 self, 1/3 each neighbour)"
    paper = "Can Decentralized Algorithms Outperform Centralized Algorithms?, arXiv 1705.09056"
    ft_refusal = "it mixes point to point with ring neighbours of a fixed N"
    hyperparameters = {
        "period": Hyper(1, int, "steps between ring mixes", low=1),
    }

    @classmethod
    def mixes_before_step(cls, hp: Mapping[str, Any]) -> bool:
        return True

    def __init__(self, params, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.neighbours = ring_neighbours(self.rank, self.world_size)
        self.incoming = [self.flat.new_buffer() for _ in self.neighbours]
        buf = self.flat.buffer
        self.total = buf.new_zeros(buf.shape, dtype=accumulation_dtype(buf.dtype))
        self.exchanges = 0

    @torch.no_grad()
    def after_backward(self, ctx: StepContext) -> None:
        self.exchanges = 0
        if not self.neighbours or not due(ctx.step, self.hp["period"]):
            return
        x = self.load_state()
        self.comm.multi_exchange_([(x, j) for j in self.neighbours],
                                  list(zip(self.incoming, self.neighbours, strict=True)),
                                  kind="ring")
        # ascending rank order, so the three ranks of a 3-ring sum identically
        parts = sorted([(self.rank, x), *zip(self.neighbours, self.incoming, strict=True)],
                       key=lambda item: item[0])
        total = self.total.zero_()
        for _, t in parts:
            total.add_(t)
        self.store_state(total.div_(len(parts)))
        self.exchanges = len(self.neighbours)

    def metrics(self) -> dict[str, float]:
        """Neighbours exchanged with at this step (0 between mixes) and ring degree."""
        return {"exchanges": float(self.exchanges), "peers": float(len(self.neighbours))}
