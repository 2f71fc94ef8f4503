"""The elastic family against its period: final consensus test accuracy and bytes sent.

    .venv/bin/python benchmarks/elastic.py [--workers 8] [--steps 400] [--seeds 0,1,2]
                                           [--periods 1,4,16]

Runs allreduce, local_sgd, easgd, EAMSGD (easgd with local Nesterov momentum), lsgd and
grawa on `digits` with 8 workers, plain SGD (lr 0.05, per-worker batch 16) except EAMSGD
(Nesterov momentum 0.9), for each communication period and seed, then prints the
consensus model's test accuracy (EASGD: its centre) as mean +- std over seeds and the
megabytes each worker sent (mean over workers). Finished runs are reused when the
script is run again with the same --out.
"""

from __future__ import annotations

import argparse
import statistics

from _runs import TrainConfig, run

ARMS = [  # label, algorithm, hyperparameters given the period, optimizer settings
    ("allreduce", "allreduce", lambda p: {}, {}),
    ("local_sgd", "local_sgd", lambda p: {"period": p}, {}),
    ("easgd", "easgd", lambda p: {"period": p, "beta": 0.9}, {}),
    ("eamsgd", "easgd", lambda p: {"period": p, "beta": 0.9},
     {"optimizer": "nesterov", "momentum": 0.9}),
    ("lsgd", "lsgd", lambda p: {"period": p}, {}),
    ("grawa", "grawa", lambda p: {"period": p}, {}),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--periods", default="1,4,16")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--out", default="runs/bench-elastic")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    periods = [int(p) for p in args.periods.split(",")]
    rows = []
    for label, algo, hp_of, opt in ARMS:
        for period in periods if algo != "allreduce" else [1]:
            accs, mbytes = [], []
            for seed in seeds:
                cfg = TrainConfig(algo=algo, task="digits", workers=args.workers,
                                  steps=args.steps, seed=seed, lr=args.lr, batch_size=16,
                                  log_every=max(1, args.steps // 10), progress=False,
                                  out=f"{args.out}/{label}/p{period}/seed{seed}",
                                  hyperparameters=hp_of(period), timeout=120, **opt)
                records = run(cfg, f"{label} period {period} seed {seed}")
                if records is None:
                    continue
                accs.append(records[-1]["eval_acc"])
                mbytes.append(records[-1]["comm_bytes_mean"] / 1e6)
            if accs:
                rows.append((label, period, accs, mbytes))
    print()
    print(f"digits, {args.workers} workers, {args.steps} steps, SGD lr {args.lr}, batch 16 per "
          f"worker, seeds {seeds}; consensus-model test accuracy (easgd: centre)")
    print(f"{'algorithm':<10} {'period':>6} {'test acc mean +- std':>22} {'MB sent/worker':>15}")
    for label, period, accs, mbytes in rows:
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"{label:<10} {period if label != 'allreduce' else '-':>6} "
              f"{statistics.mean(accs):>14.4f} +- {std:.4f} {statistics.mean(mbytes):>15.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
