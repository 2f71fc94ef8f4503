"""Train an MLP on scikit-learn's digits with Hugging Face accelerate and an accord algorithm.

    torchrun --nproc_per_node 2 examples/accelerate_train.py --algo acga --steps 50
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_train.py --algo easgd

The accelerate loop is unchanged except for one call: ``accord.integrations.accelerate.prepare`` in
place of ``accelerator.prepare(model, optimizer)``. Prints the test accuracy of the
consensus model (the mean of the replicas, which differ between communications under
model-phase algorithms such as local_sgd or easgd). Nothing downloads.
"""

from __future__ import annotations

import argparse
import copy
import gc
from datetime import timedelta

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import accord
import accord.integrations.accelerate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algo", default="acga", choices=sorted(accord.REGISTRY))
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps")
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds a collective waits for a peer before failing")
    args = parser.parse_args()

    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), gradient_accumulation_steps=args.accum,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.timeout))])
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    test, train = perm[:360], perm[360:]
    loader = DataLoader(TensorDataset(x[train], y[train]), batch_size=args.batch_size,
                        shuffle=True, drop_last=True)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    # the accord line: accelerate's model and optimizer, plus the aggregator
    model, optimizer, agg = accord.integrations.accelerate.prepare(
        accelerator, model, optimizer, args.algo)
    loader = accelerator.prepare(loader)  # each process reads its own shard

    steps = 0
    while steps < args.steps:
        for xb, yb in loader:
            with accelerator.accumulate(model):
                loss = F.cross_entropy(model(xb), yb)
                accelerator.backward(loss)
                accord.integrations.accelerate.note_loss(optimizer, loss)  # only lsgd reads it
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                steps += 1
                if steps == args.steps:
                    break

    consensus = copy.deepcopy(accelerator.unwrap_model(model))
    with torch.no_grad():
        for p in consensus.parameters():
            p.copy_(accelerator.reduce(p.detach().clone(), reduction="mean"))
        logits = consensus(x[test].to(accelerator.device))
        acc = (logits.argmax(-1).cpu() == y[test]).float().mean().item()
    sent = agg.comm.stats.bytes
    agg.close()
    if accelerator.is_main_process:
        print(f"{args.algo}: {steps} steps on {accelerator.num_processes} processes, "
              f"{sent / 1e6:.2f} MB sent per process by accord")
        print(f"final test_acc={acc:.4f}")
    # the DDP model goes before the process group (torch can abort at exit otherwise);
    # the accelerator holds its own references to it, which free_memory drops
    del model, optimizer, consensus, agg
    accelerator.free_memory()
    gc.collect()
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
