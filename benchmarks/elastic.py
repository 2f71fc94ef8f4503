"""The elastic family against its period: final consensus test accuracy and bytes sent.

    .venv/bin/python benchmarks/elastic.py [--out runs/bench]

Runs the ``elastic`` preset of ``accord bench`` (allreduce, local_sgd, easgd, EAMSGD =
easgd with local Nesterov momentum 0.9, lsgd and grawa on `digits` with 8 workers, SGD lr
0.05, per-worker batch 16, 400 steps, periods 1, 4 and 16, seeds 0, 1, 2), then prints the
consensus model's test accuracy (EASGD: its centre) as mean +- std over seeds and the
megabytes each worker sent (mean over workers). Finished runs are reused, so the script
resumes after an interruption; `accord report OUT/elastic` draws the curves.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from accord import bench  # noqa: E402
from accord.run.metrics import read_metrics  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench")
    args = ap.parse_args()
    out = Path(args.out)
    configs = bench.plan(bench.preset("elastic"), out)
    bench.run_bench(configs, out)
    groups: dict[str, list[dict]] = {}
    for cfg in configs:
        if bench.finished(cfg):
            groups.setdefault(cfg.label, []).append(
                read_metrics(Path(cfg.out) / "metrics.jsonl")[-1])
    print()
    print("digits, 8 workers, 400 steps, SGD lr 0.05, batch 16 per worker; consensus-model "
          "test accuracy (easgd: centre), mean +- std over seeds")
    print(f"{'algorithm':<10} {'period':>6} {'seeds':>5} {'test acc':>18} {'MB sent/worker':>15}")
    for label, runs in groups.items():
        name, _, period = label.partition("-p")
        accs = [r["eval_acc"] for r in runs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        mb = statistics.mean(r["comm_bytes_mean"] for r in runs) / 1e6
        print(f"{name:<10} {period or '-':>6} {len(runs):>5} "
              f"{statistics.mean(accs):>10.4f} +- {std:.4f} {mb:>15.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
