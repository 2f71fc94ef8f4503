"""Local SGD (periodic model averaging) and post-local SGD.

Papers: Stich, "Local SGD Converges Fast and Communicates Little", arXiv 1805.09767;
Lin, Stich, Patel, Jaggi, "Don't Use Large Mini-Batches, Use Local SGD", arXiv 1808.07217
(post-local SGD).

Update rule::

    step < warmup_steps:  x_i <- x_i - lr * opt(mean_j g_j)      gradient averaging
    afterwards:           x_i <- x_i - lr * opt(g_i)             local steps
                          every `period` steps: x_i <- mean_j x_j

Hooks: ``after_backward`` (gradient averaging during warm-up only) and ``after_step``
(parameter averaging when due). Communication: one model-size allreduce per warm-up step,
then one model-size allreduce every ``period`` steps. Float buffers are averaged with the
parameters; optimizer state stays local (as PyTorch's PeriodicModelAverager). With
``period=1`` and plain SGD this is exactly gradient averaging.

The warm-up is counted from ``ctx.step``, the training loop's step, so a resumed run does
not repeat it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..comm import FlatBuffer
from ..core import Hyper, StepContext, due
from . import register
from ._model import ModelAggregator


@register
class LocalSGD(ModelAggregator):
    name = "local_sgd"
    description = "local SGD: average parameters every `period` steps (post-local with warm-up)"
    paper = "Local SGD Converges Fast and Communicates Little, arXiv 1805.09767; 1808.07217"
    compressible = True
    fault_tolerant = "model average over the participants; the period counts committed steps"
    hyperparameters = {
        "period": Hyper(4, int, "local steps between parameter averages", low=1),
        "warmup_steps": Hyper(0, int, "initial steps of plain gradient averaging", low=0),
    }

    def __init__(self, params, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.grads = FlatBuffer(self.params) if self.hp["warmup_steps"] > 0 else None
        self.syncs = 0

    @classmethod
    def rewrites_gradients(cls, hp: Mapping[str, Any]) -> bool:
        return hp.get("warmup_steps", 0) > 0  # post-local SGD averages gradients first

    @torch.no_grad()
    def after_backward(self, ctx: StepContext) -> None:
        if self.grads is not None and ctx.step < self.hp["warmup_steps"]:
            buf = self.grads.load_grads()
            self.comm.all_reduce_(buf, op="avg")
            self.grads.store_grads(buf)

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        if due(ctx.step, self.hp["period"], self.hp["warmup_steps"]):
            self.average_state()
            self.syncs += 1

    def metrics(self) -> dict[str, float]:
        return {"syncs": float(self.syncs)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "syncs": self.syncs}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.syncs = int(state.get("syncs", 0))
