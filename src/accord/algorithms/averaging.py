"""Gradient averaging and normalised gradient averaging.

``allreduce`` -- plain synchronous data parallelism (what DDP does)::

    d = (1/N) sum_i g_i

``normalized`` -- the average of unit-norm worker gradients, the ablation that separates
ACGA's per-worker normalisation from its consensus weighting::

    d = (1/N) sum_i g_i / (||g_i|| + eps)

It is ACGA with every coefficient fixed to 1/N. ``restore_scale=mean_norm`` multiplies d by
mean_i ||g_i||, carried as one extra element of the same allreduce.

Hook: ``after_backward``. Communication per step: one model-size allreduce.
"""

from __future__ import annotations

from typing import Any

import torch

from ..comm import FlatBuffer
from ..core import Aggregator, Hyper, StepContext
from . import register


@register
class GradientAveraging(Aggregator):
    name = "allreduce"
    description = "gradient averaging (synchronous data parallelism, as DDP)"
    paper = "baseline"
    hyperparameters: dict[str, Hyper] = {}

    def __init__(self, params, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.flat = FlatBuffer(self.params)
        self._grad_norm = 0.0

    @torch.no_grad()
    def after_backward(self, ctx: StepContext) -> None:
        buf = self.flat.load_grads()
        self.comm.all_reduce_(buf, op="avg")
        self.flat.store_grads(buf)
        self._grad_norm = float(buf.float().norm())

    def metrics(self) -> dict[str, float]:
        return {"grad_norm": self._grad_norm}


@register
class NormalizedAveraging(Aggregator):
    name = "normalized"
    description = "average of unit-norm worker gradients (ACGA with coefficients 1/N)"
    paper = "ablation of arXiv 2411.03742"
    hyperparameters = {
        "restore_scale": Hyper("none", str, "multiply d by the mean worker gradient norm",
                               choices=("none", "mean_norm")),
        "eps": Hyper(1e-8, float, "added to gradient norms", low=0.0, low_open=True),
    }

    def __init__(self, params, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.flat = FlatBuffer(self.params, extra=1)
        self._grad_norm = 0.0

    @torch.no_grad()
    def after_backward(self, ctx: StepContext) -> None:
        buf = self.flat.load_grads()
        n = self.world_size
        norm = float(buf[:-1].float().norm())
        buf[:-1].mul_(1.0 / (n * (norm + self.hp["eps"])))
        buf[-1] = norm / n
        self.comm.all_reduce_(buf)
        if self.hp["restore_scale"] == "mean_norm":
            buf[:-1].mul_(float(buf[-1]))
        self.flat.store_grads(buf)
        self._grad_norm = float(buf[:-1].float().norm())

    def metrics(self) -> dict[str, float]:
        return {"grad_norm": self._grad_norm}
