"""Run under ``torchrun --nproc_per_node 2``: Lightning fits with AccordStrategy and the
references they must equal; every rank saves its observations to ``OUT/rank<r>.pt`` for
tests/test_lightning.py to check."""

from __future__ import annotations

import copy
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")  # Lightning's advice about workers, sanity checks, ...
torch.set_num_threads(1)

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402

import accord  # noqa: E402
from accord.integrations.lightning import AccordStrategy  # noqa: E402

BATCHES = 8  # per epoch and rank
BATCH = 8
CLIP = 3.0  # local gradient norms here are 1.2-4.8 on rank 0, 2.2-7.2 on rank 1


def data(rank: int, split: str = "train") -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(100 * rank + (0 if split == "train" else 7))
    x = torch.randn(BATCHES * BATCH, 6, generator=gen) + 0.5 * rank
    w = torch.arange(1.0, 7.0) / 6
    y = (x @ w).unsqueeze(1) + 0.1 * torch.randn(x.shape[0], 1, generator=gen)
    return torch.utils.data.TensorDataset(x, y)


def loader(rank: int, split: str = "train") -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(data(rank, split), batch_size=BATCH, shuffle=False)


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).clone()


class Net(L.LightningModule):
    def __init__(self, seed: int = 0, momentum: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                                       torch.nn.Linear(16, 1))
        self.momentum = momentum
        self.seen_in_validation: list[torch.Tensor] = []
        self.after_step: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, index):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def on_train_batch_end(self, outputs, batch, index) -> None:
        self.after_step.append(flat(self))

    def validation_step(self, batch, index):
        if index == 0:
            self.seen_in_validation.append(flat(self))
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=self.momentum)


def flat_state(state: dict) -> torch.Tensor:
    return torch.cat([v.detach().reshape(-1) for v in state.values()]).clone()


def fit(strategy, rank: int, out: Path, *, epochs: int = 1, model: Net | None = None,
        ckpt_path: str | None = None, validate: bool = False, logger=False,
        accumulate: int = 1, callbacks: list | None = None,
        gradient_clip_val: float | None = None) -> tuple[Net, float]:
    model = model or Net()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=epochs,
                        logger=logger, enable_checkpointing=any(
                            isinstance(c, ModelCheckpoint) for c in callbacks or []),
                        callbacks=callbacks, gradient_clip_val=gradient_clip_val,
                        enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False,
                        num_sanity_val_steps=0, log_every_n_steps=2,
                        accumulate_grad_batches=accumulate,
                        limit_val_batches=1.0 if validate else 0, default_root_dir=str(out))
    start = time.perf_counter()
    trainer.fit(model, loader(rank), loader(rank, "val") if validate else None,
                ckpt_path=ckpt_path)
    model.trainer_ref = trainer
    return model, time.perf_counter() - start


def native(algo: str, rank: int, steps: int, momentum: float = 0.0, norms: list | None = None,
           **hp) -> torch.Tensor:
    """The accord-native loop on the same batches: the reference for model-phase runs.
    ``norms`` collects this rank's gradient norm at each step, before any clip."""
    model = Net(momentum=momentum)
    opt = accord.wrap(model.configure_optimizers(), algo, buffers=model.buffers(), **hp)
    batches = list(loader(rank))
    for step in range(steps):
        x, y = batches[step % len(batches)]
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if norms is not None:
            norms.append(float(torch.cat([p.grad.reshape(-1) for p in model.parameters()]
                                         ).norm()))
        opt.step(loss=loss.detach())
    opt.aggregator.close()
    return flat(model)


