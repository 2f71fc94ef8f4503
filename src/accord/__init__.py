"""accord: data-parallel training with consensus-based aggregation on torch.distributed.

Public API::

    agg = accord.build("acga", model.parameters(), momentum=0.99)
    ...
    agg.after_backward(accord.StepContext(step=step, loss=loss.detach()))
    opt.step()
    agg.after_step(ctx)

or, the same two hooks inside an optimizer::

    opt = accord.wrap(torch.optim.AdamW(model.parameters()), "acga", momentum=0.99)
    ...
    opt.step(loss=loss.detach())

your own algorithm, registered under its name (see examples/plugin_algorithm.py)::

    @accord.register
    class MyAlgorithm(accord.Aggregator): ...

and checkpoints that keep every rank's replica::

    accord.save("ckpt/step-100", model, opt, step=100)     # collective
    accord.load("ckpt/step-100", model, opt)               # each rank its own file
"""

from __future__ import annotations

from ._version import __version__
from .algorithms import REGISTRY, build, list_algorithms, load_plugin, register
from .checkpoint import CheckpointError, load, save
from .comm import CommStats, Communicator, FlatBuffer
from .core import Aggregator, Hyper, StepContext, due
from .integrations.ddp_hooks import ddp_hook
from .integrations.wrap import AggregatedOptimizer, wrap


def __getattr__(name: str):
    # the task base classes, imported on first use (importing the built-in tasks loads
    # their data libraries)
    if name in ("Task", "ClassificationTask"):
        from . import tasks

        return getattr(tasks, name)
    raise AttributeError(f"module 'accord' has no attribute {name!r}")

__all__ = [
    "REGISTRY",
    "__version__",
    "AggregatedOptimizer",
    "Aggregator",
    "CheckpointError",
    "ClassificationTask",
    "CommStats",
    "Communicator",
    "FlatBuffer",
    "Hyper",
    "StepContext",
    "Task",
    "build",
    "ddp_hook",
    "due",
    "list_algorithms",
    "load",
    "load_plugin",
    "register",
    "save",
    "wrap",
]
