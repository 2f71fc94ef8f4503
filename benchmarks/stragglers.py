"""Decentralized and wait-avoiding algorithms under stragglers and frozen workers.

    .venv/bin/python benchmarks/stragglers.py [--out runs/bench]
        [--only stragglers|scaling|failures]

Runs three presets of ``accord bench`` (finished runs are reused, so the script resumes
after an interruption) and prints three tables:

1. ``stragglers``: allreduce, wagma (wait-avoiding and synchronous), gossip,
   elastic_gossip, dpsgd, local_sgd (period 4) and asynchronous easgd (period 4) on
   digits with 8 workers, 200 steps, SGD lr 0.05, batch 16 per worker. Every worker's
   step compute is emulated by a 40 ms sleep (8 processes share 2 cores; a sleep lets
   them "compute" side by side like 8 machines) and a straggler sleeps 120 ms more, i.e.
   takes 4x as long: *transient* = one rank drawn per step from a seeded generator,
   *persistent* = rank 3 throughout, *pair* = ranks 2 and 3 (one WAGMA group in phase 0)
   throughout, with allreduce and wagma only (wait-avoiding, synchronous, and
   wait-avoiding with period 1000, i.e. no global average in the run). For each: steps
   per second of the mean worker (each worker's steps over its own wall time) relative to
   allreduce under the same pattern, the same for the slowest worker, for the fast and
   the slow ranks separately, the consensus model's final test accuracy, and payload
   bytes sent per worker per step.
2. ``scaling``: bytes per worker per step at 2, 4 and 8 workers (24-step runs).
3. ``failures``: easgd with uniform and with dynamic weighting, 8 workers, ranks 2 and 5
   frozen for the middle third of 300 steps, 3 seeds, under SGD, Nesterov momentum 0.9
   and Adam; final centre test accuracy and the gap between the two, per seed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from accord import bench  # noqa: E402
from accord.run.metrics import read_metrics  # noqa: E402


def _summaries(preset: str, out: Path) -> dict[tuple[int, str], list[dict]]:
    configs = bench.plan(bench.preset(preset), out)
    bench.run_bench(configs, out)
    groups: dict[tuple[int, str], list[dict]] = {}
    for cfg in configs:
        if bench.finished(cfg):
            summary = read_metrics(Path(cfg.out) / "metrics.jsonl")[-1]
            groups.setdefault((cfg.workers, cfg.label), []).append(summary)
    return groups


def _worker_rates(summary: dict) -> list[float]:
    times = summary.get("worker_time_s") or [summary["time_s"]]
    return [summary["steps"] / t for t in times]


def _relative(rates: list[float], base: list[float], ranks) -> float:
    """Mean rate of ``ranks`` relative to their mean rate in ``base``."""
    return statistics.mean(rates[r] for r in ranks) / statistics.mean(base[r] for r in ranks)


def stragglers(out: Path) -> None:
    groups = _summaries("stragglers", out)
    print("\n== stragglers: digits, 8 workers, 200 steps, compute emulated as 40 ms/step, "
          "4x slow ranks ==")
    for pattern in bench.PATTERNS:
        base = groups.get((8, f"{pattern}-allreduce"))
        if not base:
            print(f"{pattern}: allreduce run missing")
            continue
        slow = bench.SLOW_RANKS[pattern]
        base_rates = _worker_rates(base[0])
        base_mean = statistics.mean(base_rates)
        base_min = min(base_rates)
        what = {"transient": "one random rank per step", "persistent": "rank 3 throughout",
                "pair": "ranks 2 and 3 (one WAGMA group) throughout"}[pattern]
        print(f"\n{pattern}: 4x slow {what} (allreduce: {base_mean:.2f} steps/s)")
        split = f"{'fast ranks':>11} {'slow ranks':>11}" if slow else ""
        print(f"{'algorithm':<16} {'steps/s mean worker':>20} {'slowest worker':>15} "
              f"{split} {'test acc':>9} {'KB/worker/step':>15}")
        arms = bench._pair_arms() if pattern == "pair" else bench._decentralized_arms()
        for label, _, _, _ in arms:
            runs = groups.get((8, f"{pattern}-{label}"))
            if not runs:
                print(f"{label:<16} (missing)")
                continue
            s = runs[0]
            rates = _worker_rates(s)
            cells = ""
            if slow:  # each group's mean rate relative to the same group under allreduce
                fast = [r for r in range(len(rates)) if r not in slow]
                cells = (f"{_relative(rates, base_rates, fast):>10.2f}x "
                         f"{_relative(rates, base_rates, slow):>10.2f}x")
            print(f"{label:<16} {statistics.mean(rates) / base_mean:>19.2f}x "
                  f"{min(rates) / base_min:>14.2f}x {cells} {s['eval_acc']:>9.4f} "
                  f"{s['comm_bytes_mean'] / s['steps'] / 1e3:>15.1f}")
    print("steps/s: each worker's steps over its own wall time, relative to allreduce under "
          "the same pattern (fast / slow ranks: the mean over that group of ranks)")


def scaling(out: Path) -> None:
    groups = _summaries("scaling", out)
    print("\n== bytes sent per worker per step (KB), digits MLP (9,610 parameters, 38 KB) ==")
    print(f"{'algorithm':<16} {'2 workers':>10} {'4 workers':>10} {'8 workers':>10}")
    for label, _, _, _ in bench._decentralized_arms():
        cells = []
        for n in (2, 4, 8):
            runs = groups.get((n, label))
            cells.append(f"{runs[0]['comm_bytes_mean'] / runs[0]['steps'] / 1e3:>10.1f}"
                         if runs else f"{'-':>10}")
        print(f"{label:<16} {''.join(cells)}")
    print("payload bytes (what each worker hands to its collectives and sends); on the wire a "
          "ring allreduce of N moves 2(N-1)/N x its payload (1x at 2, 1.5x at 4, 1.75x at "
          "8), point-to-point messages 1x")


def failures(out: Path) -> None:
    groups = _summaries("failures", out)
    print("\n== easgd, 8 workers, ranks 2 and 5 frozen for steps 100-199 of 300 ==")
    names = {"": "SGD lr 0.05", "-nesterov": "Nesterov 0.9, lr 0.05", "-adam": "Adam lr 3e-3"}
    for suffix in bench.FAILURE_OPTIMIZERS:
        print(f"\n{names[suffix]}")
        accs = {}
        for weighting in ("uniform", "dynamic"):
            label = f"easgd-{weighting}{suffix}"
            runs = groups.get((8, label), [])  # in seed order
            accs[weighting] = [r["eval_acc"] for r in runs]
            if accs[weighting]:
                values = accs[weighting]
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                print(f"{label:<24} centre test acc {statistics.mean(values):.4f} "
                      f"+- {std:.4f} over {len(values)} seeds: "
                      + ", ".join(f"{a:.4f}" for a in values))
        if accs.get("uniform") and accs.get("dynamic"):
            gaps = [d - u for u, d in zip(accs["uniform"], accs["dynamic"], strict=False)]
            print(f"gap dynamic - uniform: {statistics.mean(gaps):+.4f} (per seed: "
                  + ", ".join(f"{g:+.4f}" for g in gaps) + ")")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--only", choices=("stragglers", "scaling", "failures"), default=None)
    args = ap.parse_args()
    out = Path(args.out)
    for name, fn in (("stragglers", stragglers), ("scaling", scaling),
                     ("failures", failures)):
        if args.only in (None, name):
            fn(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
