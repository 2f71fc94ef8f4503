"""Step time of accord's gradient algorithms relative to torch DDP, side by side in one run.

    .venv/bin/python benchmarks/overhead.py [--models mlp,cnn] [--workers 2,4]
                                            [--rounds 7] [--steps 10] [--arms A,B,...]

Models: ``mlp``, a 10M-parameter MLP (1024-2304-2304-1024-10, batch 64 per worker) and
``cnn``, a 34k-parameter CNN with BatchNorm (28x28 inputs, batch 32 per worker), random
data, plain SGD, gloo, one thread per process. In every round each arm runs ``--steps``
steps in turn (interleaved, so a slow phase of the machine hits every arm alike):

* ``compute``: the same loop with no communication;
* ``ddp``: torch ``DistributedDataParallel`` (its own bucketed allreduce);
* ``hook-<algo>``: DDP with ``accord.ddp_hook(<algo>)`` for allreduce, normalized, acga
  (the default, ``coefficients=auto``), acga-exact, acga-gather, acga-sketch (those
  ``coefficients``, default ``sketch_size``) and adasum;
* ``<algo>``: accord's native path (``accord.wrap``) for the same algorithms.

Printed per model and world size: the median step time of each arm over the rounds, its
ratio to DDP and to accord's ``allreduce`` arm (``hook-*`` arms: to ``hook-allreduce``),
and the payload bytes per step of each accord arm relative to ``allreduce``. At the end,
the side-by-side table of every arm's step time over ``allreduce``'s (``hook-*`` over
DDP's) for every model and world size.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

GRADIENT_ALGOS = ("allreduce", "normalized", "acga", "acga-exact", "acga-gather",
                  "acga-sketch", "adasum")
ARMS = ("compute", "ddp", *(f"hook-{a}" for a in GRADIENT_ALGOS), *GRADIENT_ALGOS)
# arm name -> (algorithm, hyperparameters)
SPECS = {a: (a, {}) for a in GRADIENT_ALGOS}
for _mode in ("exact", "gather", "sketch"):
    SPECS[f"acga-{_mode}"] = ("acga", {"coefficients": _mode})
MLP = (1024, 2304, 2304, 1024, 10)


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        layers: list[torch.nn.Module] = []
        for a, b in zip(MLP[:-1], MLP[1:], strict=True):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        return torch.nn.Sequential(*layers[:-1])
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 96, 3, padding=1), nn.BatchNorm2d(96), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, 10))


def _data(name: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(rank)
    x = (torch.randn(64, MLP[0], generator=gen) if name == "mlp"
         else torch.randn(32, 1, 28, 28, generator=gen))
    return x, torch.randint(10, (x.shape[0],), generator=gen)


def _arm(model_name: str, arm: str):
    import accord

    model = _model(model_name)
    inner = torch.optim.SGD(model.parameters(), lr=1e-3)
    if arm == "compute":
        return model, inner, lambda loss: inner.step(), None
    if arm == "ddp" or arm.startswith("hook-"):
        net = torch.nn.parallel.DistributedDataParallel(model)
        agg = None
        if arm.startswith("hook-"):
            algo, hp = SPECS[arm[5:]]
            agg, hook = accord.ddp_hook(algo, net, **hp)
            net.register_comm_hook(agg, hook)
        return net, inner, lambda loss: inner.step(), agg
    algo, hp = SPECS[arm]
    opt = accord.wrap(inner, algo, broadcast=False, **hp)
    return model, opt, lambda loss: opt.step(loss=loss), opt.aggregator


def _worker(rank: int, world: int, port: int, model_name: str, arm_names: list[str],
            rounds: int, steps: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    x, y = _data(model_name, rank)
    arms = {name: _arm(model_name, name) for name in arm_names}
    times: dict[str, list[float]] = {name: [] for name in arm_names}
    for r in range(rounds + 1):  # round 0 warms up every arm
        for name, (net, opt, step, agg) in arms.items():
            if agg is not None and r == 1:
                agg.comm.stats.reset()  # bytes of the measured rounds only
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
        queue.put({name: (statistics.median(t),
                          arms[name][3].comm.stats.bytes / (rounds * steps)
                          if arms[name][3] is not None else None)
                   for name, t in times.items()})
    for name in list(arms):  # DDP models must go before the process group
        del arms[name]
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--workers", default="2,4")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--arms", default=",".join(ARMS))
    args = ap.parse_args()
    arm_names = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arm_names) - set(ARMS))
    if unknown or "ddp" not in arm_names:
        ap.error(f"--arms: got {args.arms!r}; allowed: ddp plus any of {', '.join(ARMS)}")
    ctx = mp.get_context("spawn")
    ratios: dict[str, dict[str, float]] = {}
    columns: dict[str, None] = {}  # model and world size, in the order run
    for model_name in args.models.split(","):
        params = sum(p.numel() for p in _model(model_name).parameters())
        print(f"\n{model_name}: {params / 1e6:.3f}M parameters, gloo, 1 thread per process; "
              f"median of {args.rounds} interleaved rounds of {args.steps} steps per arm")
        print(f"{'workers':>7} {'arm':<16} {'step ms':>9} {'vs DDP':>8} {'vs allreduce':>13} "
              f"{'bytes/step':>11} {'vs allreduce':>13}")
        for world in (int(w) for w in args.workers.split(",")):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            queue = ctx.Queue()
            procs = [ctx.Process(target=_worker, args=(r, world, port, model_name, arm_names,
                                                       args.rounds, args.steps, queue))
                     for r in range(world)]
            for p in procs:
                p.start()
            result = queue.get(timeout=7200)
            for p in procs:
                p.join()
            base_bytes = (result.get("allreduce") or (None, None))[1]
            for name in arm_names:
                seconds, nbytes = result[name]
                rel = (f"{nbytes / base_bytes:>12.2f}x" if nbytes is not None and base_bytes
                       else f"{'-':>13}")
                shown = f"{nbytes / 1e6:>9.2f}MB" if nbytes is not None else f"{'-':>11}"
                base = result.get("hook-allreduce" if name.startswith("hook-") else "allreduce")
                vs_base = f"{seconds / base[0]:>12.2f}x" if base else f"{'-':>13}"
                print(f"{world:>7} {name:<16} {seconds * 1e3:>9.1f} "
                      f"{seconds / result['ddp'][0]:>7.2f}x {vs_base} {shown} {rel}")
                # side by side: native arms over allreduce's step, hook arms over DDP's
                ref = result["ddp"] if name.startswith("hook-") else result.get("allreduce")
                if ref and name not in ("ddp", "allreduce"):
                    ratios.setdefault(name, {})[f"{model_name} N={world}"] = seconds / ref[0]
                    columns.setdefault(f"{model_name} N={world}", None)
    print("bytes/step: payload bytes per step on rank 0 (accord arms; DDP's own traffic is "
          "not counted)")
    if ratios:
        print("\nstep time / accord allreduce (hook-* arms: / DDP), median of "
              f"{args.rounds} interleaved rounds")
        print(f"{'arm':<16}" + "".join(f"{c:>13}" for c in columns))
        for name, row in ratios.items():
            print(f"{name:<16}" + "".join(
                f"{row[c]:>12.2f}x" if c in row else f"{'-':>13}" for c in columns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
