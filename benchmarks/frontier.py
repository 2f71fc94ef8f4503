"""The frontier preset's table: time to target and bytes over the slow link, per link.

    accord bench --preset frontier --out runs/frontier                      # emulated links
    sudo accord bench --preset frontier --set links=real --seeds 0 --out runs/frontier-real
    .venv/bin/python benchmarks/frontier.py runs/frontier [--real runs/frontier-real]

Reads each run's metrics.jsonl under ``OUT/frontier-<link>/shakespeare/w4/<arm>/seed<S>``
and prints, per link, a Markdown table sorted by time to target, over the seeds found
(mean, and the spread as the sample standard deviation where there are several): final
eval_loss; the time to reach the target, 1.05 x allreduce's final eval_loss of the same
seed (the report's default target), over the seeds that reached it, and its ratio to
allreduce's; the time to loss 2.30 (reached by the DiLoCo family); the bytes rank 0 sent
over the slow link (everything but the ``island_*`` kinds, which stay inside a host).

``--real DIR``: the same arms run with ``links=real`` (the testbed's hosts and shaped
links): their wall time and time to target beside the emulated ones, and the ratio of the
real wall time to the emulated one, on the seeds both have. The computation is the same
(the links change only when data arrives), so the losses agree and only times differ.
"""

from __future__ import annotations

import argparse
import json
import statistics
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


def _runs(out: Path, link: str) -> dict[str, dict[int, tuple[list[dict], dict]]]:
    """arm -> seed -> (step records with an eval, summary), the finished runs only."""
    base = out / f"frontier-{link}" / "shakespeare" / "w4"
    found: dict[str, dict[int, tuple[list[dict], dict]]] = {}
    if not base.is_dir():
        return found
    for arm in sorted(base.iterdir()):
        for seed_dir in sorted(arm.glob("seed*")):
            path = seed_dir / "metrics.jsonl"
            if path.exists():
                steps, summary = _load(path)
                if summary.get("type") == "summary" and summary.get("status") == "ok":
                    found.setdefault(arm.name, {})[int(seed_dir.name[4:])] = (steps, summary)
    return found


def _stat(values: list[float], spec: str = ".0f") -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return format(mean, spec)
    return f"{format(mean, spec)} ± {format(statistics.stdev(values), spec)}"


def _reached(times: list[float | None], spec: str = ".0f") -> str:
    got = [t for t in times if t is not None]
    if not got:
        return "not reached"
    cell = _stat(got, spec)
    return cell if len(got) == len(times) else f"{cell} ({len(got)}/{len(times)})"


def _order(runs: dict, arm: str, seeds: list[int], targets: dict[int, float]) -> tuple:
    """Sort key and cells of an arm: the arms every seed of which reached the target first,
    by their mean time to it."""
    by_seed = runs[arm]
    have = [s for s in seeds if s in by_seed]
    to_target = [_time_to(by_seed[s][0], targets[s]) for s in have]
    got = [t for t in to_target if t is not None]
    mean = statistics.fmean(got) if got else None
    return (len(got) < len(have), mean or 1e9, arm, have, to_target, mean)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--real", help="the same preset run with --set links=real")
    ap.add_argument("--seeds", help="comma-separated seeds (default: every seed found)")
    args = ap.parse_args()
    wanted = None if args.seeds is None else {int(s) for s in args.seeds.split(",")}
    for link in LINKS:
        runs = _runs(Path(args.out), link)
        real = _runs(Path(args.real), link) if args.real else {}
        if "allreduce" not in runs:
            print(f"{link}: no finished allreduce run under {args.out}")
            continue
        seeds = sorted(s for s in runs["allreduce"] if wanted is None or s in wanted)
        targets = {s: 1.05 * runs["allreduce"][s][1]["eval_loss"] for s in seeds}
        base = [_time_to(runs["allreduce"][s][0], targets[s]) for s in seeds]
        base_mean = statistics.fmean([t for t in base if t is not None])
        print(f"\n{link}, seeds {','.join(map(str, seeds))}: target eval_loss "
              f"{_stat(list(targets.values()), '.3f')} (1.05 x allreduce's final, per seed)")
        head = ("| arm | final eval_loss | wall s | to target s | vs allreduce | "
                f"to loss {LOOSE:.2f} s | MB over the slow link (rank 0) |")
        rule = "|---|---:|---:|---:|---:|---:|---:|"
        if real:
            head += " real wall s | real to target s | real / emulated wall |"
            rule += "---:|---:|---:|"
        print(head)
        print(rule)

        for _, _, arm, have, to_target, mean in sorted(_order(runs, a, seeds, targets)
                                                       for a in runs):
            by_seed = runs[arm]
            cells = [arm, _stat([by_seed[s][1]["eval_loss"] for s in have], ".3f"),
                     _stat([by_seed[s][1]["time_s"] for s in have]), _reached(to_target),
                     f"{base_mean / mean:.2f}x" if mean else "-",
                     _reached([_time_to(by_seed[s][0], LOOSE) for s in have]),
                     _stat([_slow_link_mb(by_seed[s][1]) for s in have], ".1f")]
            if real:
                both = [s for s in have if s in real.get(arm, {})]
                walls = [real[arm][s][1]["time_s"] for s in both]
                cells += [_stat(walls),
                          _reached([_time_to(real[arm][s][0], targets[s]) for s in both])
                          if both else "-",
                          _stat([w / by_seed[s][1]["time_s"]
                                 for s, w in zip(both, walls, strict=True)], ".2f")]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
