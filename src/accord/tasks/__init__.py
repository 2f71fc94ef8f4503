"""Training tasks: a model, per-worker data streams and an evaluation, no downloads.

Every worker builds the same initial model from the run seed, and draws its own training
stream from a generator seeded by (seed, rank), so workers see different samples.

Evaluation split (``split``, the run's ``eval_split``):

* ``"test"`` (the default): the task evaluates on its test data; training data and
  evaluation are exactly what they were before ``split`` existed (bit for bit).
* ``"val"``: the task evaluates on a fixed held-out part of its *training* data, chosen
  with a constant seed (the same for every run seed), and that part is excluded from every
  worker's training stream; the test data is neither trained nor evaluated on. This is
  the split to tune hyperparameters on before evaluating the chosen values on ``"test"``.

:meth:`Task.split_ids` names the samples each side uses, in one id space per task
(documented by each task), so that disjointness can be checked by index.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

TASKS: dict[str, type[Task]] = {}
#: values of ``split`` (and of TrainConfig.eval_split)
EVAL_SPLITS = ("test", "val")


def stream_seed(*keys: int) -> int:
    """A 63-bit seed derived from integer keys (e.g. run seed and rank) without collisions
    such as seed + rank would have (seed 1 rank 0 == seed 0 rank 1)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(2, np.uint64)[0] >> np.uint64(1))


class Task:
    """A training task: a model, per-worker training batches and an evaluation, built from a
    seed (and a data directory, for tasks with files). Subclass it and name the class with
    ``--tasks FILE.py:Class`` to bring a task of your own to ``accord train`` and ``accord
    bench`` (examples/user_task.py)."""

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

    def __init__(self, seed: int, data_dir: str | None = None, split: str = "test") -> None:
        if split not in EVAL_SPLITS:
            raise ValueError(f"split: got {split!r}, allowed: {', '.join(EVAL_SPLITS)}")
        self.seed = seed
        self.data_dir = data_dir
        #: what :meth:`evaluate` measures: "test" (the test data) or "val" (a held-out part
        #: of the training data, excluded from the training stream)
        self.split = split

    @classmethod
    def batch_limit(cls, split: str = "test") -> tuple[int | None, str]:
        """The largest per-worker micro-batch the task serves under ``split`` (None:
        unlimited) and why; a task whose training data shrinks under "val" overrides it."""
        return cls.max_batch_size, cls.max_batch_note

    def split_ids(self) -> dict[str, torch.Tensor | None]:
        """``{"train": ids the training stream draws from, "eval": ids evaluate() uses}``,
        as 1-D int64 tensors in the task's own id space (see the task's docstring), or None
        for a task without a finite pool of samples. Under ``split="val"`` the two are
        disjoint, and disjoint from the ids evaluated under ``split="test"``."""
        raise NotImplementedError

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


#: user tasks loaded by spec ("module:Name" or "file.py:Name"), so each is imported once
_LOADED: dict[str, type[Task]] = {}


def get_task(name: str) -> type[Task]:
    """A built-in task by name, or a user's :class:`Task` subclass by import path:
    ``my_pkg.my_mod:MyTask`` (importable from the current directory or PYTHONPATH) or
    ``path/to/file.py:MyTask``. ValueError (one line) for anything else."""
    if name in TASKS:
        return TASKS[name]
    if isinstance(name, str) and ":" in name:
        if name not in _LOADED:
            _LOADED[name] = _load(name)
        return _LOADED[name]
    raise ValueError(f"unknown task {name!r}; allowed: {', '.join(sorted(TASKS))}, or your "
                     "own Task as module:Name or path/to/file.py:Name")


def is_file_spec(spec: str) -> bool:
    """True for ``path/to/file.py:Name`` (a file), False for ``module:Name``."""
    from .._imports import is_file

    return is_file(spec.rpartition(":")[0])


def task_source(spec: str) -> dict[str, Any] | None:
    """What a run records of a user task: its spec, the file its class came from and that
    file's SHA-256 (None for a built-in task)."""
    if spec in TASKS:
        return None
    import inspect

    from .._imports import code_source

    cls = get_task(spec)
    try:
        path = inspect.getsourcefile(cls)
    except TypeError:
        path = None
    return code_source(spec, path)


def _load(spec: str) -> type[Task]:
    from .._imports import import_target

    target, _, attr = spec.rpartition(":")
    if not target or not attr.isidentifier():
        raise ValueError(f"task {spec!r}: allowed: a built-in task, module:Name or "
                         "path/to/file.py:Name")
    module = import_target(target, f"task {spec!r}", prefix="accord_user_task_")
    cls = getattr(module, attr, None)
    if cls is None:
        raise ValueError(f"task {spec!r}: {target!r} has no {attr!r}")
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        what = f"the class {cls.__name__}" if isinstance(cls, type) else type(cls).__name__
        raise ValueError(f"task {spec!r}: {attr!r} is {what}, allowed: a subclass of "
                         "accord.Task")
    return cls


def _import_all() -> None:
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()