def main() -> None:
    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    res: dict = {}
    warned: list[str] = []  # accord.integrations.lightning's warnings on this rank

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warned.append(record.getMessage())

    logging.getLogger("accord.integrations.lightning").addHandler(Collect(logging.WARNING))

    # gradient phase: allreduce through the strategy == Lightning's own DDP
    m, res["time_allreduce"] = fit(AccordStrategy("allreduce"), rank, out)
    res["allreduce"] = flat(m)
    m, res["time_ddp"] = fit(DDPStrategy(), rank, out)
    res["ddp"] = flat(m)
    # ... with each rank's gradient clipped in the hook, and DDP options by ddp_kwargs
    class SeenByDDP(L.Callback):
        def on_train_end(self, trainer, module) -> None:
            res["acga_bucket_view"] = trainer.strategy.model.gradient_as_bucket_view

    strategy = AccordStrategy("acga", momentum=0.9, clip_grad_norm=CLIP,
                              ddp_kwargs={"gradient_as_bucket_view": True})
    m, _ = fit(strategy, rank, out, callbacks=[SeenByDDP()])
    res["acga"] = flat(m)
    ref = Net()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    agg = accord.build("acga", ref.parameters(), momentum=0.9)
    res["acga_norms"] = []
    for step, (x, y) in enumerate(loader(rank)):
        ref_opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        # the reference clips with torch's own function, then aggregates
        res["acga_norms"].append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)))
        agg.after_backward(accord.StepContext(step=step))
        ref_opt.step()
    res["acga_native"] = flat(ref)

    # model phase: equal to the native loop, replicas differ between syncs
    # (local_sgd with each rank's gradient clipped before the optimizer step)
    for algo, hp in (("local_sgd", {"period": 3, "clip_grad_norm": CLIP}),
                     ("easgd", {"period": 2})):
        m, res[f"time_{algo}"] = fit(AccordStrategy(algo, **hp), rank, out)
        res[algo] = flat(m)
        res[f"{algo}_steps"] = torch.stack(m.after_step)
        res[f"{algo}_norms"] = []
        res[f"{algo}_native"] = native(algo, rank, BATCHES, norms=res[f"{algo}_norms"], **hp)

    # asynchronous: wait-avoiding WAGMA runs through the strategy
    m, res["time_wagma"] = fit(AccordStrategy("wagma", period=2), rank, out, validate=True)
    res["wagma_val"] = float(m.trainer_ref.callback_metrics["val_loss"])

    # consensus evaluation: validation sees the mean of the replicas; ModelCheckpoint saves
    # from inside validation (its on_validation_end, the consensus model swapped in)
    m, _ = fit(AccordStrategy("local_sgd", period=3), rank, out, validate=True,
               logger=CSVLogger(str(out), name="csv", version=rank),
               callbacks=[ModelCheckpoint(dirpath=str(out / "mc"), filename="val",
                                          save_on_train_epoch_end=False)])
    res["val_seen"] = m.seen_in_validation[-1]
    res["val_final"] = flat(m)
    res["val_loss"] = float(m.trainer_ref.callback_metrics["val_loss"])
    res["csv"] = str(out / "csv" / f"version_{rank}" / "metrics.csv")
    ckpt = torch.load(out / "mc" / "val.ckpt", weights_only=False)
    res["mc_top"] = flat_state(ckpt["state_dict"])
    res["mc_replica"] = flat_state(ckpt["accord"]["ranks"][rank]["module"])

    # gradient accumulation: the aggregator runs once per optimizer step
    strategy = AccordStrategy("local_sgd", period=1)
    fit(strategy, rank, out, accumulate=2)
    res["accumulate_steps"] = strategy.accord_steps
    strategy = AccordStrategy("acga")
    warned.clear()
    fit(strategy, rank, out, accumulate=2, gradient_clip_val=0.5)
    res["accumulate_acga_gathers"] = strategy.aggregator.comm.stats.as_dict()["allgather"]["calls"]
    res["clip_after_warnings"] = list(warned)

    # checkpoint at the end of epoch 1 (replicas differ there), resume for epoch 2
    def traffic(strategy: AccordStrategy) -> dict:
        return {k: (v["calls"], v["bytes"])
                for k, v in strategy.aggregator.comm.stats.as_dict().items()}

    for algo in ("local_sgd", "easgd"):
        hp = {"period": 3}
        straight = AccordStrategy(algo, **hp)
        m, _ = fit(straight, rank, out, epochs=2, model=Net(momentum=0.9))
        res[f"straight_{algo}"] = flat(m)
        res[f"straight_comm_{algo}"] = traffic(straight)
        first = AccordStrategy(algo, **hp)
        m, _ = fit(first, rank, out, epochs=1, model=Net(momentum=0.9))
        ckpt = str(out / f"mid_{algo}.ckpt")
        m.trainer_ref.save_checkpoint(ckpt)
        res[f"at_checkpoint_{algo}"] = flat(m)
        centre = first.aggregator.consensus_params()
        res[f"centre_{algo}"] = None if centre is None else torch.cat(
            [c.reshape(-1) for c in centre]).clone()
        saved = torch.load(ckpt, weights_only=False)
        res[f"ckpt_top_{algo}"] = flat_state(saved["state_dict"])
        res[f"ckpt_replica_{algo}"] = flat_state(saved["accord"]["ranks"][rank]["module"])
        resumed = AccordStrategy(algo, **hp)
        m, _ = fit(resumed, rank, out, epochs=2, model=Net(seed=5, momentum=0.9),
                   ckpt_path=ckpt)
        res[f"resumed_{algo}"] = flat(m)
        res[f"resumed_steps_{algo}"] = resumed.accord_steps
        res[f"resumed_comm_{algo}"] = traffic(resumed)
    ckpt = str(out / "mid_local_sgd.ckpt")
    try:
        fit(AccordStrategy("easgd"), rank, out, epochs=2, ckpt_path=ckpt)
        res["wrong_algo"] = "no error"
    except ValueError as exc:
        res["wrong_algo"] = str(exc)

    torch.save(copy.deepcopy(res), out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
