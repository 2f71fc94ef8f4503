"""Your own task in accord's harness: train, bench and report it by import path.

    accord train --task examples/user_task.py:TwoMoons --algo acga --workers 2 --steps 100
    accord bench --tasks examples/user_task.py:TwoMoons --algos allreduce,acga \\
                 --workers 2 --steps 100 --seeds 0,1 --out runs/moons
    accord report runs/moons

A task is a subclass of ``accord.Task``: it builds the model (the same on every rank for a
seed: build it in ``_model``, which ``build_model`` calls under the run seed), gives each
rank its own endless stream of training batches, computes the loss of a batch and
evaluates a model. Every worker imports this file itself, so it must import cleanly and
must not train or download anything at import time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from accord import Task
from accord.tasks import stream_seed


def _moons(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved half circles with a little noise, labels 0 and 1."""
    t = torch.rand(n, generator=generator) * math.pi
    label = torch.randint(0, 2, (n,), generator=generator)
    x = torch.stack([torch.cos(t), torch.sin(t)], dim=1)
    x = torch.where(label[:, None] == 1, torch.stack([1 - x[:, 0], 0.5 - x[:, 1]], 1), x)
    return x + 0.1 * torch.randn(n, 2, generator=generator), label


class TwoMoons(Task):
    name = "two-moons"
    description = "MLP 2-32-2 on two interleaved half circles (generated, no files)"
    has_accuracy = True
    default_lr = 0.2
    default_batch_size = 32
    eval_tensors = ("x_eval", "y_eval")

    def __init__(self, seed: int, data_dir: str | None = None, split: str = "test") -> None:
        super().__init__(seed, data_dir, split)
        # the evaluation sample is fixed by the run seed and apart from every rank's stream
        gen = torch.Generator().manual_seed(stream_seed(seed, 10**6))
        self.x_eval, self.y_eval = _moons(1024, gen)

    def _model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2))

    def train_stream(self, rank: int, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
        gen = torch.Generator().manual_seed(stream_seed(self.seed, rank))
        while True:
            yield _moons(batch_size, gen)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        logits = model(self.x_eval)
        return {"eval_loss": float(F.cross_entropy(logits, self.y_eval)),
                "eval_acc": float((logits.argmax(-1) == self.y_eval).float().mean())}
