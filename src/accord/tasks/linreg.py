"""The AdaCons reference toy: noiseless linear regression towards w* = 0.

Dimension 1000, weights starting uniform in [-5, 5], inputs uniform in [0, 1]^1000,
loss 0.5 (w . x)^2 averaged over the batch (yoniLc/AdaCons Main.py). Every input has
positive mean, so per-sample gradients (w.x) x are nearly parallel and scale with the
residual: averaging is dominated by the few samples with a large residual.

The optional oracle step size lr = <d, w> / ||d||^2 (exact line search along d, valid
only because the minimiser is w = 0) is what the reference uses; it hides any change
of gradient scale, so it says nothing about a fixed learning rate.

Split: the data are synthetic and unlimited (every training batch is a fresh draw), so there
is no finite pool to hold out from. ``split="test"`` evaluates on EVAL_SAMPLES (4096) inputs
drawn from the generator keyed (seed, TEST_KEY); ``split="val"`` on as many drawn from the
generator keyed (seed, VAL_KEY), a stream distinct from the test sample's and from every
rank's training stream (keyed (seed, rank)). :meth:`LinReg.split_ids` returns None for both
sides: there are no sample ids to compare.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from . import Task, register_task, stream_seed

DIM = 1000
EVAL_SAMPLES = 4096
#: generator keys of the evaluation samples, with the run seed (ranks key the training
#: streams, so these are far above any rank)
TEST_KEY = 1 << 20
VAL_KEY = (1 << 20) + 1


class _Linear(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 1, bias=False)
        with torch.no_grad():
            self.linear.weight.uniform_(-5.0, 5.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


@register_task
class LinReg(Task):
    name = "linreg"
    eval_tensors = ("eval_x",)
    description = "AdaCons toy: 0.5 (w.x)^2, dimension 1000, w0 ~ U[-5, 5], x ~ U[0, 1]"
    has_accuracy = False
    has_oracle_lr = True
    default_lr = 1e-3
    default_batch_size = 16
    # every sample is DIM float32 inputs (4 KB): 16,384 of them are 64 MB per micro-batch
    max_batch_size = 16384
    max_batch_note = "64 MB of inputs per worker and micro-batch"

    def __init__(self, seed: int, data_dir: str | None = None, split: str = "test") -> None:
        super().__init__(seed, data_dir, split)
        key = VAL_KEY if split == "val" else TEST_KEY
        gen = torch.Generator().manual_seed(stream_seed(seed, key))
        self.eval_x = torch.rand(EVAL_SAMPLES, DIM, generator=gen)

    def split_ids(self) -> dict[str, torch.Tensor | None]:
        return {"train": None, "eval": None}  # synthetic draws: no finite pool of samples

    def _model(self) -> nn.Module:
        return _Linear(DIM)

    def train_stream(self, rank: int, batch_size: int) -> Iterator[torch.Tensor]:
        gen = torch.Generator().manual_seed(stream_seed(self.seed, rank))
        while True:
            yield torch.rand(batch_size, DIM, generator=gen)

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return 0.5 * model(batch).pow(2).sum(-1).mean()

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"eval_loss": float(self.loss(model, self.eval_x))}

    @torch.no_grad()
    def oracle_lr(self, model: nn.Module) -> float:
        w = model.linear.weight
        d = w.grad
        denom = float(d.pow(2).sum())
        return float((d * w).sum()) / denom if denom > 0 else 0.0
