"""The AdaCons reference toy (linear regression, yoniLc/AdaCons README) on real gloo workers.

Final loss of allreduce, normalized and ACGA (beta 0, 0.99, and 0.99 with the reference
script's un-sort order) at global batch 128 and 2048, with the oracle step size, 2
accumulation micro-steps per update and 1000 micro-steps, as the reference does.

    .venv/bin/python benchmarks/adacons_toy.py [--workers 8] [--micro-steps 1000] [--seeds 0]

Prints two losses per arm: ``train`` is the mean over workers of the last step's training
loss (the reference prints rank 0's last micro-batch loss), ``eval`` is the loss on a fixed
4096-sample batch. The reference README reports, at batch 128, averaging near 33 and AdaCons
at 1.3e-5 with 8 workers; at batch 2048 averaging 49 and AdaCons at 8 workers 52.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from _runs import TrainConfig, run

# exact coefficients (two allreduces and the coefficient all-gather), as the AdaCons script
# computes them: the toy compares accord with that script, and coefficients=auto would
# take the all-gather route here, the same coefficients summed in another order
EXACT = {"coefficients": "exact"}
ARMS = [
    ("allreduce", "allreduce", {}),
    ("normalized", "normalized", {}),
    ("acga beta=0", "acga", {"momentum": 0.0, **EXACT}),
    ("acga beta=0.99", "acga", {"momentum": 0.99, **EXACT}),
    ("acga beta=0.99 ref-order", "acga", {"momentum": 0.99, "reference_order": True, **EXACT}),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--micro-steps", type=int, default=1000)
    ap.add_argument("--batches", default="128,2048", help="global batch sizes")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds")
    ap.add_argument("--out", default="runs/bench-adacons-toy")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for batch in batches:
        if batch % args.workers:
            print(f"global batch {batch} is not divisible by {args.workers} workers")
            return 2
        for label, algo, hp in ARMS:
            train_losses, eval_losses = [], []
            for seed in seeds:
                out = Path(args.out) / f"b{batch}" / label.replace(" ", "_") / f"seed{seed}"
                cfg = TrainConfig(algo=algo, task="linreg", workers=args.workers,
                                  steps=args.micro_steps // 2, accum_steps=2, seed=seed,
                                  batch_size=batch // args.workers, oracle_lr=True,
                                  log_every=50, out=str(out), progress=False,
                                  hyperparameters=dict(hp), timeout=120)
                records = run(cfg, f"{label} batch {batch} seed {seed}")
                if records is None:
                    continue
                last_step = [r for r in records if r["type"] == "step"][-1]
                train_losses.append(last_step["loss"])
                eval_losses.append(records[-1]["eval_loss"])
            if eval_losses:
                rows.append((batch, label, train_losses, eval_losses))
    print()
    print(f"AdaCons toy: {args.workers} workers, {args.micro_steps} micro-steps "
          f"(2 per update), oracle step size, seeds {seeds}")
    print("losses: median [min, max] over seeds" if len(seeds) > 1 else "")
    print(f"{'global batch':>12}  {'arm':<26} {'train loss':>22} {'eval loss':>22}")
    for batch, label, tr, ev in rows:
        print(f"{batch:>12}  {label:<26} {_fmt(tr):>22} {_fmt(ev):>22}")
    return 0


def _fmt(values: list[float]) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.3g}"
    return f"{med:.2g} [{min(values):.2g}, {max(values):.2g}]"


if __name__ == "__main__":
    raise SystemExit(main())
