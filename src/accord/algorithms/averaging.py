"""Gradient averaging and normalised gradient averaging.

``allreduce`` -- plain synchronous data parallelism (what DDP does)::

    d = (1/N) sum_i g_i

``normalized`` -- the average of unit-norm worker gradients, the ablation that separates
ACGA's per-worker normalisation from its consensus weighting::

    d = (1/N) sum_i g_i / (||g_i|| + eps)

It is ACGA with every coefficient fixed to 1/N. ``restore_scale=mean_norm`` multiplies d by
mean_i ||g_i||, carried as one extra element of the same allreduce (in the gradient dtype:
with bfloat16 gradients the scale is rounded to 8 bits, one rounding of d itself).

Hook: ``after_backward``. Communication per step: one model-size allreduce. The gradients
are bound to the flat buffer (zero-copy, see :class:`accord.comm.FlatBuffer`) and divided by
N in the same pass that loads them (NCCL averages inside the collective instead). No host
sync:
norms and scales stay tensors on the gradients' device (norms accumulated in fp32, float64
for float64 gradients); ``metrics()`` takes the norm of the last aggregated gradient, which
the flat buffer still holds, when it is called.
"""

from __future__ import annotations

from typing import Any

import torch

from ..comm import FlatBuffer, accumulation_dtype, payload_compressor
from ..core import Aggregator, Hyper, StepContext
from . import register


@register
class GradientAveraging(Aggregator):
    name = "allreduce"
    description = "gradient averaging (synchronous data parallelism, as DDP)"
    paper = "baseline"
    phase = "gradient"
    compressible = low_rank = linear = True
    ddp_hook_form = "average"
    fault_tolerant = "mean over the participants (the Manager's avg divides by N)"
    hyperparameters: dict[str, Hyper] = {}

    def __init__(self, params, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.flat = FlatBuffer(self.params)

    @torch.no_grad()
    def after_backward(self, ctx: StepContext) -> None:
        if self.comm.native_avg:  # NCCL: the collective averages
            self.comm.all_reduce_(self.flat.load_grads(), op="avg")
        else:  # gloo: divided by N as the gradients are loaded, one pass, then summed
            buf = self.flat.load_grads(scale=1.0 / self.world_size)
            self.comm.all_reduce_(buf, op="sum")
        self.flat.store_grads()

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        """Norm of the last averaged gradient (the flat buffer holds it until the next step;
        0 before the first)."""
        buf = self.flat.buffer
        return {"grad_norm": float(torch.linalg.vector_norm(
            buf, dtype=accumulation_dtype(buf.dtype)))}


@register
class NormalizedAveraging(Aggregator):
    name = "normalized"
    description = "average of unit-norm worker gradients (ACGA with coefficients 1/N)"
    paper = "ablation of arXiv 2411.03742"
    phase = "gradient"
    compressible = low_rank = scale_invariant = True
    ddp_hook_form = "combine"
    fault_tolerant = "1/N over the participants"
    hyperparameters = {
        "restore_scale": Hyper("none", str, "multiply d by the mean worker gradient norm",
                               choices=("none", "mean_norm")),
        "eps": Hyper(1e-8, float, "added to gradient norms", low=0.0, low_open=True),
    }

    def __init__(self, params, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.flat = FlatBuffer(self.params, extra=1)
        self.acc = accumulation_dtype(self.flat.buffer.dtype)

    @torch.no_grad()
    def after_backward(self, ctx: StepContext) -> None:
        buf = self.flat.load_grads()
        self.combine_(buf)
        self.flat.store_grads(buf)

    @torch.no_grad()
    def combine_(self, buf: torch.Tensor) -> None:
        """In place: the flat buffer of this rank's gradient (and one free trailing slot)
        becomes the aggregate. Collective; shared by ``after_backward`` and the DDP hook."""
        n = self.world_size
        grads = buf[:-1]
        norm = torch.linalg.vector_norm(grads, dtype=self.acc)  # a tensor: no host sync
        grads.mul_((n * (norm + self.hp["eps"])).reciprocal())
        buf[-1] = norm / n
        if payload_compressor() is None:
            self.comm.all_reduce_(buf)
        else:  # the gradients compressed (--compress), the appended mean norm exact
            self.comm.all_reduce_(grads)
            self.comm.all_reduce_(buf[-1:], kind="norm", exact=True)
        if self.hp["restore_scale"] == "mean_norm":
            grads.mul_(buf[-1])

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        """Norm of the last aggregated gradient (0 before the first step)."""
        return {"grad_norm": float(torch.linalg.vector_norm(self.flat.buffer[:-1],
                                                            dtype=self.acc))}
