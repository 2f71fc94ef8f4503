"""An MLP (64-128-10) on scikit-learn's bundled 8x8 digits (1,797 images, no download).

A fixed 20% of the images (chosen with a constant seed, the same for every run) is held
out as the test set. Each worker draws shuffled epochs over the remaining training images
from its own generator, so workers see i.i.d. but different mini-batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import ClassificationTask, register_task, shuffled_batches

SPLIT_SEED = 0
TEST_FRACTION = 0.2


def _load() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = int(len(x) * TEST_FRACTION)
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


@register_task
class Digits(ClassificationTask):
    name = "digits"
    eval_tensors = ("x_test", "y_test")
    description = "MLP 64-128-10 on sklearn load_digits, 20% held-out test split"
    has_accuracy = True
    default_lr = 0.1
    default_batch_size = 16
    max_batch_size = 1437
    max_batch_note = "its training split"

    def __init__(self, seed: int, data_dir: str | None = None) -> None:
        super().__init__(seed, data_dir)
        self.x_train, self.y_train, self.x_test, self.y_test = _load()

    def _model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def train_stream(self, rank: int, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
        for idx in shuffled_batches(len(self.x_train), batch_size, self.seed, rank):
            yield self.x_train[idx], self.y_train[idx]

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        logits = model(self.x_test)
        return {
            "eval_loss": float(F.cross_entropy(logits, self.y_test)),
            "eval_acc": float((logits.argmax(-1) == self.y_test).float().mean()),
        }
