"""Shared plumbing of the model-phase algorithms (they act on parameters, not gradients).

The model state they communicate is one flat vector: every parameter, then every
floating-point buffer passed as ``buffers=`` (BatchNorm statistics). Buffers follow exactly
the rule the algorithm applies to parameters, so a BatchNorm layer's statistics stay
consistent with its weights. Optimizer state (momentum, Adam moments) is never
communicated: it stays local to each worker, as in the reference implementations.

The flat state buffer lives on the parameters' device, in their dtype; an algorithm that
accumulates across steps (an outer model, push-sum numerators, running losses) keeps its
own copy in :func:`accord.comm.accumulation_dtype` (fp32, float64 for float64 models) on
that device, and ``store_state`` rounds it into the model.
"""

from __future__ import annotations

from typing import Any

import torch

from ..comm import FlatBuffer
from ..core import Aggregator


class ModelAggregator(Aggregator):
    #: the background exchange engine of an asynchronous variant (wagma, easgd), if any
    engine = None

    def __init__(self, params, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.state_tensors = self.params + self.buffers
        self.flat = FlatBuffer(self.state_tensors)

    def load_state(self, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Copy the model state into ``buffer`` (default: the aggregator's own flat buffer)."""
        return self.flat.load_values(buffer)

    def store_state(self, buffer: torch.Tensor | None = None) -> None:
        self.flat.store_values(buffer)

    @torch.no_grad()
    def average_state(self) -> torch.Tensor:
        """Replace every replica's state by the mean over the group; returns the mean."""
        buf = self.load_state()
        self.comm.all_reduce_(buf, op="avg")
        self.store_state(buf)
        return buf

    def close(self) -> None:
        """Stop the background engine, if any (collective, see accord.exchange.background)."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        super().close()
