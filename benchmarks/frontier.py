"""The frontier preset's table: time to target and bytes over the slow link, per link.

    accord bench --preset frontier --out runs/frontier      # then:
    .venv/bin/python benchmarks/frontier.py runs/frontier [--seed 0]

Reads each run's metrics.jsonl under ``OUT/frontier-<link>/shakespeare/w4/<arm>/seed<S>``
and prints, per link, a Markdown table sorted by time to target: final eval_loss, wall
time, the time to reach 1.05 x allreduce's final eval_loss (the report's default target)
and its ratio to allreduce's, the time to loss 2.30 (reached by the DiLoCo family), and
the bytes rank 0 sent over the slow link (everything but the ``island_*`` kinds, which
stay inside a host).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LINKS = ("100mbit", "10mbit")
LOOSE = 2.30


def _load(path: Path) -> tuple[list[dict], dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    steps = [r for r in records if r.get("type") == "step" and r.get("eval_loss") is not None]
    return steps, records[-1]


def _time_to(steps: list[dict], target: float) -> float | None:
    return next((r["time_s"] for r in steps if r["eval_loss"] <= target), None)


def _slow_link_mb(summary: dict) -> float:
    return sum(v["bytes"] for k, v in summary["comm"].items()
               if not k.startswith("island_")) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for link in LINKS:
        base = Path(args.out) / f"frontier-{link}" / "shakespeare" / "w4"
        runs = {d.name: _load(d / f"seed{args.seed}" / "metrics.jsonl")
                for d in sorted(base.iterdir())
                if (d / f"seed{args.seed}" / "metrics.jsonl").exists()}
        if "allreduce" not in runs:
            print(f"{link}: no allreduce run under {base}")
            continue
        target = 1.05 * runs["allreduce"][1]["eval_loss"]
        base_t = _time_to(runs["allreduce"][0], target)
        print(f"\n{link} (seed {args.seed}): target eval_loss {target:.3f} "
              "(1.05 x allreduce's final)")
        print(f"| arm | final eval_loss | wall s | to target s | vs allreduce | "
              f"to loss {LOOSE:.2f} s | MB over the slow link (rank 0) |")
        print("|---|---:|---:|---:|---:|---:|---:|")

        def order(item, target=target):
            steps = item[1][0]
            return (_time_to(steps, target) or 1e9, _time_to(steps, LOOSE) or 1e9)

        for name, (steps, summary) in sorted(runs.items(), key=order):
            t, loose = _time_to(steps, target), _time_to(steps, LOOSE)
            print(f"| {name} | {summary['eval_loss']:.3f} | {summary['time_s']:.0f} | "
                  f"{f'{t:.0f}' if t else 'not reached'} | "
                  f"{f'{base_t / t:.2f}x' if t and base_t else '-'} | "
                  f"{f'{loose:.0f}' if loose else 'not reached'} | "
                  f"{_slow_link_mb(summary):.1f} |")


if __name__ == "__main__":
    main()
