"""accord: data-parallel training with consensus-based aggregation on torch.distributed.

Public API::

    agg = accord.build("acga", model.parameters(), momentum=0.99)
    ...
    agg.after_backward(accord.StepContext(step=step, loss=loss.detach()))
    opt.step()
    agg.after_step(ctx)
"""

from __future__ import annotations

from .algorithms import REGISTRY, build, list_algorithms
from .comm import CommStats, Communicator, FlatBuffer
from .core import Aggregator, Hyper, StepContext, due

__version__ = "0.1.0"

__all__ = [
    "REGISTRY",
    "Aggregator",
    "CommStats",
    "Communicator",
    "FlatBuffer",
    "Hyper",
    "StepContext",
    "build",
    "due",
    "list_algorithms",
]
