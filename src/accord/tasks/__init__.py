"""Training tasks: a model, per-worker data streams and an evaluation, no downloads.

Every worker builds the same initial model from the run seed, and draws its own training
stream from a generator seeded by (seed, rank), so workers see different samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

TASKS: dict[str, type[Task]] = {}


def stream_seed(*keys: int) -> int:
    """A 63-bit seed derived from integer keys (e.g. run seed and rank) without collisions
    such as seed + rank would have (seed 1 rank 0 == seed 0 rank 1)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(2, np.uint64)[0] >> np.uint64(1))


class Task:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    has_accuracy: ClassVar[bool] = False
    has_oracle_lr: ClassVar[bool] = False
    #: defaults for the training loop when the user does not set them
    default_lr: ClassVar[float] = 0.1
    default_batch_size: ClassVar[int] = 16
    #: largest per-worker micro-batch the task serves (None: unlimited), and why, for
    #: the error message of a larger --batch-size
    max_batch_size: ClassVar[int | None] = None
    max_batch_note: ClassVar[str] = ""
    #: attributes holding the evaluation data, moved by :meth:`to` (training batches are
    #: moved by the loop, one at a time)
    eval_tensors: ClassVar[tuple[str, ...]] = ()

    def __init__(self, seed: int, data_dir: str | None = None) -> None:
        self.seed = seed
        self.data_dir = data_dir

    @classmethod
    def check_data(cls, data_dir: str | None) -> None:
        """Raise ValueError (one line: what is missing or broken and how to get it) if the
        task's data cannot be found or its content cannot be trained on. Called before any
        worker starts."""

    def to(self, device: torch.device | str) -> Task:
        """Move the evaluation data to ``device`` (the model's); returns the task."""
        for name in self.eval_tensors:
            setattr(self, name, getattr(self, name).to(device))
        return self

    def build_model(self) -> nn.Module:
        """The initial model, identical on every rank for a given seed."""
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            return self._model()

    def _model(self) -> nn.Module:
        raise NotImplementedError

    def train_stream(self, rank: int, batch_size: int) -> Iterator[Any]:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        raise NotImplementedError

    def oracle_lr(self, model: nn.Module) -> float:
        raise ValueError(f"task {self.name!r} has no oracle step size")


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch (a tensor, or a tuple or list of them) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple | list):
        return type(batch)(to_device(b, device) for b in batch)
    return batch


def shuffled_batches(n: int, batch_size: int, seed: int, rank: int) -> Iterator[torch.Tensor]:
    """Index batches of shuffled epochs over ``n`` samples, from rank's own generator; the
    last incomplete batch of an epoch is dropped."""
    gen = torch.Generator().manual_seed(stream_seed(seed, rank))
    while True:
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start: start + batch_size]


class ClassificationTask(Task):
    """A task whose batches are (inputs, class labels), trained with cross-entropy."""

    has_accuracy = True

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y)


def register_task(cls: type[Task]) -> type[Task]:
    TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> type[Task]:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; allowed: {', '.join(sorted(TASKS))}") from None


def _import_all() -> None:
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()
