"""GRAWA: gradient-based weighted averaging (MGRAWA whole-model, LGRAWA per-layer).

Paper: Dimlioglu, Choromanska, "GRAWA: Gradient-based Weighted Averaging for Distributed
Training of Deep Learning Models", AISTATS 2024, arXiv 2403.04206.

Update rule, every ``period`` steps (after the local optimizer step)::

    w_i = (1 / ||g_i||) / sum_j (1 / ||g_j||)          weights sum to one
    c   = sum_i w_i x_i                                  favours workers in flat regions
    x_i <- x_i - pull (x_i - c)

``per_layer=True`` (LGRAWA) computes one weight per parameter tensor from that tensor's
gradient norm. Decisions where the paper summary is silent: ``norm="last"`` (default) uses
the gradient of the step before the communication; ``norm="period"`` the mean of the
gradient norms over the period. Float buffers get the whole-model weight (per-layer mode:
uniform weights, as they have no gradient).

Hooks: ``after_backward`` (records local gradient norms, no communication) and
``after_step``. Communication per period: one allreduce of the weighted model with the
weights appended (model-size + L floats).
"""

from __future__ import annotations

from typing import Any

import torch

from ..comm import FlatBuffer
from ..core import Hyper, StepContext, due
from . import register
from ._model import ModelAggregator

EPS = 1e-12


def grawa_weights(norms: torch.Tensor) -> torch.Tensor:
    """Weights along dim 0 (workers) proportional to 1 / norm, summing to one."""
    inv = 1.0 / (norms.double() + EPS)
    return (inv / inv.sum(dim=0, keepdim=True)).to(norms.dtype)


@register
class GRAWA(ModelAggregator):
    name = "grawa"
    description = "gradient-weighted averaging: pull toward a centre favouring small gradients"
    paper = "GRAWA: Gradient-based Weighted Averaging for Distributed Training, arXiv 2403.04206"
    hyperparameters = {
        "period": Hyper(4, int, "local steps between pulls", low=1),
        "pull": Hyper(0.1, float, "lambda: fraction of the way to the centre", low=0.0,
                      high=1.0),
        "per_layer": Hyper(False, bool, "one weight per parameter tensor (LGRAWA)"),
        "norm": Hyper("last", str, "gradient norm used for the weights",
                      choices=("last", "period")),
    }

    def __init__(self, params, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.layers = len(self.params) if self.hp["per_layer"] else 1
        self.weighted = FlatBuffer(self.state_tensors, extra=self.layers + 1)
        self.norm_sum = torch.zeros(self.layers, dtype=torch.float64)
        self.norm_count = 0
        self.weights = torch.full((self.layers,), float("nan"))
        self.pulls = 0

    @torch.no_grad()
    def after_backward(self, ctx: StepContext) -> None:
        sq = torch.stack([p.grad.double().pow(2).sum() if p.grad is not None
                          else torch.zeros((), dtype=torch.float64) for p in self.params])
        norms = sq.sqrt() if self.hp["per_layer"] else sq.sum().sqrt().reshape(1)
        if self.hp["norm"] == "last":
            self.norm_sum.copy_(norms)
            self.norm_count = 1
        else:
            self.norm_sum += norms
            self.norm_count += 1

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        if not due(ctx.step, self.hp["period"]):
            return
        norms = self.norm_sum / max(self.norm_count, 1)
        self.norm_sum.zero_()
        self.norm_count = 0
        inv = (1.0 / (norms + EPS)).to(self.weighted.buffer.dtype)
        n_params, k = len(self.params), self.layers
        # slot of each tensor's weight sum among the extras: per-layer params use their own,
        # buffers (no gradient) the worker count in slot k; whole-model mode slot 0 for all
        if self.hp["per_layer"]:
            slots = list(range(n_params)) + [k] * len(self.buffers)
        else:
            slots = [0] * len(self.state_tensors)
        extras = torch.cat([inv, inv.new_ones(1)])
        buf = self.weighted.load_values()
        views = self.weighted.split(buf)
        for v, slot in zip(views, slots, strict=True):
            v.mul_(extras[slot])
        buf[self.flat.numel:] = extras
        x = self.load_state()
        self.comm.all_reduce_(buf)
        totals = buf[self.flat.numel:].clone()
        for v, slot in zip(views, slots, strict=True):
            v.div_(totals[slot])
        x.lerp_(buf[: self.flat.numel], self.hp["pull"])
        self.store_state(x)
        self.weights = (inv / totals[:k]).float()
        self.pulls += 1

    def metrics(self) -> dict[str, float]:
        return {"weight": float(self.weights.mean()), "weight_min": float(self.weights.min()),
                "weight_max": float(self.weights.max()), "pulls": float(self.pulls)}
