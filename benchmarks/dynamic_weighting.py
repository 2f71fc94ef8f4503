"""Dynamic vs uniform weighting of asynchronous EASGD under frozen and slow workers.

    .venv/bin/python benchmarks/dynamic_weighting.py [--out runs/bench]

Runs the ``dynamic-weighting`` preset of ``accord bench`` (72 runs: digits, asynchronous
easgd, SGD lr 0.05 and AdaHessian lr 0.01, 4 and 8 workers, periods 1, 4 and 16, uniform
and dynamic weighting, seeds 0, 1, 2; one worker 3x slow, one or two frozen for the middle
third of 240 steps; see the README), then prints per cell the test accuracy of the centre
as mean +- std over seeds for each weighting, the difference dynamic minus uniform, and
whether it is separable: the two seed ranges [min, max] do not overlap (the rule of
``accord report``), else "not separable at this scale". Also the same for the wall time.
Finished runs are reused, so the script resumes after an interruption; ``accord report
OUT/dynamic-weighting`` draws the curves.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from accord import bench  # noqa: E402
from accord.run.metrics import read_metrics  # noqa: E402


def _stats(values: list[float]) -> str:
    if not values:
        return f"{'-':>15}"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} +- {std:.4f}"


def separable(a: list[float], b: list[float]) -> bool:
    """Both have >= 2 seeds and their ranges [min, max] do not overlap."""
    return len(a) >= 2 and len(b) >= 2 and (max(a) < min(b) or max(b) < min(a))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--no-run", action="store_true", help="only print the finished runs")
    args = ap.parse_args()
    out = Path(args.out)
    specs = bench.preset("dynamic-weighting")
    configs = bench.plan(specs, out)
    if not args.no_run:
        bench.run_bench(configs, out)
    cells: dict[tuple, dict[str, list[dict]]] = {}
    missing: dict[tuple, list[str]] = {}
    for cfg in configs:
        opt, period, weighting = cfg.label.split("-")
        cell = cells.setdefault((cfg.workers, opt, period), {})
        if not bench.finished(cfg):
            prev = bench.previous(cfg)
            missing.setdefault((cfg.workers, opt, period), []).append(
                f"{weighting} seed {cfg.seed} {prev.state}")
            continue
        summary = read_metrics(Path(cfg.out) / "metrics.jsonl")[-1]
        cell.setdefault(weighting, []).append(summary)
    print()
    print("digits, asynchronous easgd, 240 steps; test accuracy of the centre and wall time, "
          "mean +- std over seeds")
    print(f"{'N':>2} {'optimizer':<10} {'period':>6} {'uniform acc':>16} {'dynamic acc':>16} "
          f"{'dyn-uni':>8} {'separable':>10} {'uniform s':>8} {'dynamic s':>9}")
    for (n, opt, period), by in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                       int(kv[0][2][1:]))):
        uni = [r["eval_acc"] for r in by.get("uniform", [])]
        dyn = [r["eval_acc"] for r in by.get("dynamic", [])]
        diff = statistics.mean(dyn) - statistics.mean(uni) if uni and dyn else None
        verdict = "yes" if separable(uni, dyn) else "no"
        t_uni = [r["time_s"] for r in by.get("uniform", [])]
        t_dyn = [r["time_s"] for r in by.get("dynamic", [])]
        print(f"{n:>2} {opt:<10} {period[1:]:>6} {_stats(uni):>16} {_stats(dyn):>16} "
              f"{'-' if diff is None else format(diff, '+.4f'):>8} {verdict:>10} "
              f"{statistics.mean(t_uni) if t_uni else float('nan'):>8.1f} "
              f"{statistics.mean(t_dyn) if t_dyn else float('nan'):>9.1f}"
              + (f"  ({'; '.join(missing[n, opt, period])}: not averaged)"
                 if (n, opt, period) in missing else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
