"""EASGD: elastic averaging SGD, synchronous, with the centre replicated on every rank.

Paper: Zhang, Choromanska, LeCun, "Deep learning with Elastic Averaging SGD",
NeurIPS 2015, arXiv 1412.6651.

Update rule (N workers, centre c identical on every rank, alpha = beta / N)::

    every step:             x_i <- local_optimizer_step(x_i, g_i)
    every `period` steps:   m   = mean_j x_j                       (one allreduce)
                            x_i <- x_i - alpha (x_i - c)           (old centre)
                            c   <- c + beta (m - c)                (old x_j)

so the centre moves by alpha sum_j (x_j - c).

Both updates use the values from before the exchange. EAMSGD, the momentum variant, is
this algorithm with a local Nesterov-momentum optimizer: ``--optimizer nesterov
--set momentum=0.99`` (the paper's delta). Give ``alpha`` or ``beta`` (default beta 0.9,
the paper's choice, so the centre's step does not depend on N). The evaluation model of a
run is the centre.

Hook: ``after_step``. Communication: one model-size allreduce every ``period`` steps.
Float buffers follow the same elastic rule; optimizer state stays local.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..core import Hyper, StepContext, due
from . import register
from ._model import ModelAggregator

DEFAULT_BETA = 0.9


def elastic_exchange(
    x: torch.Tensor, centre: torch.Tensor, mean: torch.Tensor, alpha: float, beta: float
) -> None:
    """In place, both from the old values: x -= alpha (x - c); c += beta (mean - c)."""
    diff = x - centre
    centre.add_(mean - centre, alpha=beta)
    x.sub_(diff, alpha=alpha)


@register
class ElasticAveraging(ModelAggregator):
    name = "easgd"
    description = "elastic averaging SGD: workers and a replicated centre pull on each other"
    paper = "Deep learning with Elastic Averaging SGD, arXiv 1412.6651"
    hyperparameters = {
        "alpha": Hyper(None, float, "elastic pull of a worker toward the centre (beta / N)",
                       low=0.0, high=1.0),
        "beta": Hyper(None, float, f"centre's moving rate N alpha (default {DEFAULT_BETA})",
                      low=0.0, high=1.0),
        "period": Hyper(4, int, "local steps between elastic exchanges", low=1),
    }

    @classmethod
    def check(cls, hp: Mapping[str, Any], world_size: int) -> None:
        if hp["alpha"] is not None and hp["beta"] is not None:
            raise ValueError("easgd: give alpha or beta, not both (beta = N alpha)")
        if hp["alpha"] is not None and hp["alpha"] * world_size > 1.0:
            raise ValueError(f"easgd: beta = N alpha = {hp['alpha'] * world_size:g} with "
                             f"N = {world_size}; allowed: alpha <= {1 / world_size:g}")

    def __init__(self, params, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        n = self.world_size
        if self.hp["alpha"] is not None:
            self.alpha, self.beta = self.hp["alpha"], self.hp["alpha"] * n
        else:
            self.beta = DEFAULT_BETA if self.hp["beta"] is None else self.hp["beta"]
            self.alpha = self.beta / n
        self.centre = self.load_state().clone()
        self.mean = self.flat.new_buffer()
        self._distance = 0.0

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        if not due(ctx.step, self.hp["period"]):
            return
        x = self.load_state()
        self.mean.copy_(x)
        self.comm.all_reduce_(self.mean, op="avg")
        self._distance = float((x - self.centre).norm())
        elastic_exchange(x, self.centre, self.mean, self.alpha, self.beta)
        self.store_state(x)

    def consensus_params(self) -> list[torch.Tensor]:
        return self.flat.split(self.centre)

    def metrics(self) -> dict[str, float]:
        return {"alpha": self.alpha, "beta": self.beta, "distance_to_centre": self._distance}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "centre": self.centre.clone()}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.centre.copy_(state["centre"])
