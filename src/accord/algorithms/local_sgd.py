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

Under ``--compress`` the payload is the change since the last average, not the parameters:
an anchor a (the model after the last average, identical on every rank, kept in fp32) is
taken when the aggregator is built under a compressor, and a sync sends a - x_i through
the compressor and sets x_i <- a <- a - mean_i (a - x_i), which is mean_i x_i up to the
codec. So the lossy gradient codecs with error feedback (powersgd, int8, int4, topk) act
on a gradient-like payload, as for ``diloco`` (this is DiLoCo with outer lr 1 and no
outer momentum, to float rounding; tests/test_compress_comm.py), and bf16/fp16 round the
change, not the parameters. The anchor is refreshed at the last warm-up step (the replicas
agree there) and kept in checkpoints; it costs one fp32 copy of the model state, taken
only under a compressor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..comm import FlatBuffer, accumulation_dtype, payload_compressor
from ..core import Hyper, StepContext, due
from . import register
from ._model import ModelAggregator


@register
class LocalSGD(ModelAggregator):
    name = "local_sgd"
    description = "local SGD: average parameters every `period` steps (post-local with warm-up)"
    paper = "Local SGD Converges Fast and Communicates Little, arXiv 1805.09767; 1808.07217"
    compressible = low_rank = True  # low_rank: under a compressor it sends a change
    fault_tolerant = "model average over the participants; the period counts committed steps"
    hyperparameters = {
        "period": Hyper(4, int, "local steps between parameter averages", low=1),
        "warmup_steps": Hyper(0, int, "initial steps of plain gradient averaging", low=0),
    }

    def __init__(self, params, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.grads = FlatBuffer(self.params) if self.hp["warmup_steps"] > 0 else None
        self.syncs = 0
        self.anchor: torch.Tensor | None = None
        if payload_compressor() is not None:
            x = self.load_state()
            self.anchor = x.to(accumulation_dtype(x.dtype), copy=True)

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
            if self.anchor is None or payload_compressor() is None:
                self.average_state()
            else:
                self._average_change()
            self.syncs += 1
        elif self.anchor is not None and ctx.step == self.hp["warmup_steps"] - 1:
            x = self.load_state()
            self.anchor.copy_(x)  # the replicas agree after the last averaged gradient

    def _average_change(self) -> None:
        """x_i <- a <- a - mean_i (a - x_i): the change since the last average through the
        compressor (see the module docstring)."""
        assert self.anchor is not None
        change = self.load_state()
        change.neg_().add_(self.anchor.to(change.dtype))  # a - x_i
        self.comm.all_reduce_(change, op="avg")
        self.anchor.sub_(change.to(self.anchor.dtype))
        self.store_state(self.anchor)

    def metrics(self) -> dict[str, float]:
        return {"syncs": float(self.syncs)}

    def state_dict(self) -> dict[str, Any]:
        state = {**super().state_dict(), "syncs": self.syncs}
        if self.anchor is not None:
            state["anchor"] = self.anchor.clone()
        return state

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.syncs = int(state.get("syncs", 0))
        if self.anchor is not None and "anchor" in state:
            self.anchor.copy_(state["anchor"])
