"""Step time of accord's gradient algorithms relative to torch DDP, side by side in one run.

    .venv/bin/python benchmarks/ddp_speed.py [--workers 2,4] [--rounds 7] [--steps 10]

A 10M-parameter MLP (1024-2304-2304-1024-10, batch 64 per worker, random data) trains
with plain SGD on gloo, one thread per process. In every round each arm runs ``--steps``
steps in turn (interleaved, so a slow phase of the machine hits every arm alike): torch
``DistributedDataParallel``, accord ``allreduce`` and ``acga`` through
``accord.wrap``, and the same loop with no communication (compute only). The script
prints, per world size, the median step time of each arm over the rounds and its ratio
to DDP's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

ARMS = ("ddp", "allreduce", "acga", "compute")
SIZES = (1024, 2304, 2304, 1024, 10)
BATCH = 64


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for a, b in zip(SIZES[:-1], SIZES[1:], strict=True):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def _arm(name: str):
    import accord

    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=1e-3)
    if name == "ddp":
        net = torch.nn.parallel.DistributedDataParallel(model)
        return net, inner, lambda loss: inner.step()
    if name == "compute":
        return model, inner, lambda loss: inner.step()
    opt = accord.wrap(inner, name, broadcast=False)
    return model, opt, lambda loss: opt.step(loss=loss)


def _worker(rank: int, world: int, port: int, rounds: int, steps: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(BATCH, SIZES[0], generator=gen)
    y = torch.randint(SIZES[-1], (BATCH,), generator=gen)
    arms = {name: _arm(name) for name in ARMS}
    times: dict[str, list[float]] = {name: [] for name in ARMS}
    for r in range(rounds + 1):  # round 0 warms up every arm
        for name, (net, opt, step) in arms.items():
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                loss = torch.nn.functional.cross_entropy(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                step(loss.detach())
            dist.barrier()
            if r:
                times[name].append((time.perf_counter() - start) / steps)
    if rank == 0:
        queue.put({name: statistics.median(t) for name, t in times.items()})
    for name in list(arms):  # DDP models must go before the process group
        del arms[name]
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="2,4")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    params = sum(p.numel() for p in _model().parameters())
    print(f"MLP {'-'.join(map(str, SIZES))}: {params / 1e6:.1f}M parameters, batch {BATCH} "
          f"per worker, gloo, 1 thread per process; median of {args.rounds} rounds of "
          f"{args.steps} steps per arm")
    print(f"{'workers':>7} {'arm':<10} {'step ms':>9} {'vs DDP':>8}")
    ctx = mp.get_context("spawn")
    for world in (int(w) for w in args.workers.split(",")):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        queue = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(r, world, port, args.rounds, args.steps,
                                                   queue)) for r in range(world)]
        for p in procs:
            p.start()
        result = queue.get(timeout=3600)
        for p in procs:
            p.join()
        for name in ARMS:
            print(f"{world:>7} {name:<10} {result[name] * 1e3:>9.1f} "
                  f"{result[name] / result['ddp']:>7.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
