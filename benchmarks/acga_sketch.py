"""How far ACGA's sketched coefficients are from the exact ones, as a function of k.

    .venv/bin/python benchmarks/acga_sketch.py [--models mlp,cnn,digits] [--workers 4,8]
                                               [--steps 60] [--sizes 1024,4096,...]

N workers are simulated in one process on real data (Fashion-MNIST for ``mlp`` and
``cnn``, sklearn digits for ``digits``; each worker draws its own batches), and the model
is trained with exact ACGA (momentum 0.99, SGD). At every step the same N gradients give
the exact coefficients and, for each sketch size k, the sketched ones (the aggregator's
own ``GramSketch``, with its row signs of that step). Printed per model, N and k: the
relative error ||c_k - c|| / ||c|| of

* ``raw``: one step's normalised coefficients without momentum (the noise of one sketch);
* ``momentum``: the sorted momentum vector (beta 0.99), each k running its own on the exact
  run's gradients;
* ``order``: the fraction of steps where the sketch sorts the workers differently from
  exact. The update hands the k-th momentum value to the worker ranked k-th, so a swap of
  two nearly tied workers moves coefficient mass between them: that happens under exact
  coefficients too whenever two workers' a_i cross, and is why the coefficients after
  momentum are not compared elementwise,

as median, 95th percentile and maximum over the steps, and the sketch's all-gather bytes
relative to one model-size allreduce. At the end, the coefficient-error table of the
default (``coefficients=auto``): the route it takes for each model and N (``gather`` and
``exact`` give the exact coefficients) and, where it sketches, the error at the default
``sketch_size``. Models: ``mlp`` 784-2304-2304-1024-10 (9.5M
parameters, batch 64), ``cnn`` the 34k-parameter CNN of ``benchmarks/overhead.py`` (batch
32), ``digits`` the 9.6k-parameter MLP of the digits task (batch 32).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402

from accord.algorithms.acga import (  # noqa: E402
    SKETCH_SIZE,
    GramSketch,
    auto_route,
    consensus_coefficients,
    normalize_coefficients,
    sketch_coefficients,
    sorted_momentum,
)
from accord.tasks import get_task  # noqa: E402

BETA = 0.99


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    nn = torch.nn
    if name == "mlp":
        dims = (784, 2304, 2304, 1024, 10)
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        return nn.Sequential(*layers[:-1])
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 96, 3, padding=1), nn.BatchNorm2d(96), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, 10))
    return get_task("digits")(0).build_model()


def _coefficients(a: torch.Tensor, norms: torch.Tensor, m: torch.Tensor | None, beta: float):
    m, c = sorted_momentum(a, m, beta)
    c = torch.where(norms > 0, c, torch.zeros_like(c))
    return m, normalize_coefficients(c)[0]


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


def study(model_name: str, workers: int, steps: int, sizes: list[int]) -> dict:
    model = _model(model_name)
    params = [p for p in model.parameters() if p.requires_grad]
    dim = sum(p.numel() for p in params)
    task = get_task("digits" if model_name == "digits" else "fashion")(0)
    batch = 64 if model_name == "mlp" else 32
    streams = [task.train_stream(r, batch) for r in range(workers)]
    opt = torch.optim.SGD(params, lr=0.05)
    sketches = {k: GramSketch([dim], k, seed=0, device="cpu") for k in sizes}
    m_exact = None
    m_sketch: dict[int, torch.Tensor | None] = {k: None for k in sizes}
    raw: dict[int, list[float]] = {k: [] for k in sizes}
    mom: dict[int, list[float]] = {k: [] for k in sizes}
    swaps: dict[int, int] = {k: 0 for k in sizes}
    for step in range(steps):
        grads = []
        for stream in streams:
            model.zero_grad(set_to_none=True)
            x, y = next(stream)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in params]))
        g = torch.stack(grads)  # (N, D)
        norms = g.norm(dim=1)
        a = consensus_coefficients(g @ g.sum(dim=0), norms, workers)
        _, c_raw = _coefficients(a, norms, None, 0.0)
        m_exact, c_used = _coefficients(a, norms, m_exact, BETA)
        for k, sk in sketches.items():
            ys = torch.stack([sk.apply([row], step) for row in g])
            a_k = sketch_coefficients(sk.gram(ys, norms[None]), norms[None])[0]
            raw[k].append(_rel(_coefficients(a_k, norms, None, 0.0)[1], c_raw))
            m_sketch[k], _ = _coefficients(a_k, norms, m_sketch[k], BETA)
            mom[k].append(_rel(m_sketch[k], m_exact))
            swaps[k] += int(not torch.equal(torch.sort(a_k, stable=True).indices,
                                            torch.sort(a, stable=True).indices))
        # the exact ACGA update (the trajectory every k is measured on)
        w = c_used / (norms + 1e-8)
        d = (w[:, None] * g).sum(dim=0)
        d /= d.norm().clamp(min=1.0)
        with torch.no_grad():
            for p, v in zip(params, d.split([p.numel() for p in params]), strict=True):
                p.grad = v.view_as(p).clone()
        opt.step()
    print(f"\n{model_name}: {dim:,} parameters, N = {workers}, {steps} steps, "
          f"batch {batch} per worker")
    print(f"{'k':>8} {'bytes vs D':>10} | {'raw med':>8} {'p95':>8} {'max':>8} | "
          f"{'mom. med':>8} {'p95':>8} {'max':>8} | {'order':>6}")
    p95 = lambda v: v[min(len(v) - 1, int(0.95 * len(v)))]  # noqa: E731
    route = auto_route(workers, [dim], SKETCH_SIZE)
    summary = {"model": model_name, "dim": dim, "workers": workers, "route": route}
    if route == "sketch" and SKETCH_SIZE in sketches:
        summary.update(raw=p95(sorted(raw[SKETCH_SIZE])), mom=p95(sorted(mom[SKETCH_SIZE])),
                       worst=max(raw[SKETCH_SIZE]))
    for k in sizes:
        r, u = sorted(raw[k]), sorted(mom[k])
        width = sketches[k].width
        print(f"{k:>8} {width / dim:>10.4f} | {statistics.median(r):>8.2%} {p95(r):>8.2%} "
              f"{r[-1]:>8.2%} | {statistics.median(u):>8.2%} {p95(u):>8.2%} {u[-1]:>8.2%} | "
              f"{swaps[k] / steps:>6.0%}")
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn,digits")
    ap.add_argument("--workers", default="4,8")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--sizes", default="1024,4096,16384,65536,262144")
    args = ap.parse_args()
    torch.set_num_threads(2)
    sizes = [int(k) for k in args.sizes.split(",")]
    rows = [study(model_name, workers, args.steps, sizes)
            for model_name in args.models.split(",")
            for workers in (int(n) for n in args.workers.split(","))]
    print("\nrelative error ||c_k - c|| / ||c||; k at or above the model size sends the "
          "gradient itself (exact); bytes: the sketch's all-gather payload per worker / D")
    print(f"\nthe default, coefficients=auto (sketch_size {SKETCH_SIZE}): coefficient error "
          f"over {args.steps} steps")
    print(f"{'model':<8} {'params':>11} {'N':>3} {'route':<7} {'raw p95':>8} {'max':>8} "
          f"{'mom. p95':>9}")
    for row in rows:
        if row["route"] == "sketch" and "raw" in row:
            errs = f"{row['raw']:>8.2%} {row['worst']:>8.2%} {row['mom']:>9.2%}"
        elif row["route"] == "sketch":
            errs = f"{'(add k = ' + str(SKETCH_SIZE) + ' to --sizes)':>27}"
        else:  # the exact coefficients, in one all-gather (gather) or from the sum (exact)
            errs = f"{'0 (exact)':>8} {'0':>8} {'0':>9}"
        print(f"{row['model']:<8} {row['dim']:>11,} {row['workers']:>3} {row['route']:<7} "
              f"{errs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
