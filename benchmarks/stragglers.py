"""Decentralized and wait-avoiding algorithms under stragglers and frozen workers.

    .venv/bin/python benchmarks/stragglers.py [--out runs/bench] [--skip-failures]

Runs three presets of ``accord bench`` (finished runs are reused, so the script resumes
after an interruption) and prints three tables:

1. ``stragglers``: allreduce, wagma (wait-avoiding and synchronous), gossip,
   elastic_gossip, dpsgd, local_sgd (period 4) and asynchronous easgd (period 4) on
   digits with 8 workers, 200 steps, SGD lr 0.05, batch 16 per worker. Every worker's
   step compute is emulated by a 40 ms sleep (8 processes share 2 cores; a sleep lets
   them "compute" side by side like 8 machines) and a straggler sleeps 120 ms more, i.e.
   takes 4x as long: *transient* = one rank drawn per step from a seeded generator,
   *persistent* = rank 3 throughout. For each: steps per second of the mean worker
   (each worker's steps over its own wall time) relative to allreduce under the same
   pattern, the same for the slowest worker, the consensus model's final test accuracy,
   and payload bytes sent per worker per step.
2. ``scaling``: bytes per worker per step at 2, 4 and 8 workers (24-step runs).
3. ``failures``: easgd with uniform and with dynamic weighting, 8 workers, ranks 2 and 5
   frozen for the middle third of 300 steps, 3 seeds; final centre test accuracy and the
   gap between the two.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from accord import bench  # noqa: E402
from accord.metrics import read_metrics  # noqa: E402


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


def stragglers(out: Path) -> None:
    groups = _summaries("stragglers", out)
    print("\n== stragglers: digits, 8 workers, 200 steps, compute emulated as 40 ms/step, "
          "one 4x straggler ==")
    for pattern in bench.PATTERNS:
        base = groups.get((8, f"{pattern}-allreduce"))
        if not base:
            print(f"{pattern}: allreduce run missing")
            continue
        base_mean = statistics.mean(_worker_rates(base[0]))
        base_min = min(_worker_rates(base[0]))
        print(f"\n{pattern} straggler (allreduce: {base_mean:.2f} steps/s)")
        print(f"{'algorithm':<16} {'steps/s mean worker':>20} {'slowest worker':>15} "
              f"{'test acc':>9} {'KB/worker/step':>15}")
        for label, _, _, _ in bench._decentralized_arms():
            runs = groups.get((8, f"{pattern}-{label}"))
            if not runs:
                print(f"{label:<16} (missing)")
                continue
            s = runs[0]
            rates = _worker_rates(s)
            print(f"{label:<16} {statistics.mean(rates) / base_mean:>19.2f}x "
                  f"{min(rates) / base_min:>14.2f}x {s['eval_acc']:>9.4f} "
                  f"{s['comm_bytes_mean'] / s['steps'] / 1e3:>15.1f}")


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
    accs = {}
    for label in ("easgd-uniform", "easgd-dynamic"):
        runs = groups.get((8, label), [])
        accs[label] = [r["eval_acc"] for r in runs]
        if accs[label]:
            std = statistics.stdev(accs[label]) if len(accs[label]) > 1 else 0.0
            print(f"{label:<16} centre test acc {statistics.mean(accs[label]):.4f} "
                  f"+- {std:.4f} over {len(runs)} seeds: "
                  + ", ".join(f"{a:.4f}" for a in accs[label]))
    if accs.get("easgd-uniform") and accs.get("easgd-dynamic"):
        gaps = [d - u for u, d in zip(accs["easgd-uniform"], accs["easgd-dynamic"],
                                      strict=False)]
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
