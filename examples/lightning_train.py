"""Lightning with accord: the one line a Lightning user adds is the strategy.

    torchrun --nproc_per_node 2 examples/lightning_train.py --algos ddp,acga,local_sgd,wagma

Trains a small MLP on the sklearn digits data (offline; each worker its own shard, a
held-out split for validation) with ``Trainer(strategy=AccordStrategy(algo, ...))`` for
each algorithm in ``--algos`` (``ddp`` is Lightning's own DDP strategy, for comparison),
and prints each run's validation accuracy and wall time. Under model-phase algorithms the
validation runs on the consensus model (the mean of the replicas). Hyperparameters:
``--set name=value`` (for every accord algorithm of the run).
"""

from __future__ import annotations

import argparse
import gc
import os
import time
import warnings

import torch
from sklearn.datasets import load_digits

warnings.filterwarnings("ignore")  # Lightning's advice about dataloader workers

import lightning as L  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402

from accord.integrations.lightning import AccordStrategy  # noqa: E402


class Classifier(L.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                       torch.nn.Linear(128, 10))
        self.lr = lr

    def training_step(self, batch, index):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, index):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def loaders(rank: int, world: int, batch: int):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, val = order[:1400], order[1400:]
    mine = train[rank::world]  # this worker's shard
    make = torch.utils.data.TensorDataset
    return (torch.utils.data.DataLoader(make(x[mine], y[mine]), batch_size=batch, shuffle=True,
                                        generator=torch.Generator().manual_seed(rank)),
            torch.utils.data.DataLoader(make(x[val[rank::world]], y[val[rank::world]]),
                                        batch_size=256))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algos", default="ddp,acga,local_sgd,wagma")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    args = ap.parse_args()
    hp = dict(item.split("=", 1) for item in args.set)
    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    results = []
    for algo in args.algos.split(","):
        strategy = DDPStrategy() if algo == "ddp" else AccordStrategy(algo, **hp)
        trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strategy,
                            max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            use_distributed_sampler=False, num_sanity_val_steps=0)
        train, val = loaders(rank, world, args.batch)
        start = time.perf_counter()
        trainer.fit(Classifier(args.lr), train, val)
        seconds = time.perf_counter() - start
        results.append((algo, float(trainer.callback_metrics["val_acc"]), seconds))
    if rank == 0:
        print(f"{'algorithm':<12} {'val_acc':>8} {'seconds':>8}")
        for algo, acc, seconds in results:
            print(f"{algo:<12} {acc:>8.4f} {seconds:>8.2f}")
    # tear down in order: the last DDP model before its process group (left to the
    # interpreter's exit, gloo's threads can abort the process after a finished run)
    del trainer, strategy
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
