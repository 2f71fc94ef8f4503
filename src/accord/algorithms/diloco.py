"""DiLoCo: local inner optimisation, outer Nesterov step on the averaged pseudo-gradient.

Paper: Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language
Models", arXiv 2311.08105.

Update rule (theta is the shared outer model, identical on every rank)::

    every step:               x_i <- inner_optimizer_step(x_i, g_i)      (the user's optimizer)
    every `period` steps:     delta = theta - mean_i x_i                  outer pseudo-gradient
                              v     = outer_momentum * v + delta
                              theta = theta - outer_lr * (delta + outer_momentum * v)  (Nesterov)
                              x_i   = theta

(``nesterov=False`` uses ``v`` instead of ``delta + outer_momentum * v``.) Hook:
``after_step``. Communication: one model-size allreduce every ``period`` steps. Inner
optimizer state stays local, as in the paper. Float buffers are averaged plainly at each
outer step (no outer optimizer on statistics). With ``outer_lr=1`` and
``outer_momentum=0`` this is local SGD with the same period. The paper's defaults:
outer lr 0.7, outer Nesterov momentum 0.9, inner AdamW, period 500.

Precision and host syncs: theta and v are kept in fp32 (float64 for float64 parameters),
a master copy on the parameters' device, so outer steps much smaller than a bfloat16
parameter's rounding step are not lost; the model receives theta rounded to its dtype.
No step reads a value back to the host: ``outer_delta_norm`` stays a tensor until
``metrics()``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..comm import accumulation_dtype, payload_compressor
from ..core import Hyper, StepContext, due
from . import register
from ._model import ModelAggregator


@register
class DiLoCo(ModelAggregator):
    name = "diloco"
    description = "DiLoCo: inner local steps, outer Nesterov step on the averaged model delta"
    paper = "DiLoCo: Distributed Low-Communication Training of Language Models, arXiv 2311.08105"
    compressible = low_rank = True
    fault_tolerant = ("the outer model and momentum are replicated and travel with the state; "
                      "the delta is theta minus the mean over the participants")
    hyperparameters = {
        "period": Hyper(50, int, "inner steps between outer steps", low=1),
        "outer_lr": Hyper(0.7, float, "outer learning rate", low=0.0, low_open=True),
        "outer_momentum": Hyper(0.9, float, "outer momentum", low=0.0, high=1.0,
                                high_open=True),
        "nesterov": Hyper(True, bool, "Nesterov form of the outer momentum"),
    }

    def __init__(self, params, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.n_params = sum(p.numel() for p in self.params)
        x = self.load_state()
        self.theta = x.to(accumulation_dtype(x.dtype), copy=True)
        self.velocity = torch.zeros_like(self.theta[: self.n_params])
        self._delta_norm = self.theta.new_zeros(())

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        if not due(ctx.step, self.hp["period"]):
            return
        mean = self.load_state()
        if payload_compressor() is None:
            self.comm.all_reduce_(mean, op="avg")
        else:  # --compress: send the outer gradient theta - x_i, as compressors expect
            mean.neg_().add_(self.theta.to(mean.dtype))
            self.comm.all_reduce_(mean, op="avg")
            mean.neg_().add_(self.theta.to(mean.dtype))  # theta - mean_i (theta - x_i)
        k = self.n_params
        delta = self.theta[:k] - mean[:k]
        mu, lr = self.hp["outer_momentum"], self.hp["outer_lr"]
        self.velocity.mul_(mu).add_(delta)
        step = delta.add(self.velocity, alpha=mu) if self.hp["nesterov"] else self.velocity
        self.theta[:k].sub_(step, alpha=lr)
        self.theta[k:].copy_(mean[k:])
        self.store_state(self.theta)
        self._delta_norm = torch.linalg.vector_norm(delta)  # a tensor: no host sync

    def metrics(self) -> dict[str, float]:
        """Norm of the last outer pseudo-gradient (0 before the first outer step)."""
        return {"outer_delta_norm": float(self._delta_norm)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "theta": self.theta.clone(),
                "velocity": self.velocity.clone()}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.theta.copy_(state["theta"])
        self.velocity.copy_(state["velocity"])
