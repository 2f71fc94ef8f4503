"""An MLP (64-128-10) on scikit-learn's bundled 8x8 digits (1,797 images, no download).

A fixed 20% of the images (chosen with a constant seed, the same for every run) is held
out as the test set. Each worker draws shuffled epochs over the remaining training images
from its own generator, so workers see i.i.d. but different mini-batches.

Split: ``split="test"`` evaluates on the test set above. ``split="val"`` evaluates on a
fixed 20% of the 1,438 training images (287 images, chosen by a permutation of the training
images with its own constant seed VAL_SEED, the same for every run seed) and removes them
from the training data, so every worker's stream draws from the remaining 1,151 images;
the test set is not used. Ids (:meth:`Digits.split_ids`): row indices into
``sklearn.datasets.load_digits()`` (0..1796).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..core import cache_dir
from . import ClassificationTask, register_task, shuffled_batches

SPLIT_SEED = 0
TEST_FRACTION = 0.2
VAL_SEED = 1  # fixes the validation rows; independent of the run seed on purpose
VAL_FRACTION = 0.2  # of the training rows
#: training rows under split="val" (1797 - 359 test rows - 287 validation rows)
VAL_SPLIT_TRAIN_ROWS = 1151


def split_rows(n: int, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """(training rows, evaluated rows) of ``n`` images under ``split``, as row indices.
    Under "test" the training rows keep the order of the SPLIT_SEED permutation; under
    "val" the validation rows are removed from them, the order of the rest unchanged."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = int(n * TEST_FRACTION)
    test, train = perm[:n_test], perm[n_test:]
    if split == "test":
        return train, test
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(VAL_SEED))
    held = pick[:int(len(train) * VAL_FRACTION)]
    keep = torch.ones(len(train), dtype=torch.bool)  # host: split indices
    keep[held] = False
    return train[keep], train[held]


#: SHA-256 of the images (fp32, scaled to [0, 1]) and labels (int64) of ``load_digits()``
DIGITS_SHA256 = "8b3b6ae90863430bdef06a3f7d1ec2f6a905a53d3375655b18cf63780ad98772"


def _digest(x: torch.Tensor, y: torch.Tensor) -> str:
    return hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()


def _arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """The images (scaled to [0, 1]) and labels of ``load_digits()``. Importing scikit-learn
    costs about a second of CPU in every worker, so the two tensors are kept in
    ``cache_dir("data")/digits.pt`` (0.5 MB) after the first load and used while their
    SHA-256 is :data:`DIGITS_SHA256`; a damaged or edited file is loaded again from
    scikit-learn and rewritten, and a cache that cannot be written is skipped."""
    path = cache_dir("data") / "digits.pt"
    try:
        x, y = torch.load(path, weights_only=True)
        if x.dtype == torch.float32 and y.dtype == torch.long and _digest(x, y) == DIGITS_SHA256:
            return x, y
    except Exception:  # noqa: BLE001 - missing or damaged: load from scikit-learn
        pass
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0  # host: dataset
    y = torch.tensor(data.target, dtype=torch.long)  # host: dataset
    if _digest(x, y) != DIGITS_SHA256:
        return x, y  # another scikit-learn's data: used, never cached as these
    # a file of this process's own, renamed into place: readers never see half of one
    part = path.with_name(f"{path.name}.{os.getpid()}.part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save((x, y), part)
        os.replace(part, path)
    except Exception:  # noqa: BLE001 - a full disk, a read-only cache: skipped
        with contextlib.suppress(OSError):
            part.unlink(missing_ok=True)
    return x, y


def _load(split: str = "test") -> tuple[torch.Tensor, ...]:
    x, y = _arrays()
    train, held = split_rows(len(x), split)
    return x[train], y[train], x[held], y[held], train, held


@register_task
class Digits(ClassificationTask):
    name = "digits"
    #: the evaluated images: the test set, or the validation rows under split="val"
    eval_tensors = ("x_test", "y_test")
    description = "MLP 64-128-10 on sklearn load_digits, 20% held-out test split"
    has_accuracy = True
    default_lr = 0.1
    default_batch_size = 16
    max_batch_size = 1437
    max_batch_note = "its training split"

    def __init__(self, seed: int, data_dir: str | None = None, split: str = "test") -> None:
        super().__init__(seed, data_dir, split)
        (self.x_train, self.y_train, self.x_test, self.y_test, self.train_rows,
         self.eval_rows) = _load(split)

    @classmethod
    def batch_limit(cls, split: str = "test") -> tuple[int | None, str]:
        if split == "val":
            return VAL_SPLIT_TRAIN_ROWS, "its training split without the validation rows"
        return super().batch_limit(split)

    def split_ids(self) -> dict[str, torch.Tensor | None]:
        return {"train": self.train_rows.clone(), "eval": self.eval_rows.clone()}

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
