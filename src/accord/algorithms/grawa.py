"""GRAWA: gradient-based weighted averaging (MGRAWA whole-model, LGRAWA per-layer).

Paper: Dimlioglu, Choromanska, "GRAWA: Gradient-based Weighted Averaging for Distributed
Training of Deep Learning Models", AISTATS 2024, arXiv 2403.04206.

Update rule, every ``period`` steps (after the local optimizer step)::

    w_i = (1 / ||g_i||) / sum_j (1 / ||g_j||)          weights sum to one
    c   = sum_i w_i x_i                                  favours workers in flat regions
    x_i <- x_i - pull (x_i - c)

``per_layer=True`` (LGRAWA) computes one weight per parameter tensor from that tensor's
gradient norm.

Hooks: ``after_backward`` (records local gradient norms, no communication) and
``after_step``. Communication per period: one all-gather of L float64 norms per worker
(L = 1 for the whole model, the number of parameter tensors with ``per_layer``), then
one allreduce of the weighted model (model-size). Every rank computes all N weights from
the gathered norms, so all ranks agree on them (including the fallbacks below) before
the model is sent; the allreduce then yields the centre directly.

Decisions where the paper summary is silent:

* ``norm="last"`` (default) uses the gradient of the step before the communication;
  ``norm="period"`` the mean of the gradient norms over the period.
* A zero gradient norm (a frozen worker, or one whose non-finite gradient was zeroed by
  the guard; per layer: a tensor with a zero gradient) says nothing about flatness, and
  1 / ||g|| would hand that worker almost all the weight. Such a worker gets weight 0 and
  the others' weights are renormalised to sum to one. If every worker's norm is zero (per
  layer: for that tensor), the weights fall back to uniform 1/N: the centre is the plain
  mean. Non-zero norms use 1 / (||g|| + 1e-12), which bounds the weight ratio for
  vanishing but non-zero gradients.
* Float buffers get the whole-model weight (per-layer mode: uniform weights, as they have
  no gradient).
* Norms and weights are computed in float64; the weights multiply the model as fp32
  (float64 for float64 parameters) scalars, so with bfloat16 parameters they still sum
  to one to fp32 precision (bfloat16 weights would scale the centre by up to 1 + N/256),
  and each product is rounded once to the parameters' dtype.
* No host sync on any step: norms, weights and their observables stay tensors on the
  parameters' device until ``metrics()``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..comm import accumulation_dtype
from ..core import Hyper, StepContext, due
from . import register
from ._model import ModelAggregator

EPS = 1e-12


def grawa_weights(norms: torch.Tensor) -> torch.Tensor:
    """Weights along dim 0 (workers) proportional to 1 / norm, summing to one.

    A zero norm gets weight 0; where every norm along dim 0 is zero the weights are
    uniform. Computed in float64, returned in ``norms.dtype``.
    """
    n64 = norms.double()
    inv = torch.where(n64 > 0, 1.0 / (n64 + EPS), torch.zeros_like(n64))
    total = inv.sum(dim=0, keepdim=True)
    uniform = torch.full_like(inv, 1.0 / norms.shape[0])
    w = torch.where(total > 0, inv / torch.where(total > 0, total, 1.0), uniform)
    return w.to(norms.dtype)


@register
class GRAWA(ModelAggregator):
    name = "grawa"
    description = "gradient-weighted averaging: pull toward a centre favouring small gradients"
    paper = "GRAWA: Gradient-based Weighted Averaging for Distributed Training, arXiv 2403.04206"
    compressible = True
    fault_tolerant = "weights renormalised over the participants' gathered norms"
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
        device = self.params[0].device
        self.layers = len(self.params) if self.hp["per_layer"] else 1
        self.centre = self.flat.new_buffer()
        self.norm_sum = torch.zeros(self.layers, dtype=torch.float64, device=device)
        self.norm_count = 0
        #: this rank's weight per layer (one entry in whole-model mode) at the last pull
        self.weights = self.norm_sum.new_full((self.layers,), float("nan"))
        # per state tensor, the index of its multiplier in the vector built at each pull:
        # per-layer params their own weight, buffers (no gradient) the uniform weight in
        # the last slot; whole-model mode slot 0 for all
        if self.hp["per_layer"]:
            self.slots = list(range(len(self.params))) + [self.layers] * len(self.buffers)
        else:
            self.slots = [0] * len(self.state_tensors)
        self.pulls = 0

    @torch.no_grad()
    def after_backward(self, ctx: StepContext) -> None:
        zero = self.norm_sum.new_zeros(())
        sq = torch.stack([zero if p.grad is None
                          else torch.linalg.vector_norm(p.grad, dtype=torch.float64).square()
                          for p in self.params])
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
        weights = grawa_weights(self.comm.all_gather(norms))  # (N, L), same on every rank
        mine = weights[self.rank]
        mult = torch.cat([mine, mine.new_full((1,), 1.0 / self.world_size)])
        mult = mult.to(accumulation_dtype(self.centre.dtype))
        x = self.load_state()
        self.centre.copy_(x)
        for v, slot in zip(self.flat.split(self.centre), self.slots, strict=True):
            v.mul_(mult[slot])
        self.comm.all_reduce_(self.centre)  # c = sum_i w_i x_i
        x.lerp_(self.centre, self.hp["pull"])
        self.store_state(x)
        self.weights = mine
        self.pulls += 1

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "norm_sum": self.norm_sum.clone(),
                "norm_count": self.norm_count, "weights": self.weights.clone(),
                "pulls": self.pulls}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.norm_sum.copy_(state["norm_sum"])
        self.norm_count = int(state["norm_count"])
        self.weights = state["weights"].to(self.norm_sum.device).clone()
        self.pulls = int(state["pulls"])

    def metrics(self) -> dict[str, float]:
        """This rank's weight (mean over layers), its smallest and largest layer weight at
        the last pull, and the number of pulls."""
        return {"weight": float(self.weights.mean()), "weight_min": float(self.weights.min()),
                "weight_max": float(self.weights.max()), "pulls": float(self.pulls)}
