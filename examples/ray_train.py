"""An accord aggregator inside a Ray Train ``TorchTrainer``: digits, 2 CPU workers, gloo.

Run (needs ``pip install 'accord[ray]'``; nothing is downloaded at run time)::

    python examples/ray_train.py                          # ACGA, 300 steps, 2 workers
    python examples/ray_train.py --algo easgd --set period=4
    python examples/ray_train.py --algo local_sgd --steps 100

What it shows: Ray Train starts the workers and initialises the torch.distributed process
group (gloo here) before it calls ``train_func``, so the only accord line in the training
function is ``accord.wrap(optimizer, algo, **hyperparameters)``; the wrapped optimizer's
``step(loss=...)`` runs the algorithm around the inner SGD step. Each worker trains an MLP
on its own shard of scikit-learn's bundled 8x8 digits, drawing its own mini-batches. After
training the workers evaluate the consensus model (EASGD's centre; otherwise the mean of the
replicas, which for gradient-phase algorithms such as ``acga`` are identical anyway) on
their share of the held-out test set and sum the counts; every worker calls
``ray.train.report`` and rank 0 attaches the consensus model as the checkpoint (Ray Train
puts metrics into the ``Result`` only with a checkpoint). The driver prints the ``Result``'s
metrics, including the calls and bytes accord communicated on rank 0. The script starts a
local Ray instance with ``--workers`` CPUs (one per worker) and shuts it down at the end.

Measured on 2 cores, 300 steps, seed 0: test accuracy 0.936 with ``acga``, 0.928 with
``easgd`` (period 4), 0.936 with ``local_sgd``, 0.939 with ``allreduce``; about 35 s per
run, nearly all of it Ray's start-up.

On a multi-node cluster (not tested here): start Ray on the nodes (``ray start``), pass
``--address auto`` so the script joins that cluster instead of starting one, and point
``--storage-path`` at storage every node can reach (NFS, S3). For GPUs set
``ScalingConfig(use_gpu=True)`` (Ray then initialises NCCL) and move the model and batches
to ``ray.train.torch.get_device()``; the accord lines stay as they are.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import accord
from accord.algorithms import validate

N_TEST = 360  # held-out digits (20%), the same split on every worker


def load_digits_split() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    test, train = perm[:N_TEST], perm[N_TEST:]
    return x[train], y[train], x[test], y[test]


def train_func(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker, inside an initialised process group."""
    import ray.train

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    x, y, x_test, y_test = load_digits_split()
    x, y = x[rank::world], y[rank::world]  # this worker's shard of the training set

    torch.manual_seed(config["seed"])
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    sgd = torch.optim.SGD(model.parameters(), lr=config["lr"])
    opt = accord.wrap(sgd, config["algo"], **config["hp"])  # collective: every worker calls it

    batches = torch.Generator().manual_seed(config["seed"] + 1 + rank)
    losses = []
    for _ in range(config["steps"]):
        idx = torch.randint(len(x), (config["batch_size"],), generator=batches)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step(loss=loss.detach())
        opt.zero_grad()
        losses.append(loss.item())

    with torch.no_grad():  # the consensus model, on every worker
        params = list(model.parameters())
        centre = opt.aggregator.consensus_params()
        for i, p in enumerate(params):
            if centre is not None:
                p.copy_(centre[i])
            else:
                dist.all_reduce(p)
                p.div_(world)
        xt, yt = x_test[rank::world], y_test[rank::world]  # this worker's share of the test
        logits = model(xt)
        tail = losses[-20:]
        sums = torch.tensor([float(F.cross_entropy(logits, yt, reduction="sum")),
                             float((logits.argmax(-1) == yt).sum()), float(len(yt)),
                             sum(tail) / len(tail)], dtype=torch.float64)
        dist.all_reduce(sums)
    comm = opt.aggregator.comm.stats
    opt.aggregator.close()
    metrics = {
        "algo": config["algo"], "steps": config["steps"], "test_acc": float(sums[1] / sums[2]),
        "test_loss": float(sums[0] / sums[2]), "train_loss": float(sums[3] / world),
        "comm_calls": comm.calls, "comm_mbytes": comm.bytes / 1e6,
    }
    # every worker reports (a barrier); rank 0 adds the consensus model as the checkpoint,
    # which is what puts the metrics into the Result
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            torch.save(model.state_dict(), os.path.join(tmp, "model.pt"))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def _setting(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"got {text!r}, allowed: KEY=VALUE")
    return key, value


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algo", default="acga", help="an accord algorithm (accord list)")
    ap.add_argument("--set", action="append", default=[], type=_setting, metavar="KEY=VALUE",
                    help="an algorithm hyperparameter (repeatable; accord list -v)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--address", default=None,
                    help="an existing Ray cluster (e.g. auto); default: start one locally")
    ap.add_argument("--storage-path", default=None,
                    help="Ray Train's run storage; default: a temporary directory")
    ap.add_argument("--verbose", action="store_true", help="show the Ray workers' logs")
    args = ap.parse_args(argv)
    try:
        import ray
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError as exc:  # one line, as accord's other integrations say it
        raise SystemExit(f"{ap.prog}: this needs the optional package 'ray', which is not "
                         f"installed ({exc}); install it with: pip install 'accord[ray]'"
                         ) from None
    hp = dict(args.set)  # accord converts and checks the strings
    validate(args.algo, hp, args.workers)  # a bad name or value fails before Ray starts

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the local Ray workers
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = {"logging_level": logging.ERROR, "log_to_driver": args.verbose}
    if args.address:
        ray.init(address=args.address, **quiet)
    else:
        ray.init(num_cpus=args.workers, include_dashboard=False, **quiet)
    try:
        with tempfile.TemporaryDirectory(prefix="accord-ray-") as tmp:
            trainer = TorchTrainer(
                train_func,
                train_loop_config={"algo": args.algo, "hp": hp, "steps": args.steps,
                                   "lr": args.lr, "batch_size": args.batch_size,
                                   "seed": args.seed},
                scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=False),
                torch_config=TorchConfig(backend="gloo"),
                run_config=RunConfig(name="accord-digits",
                                     storage_path=args.storage_path or tmp),
            )
            result = trainer.fit()
    finally:
        ray.shutdown()
    m = result.metrics
    print(f"final: algo={m['algo']} steps={m['steps']} test_acc={m['test_acc']:.4f} "
          f"test_loss={m['test_loss']:.4f} train_loss={m['train_loss']:.4f} "
          f"comm_calls={m['comm_calls']} comm_mbytes={m['comm_mbytes']:.2f}")
    if args.storage_path:
        print(f"consensus model: {result.checkpoint.path}/model.pt")
    return m


if __name__ == "__main__":
    main()
