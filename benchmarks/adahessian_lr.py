"""AdaHessian's learning rate on digits, and that a seed repeats bit for bit.

Runs ``accord train --task digits --workers 2 --steps 60 --optimizer adahessian`` for a grid
of learning rates, algorithms and seeds, each configuration twice, and prints the final
test accuracy per learning rate (mean +- sample std over the seeds) and whether both runs
of every configuration gave the same numbers to the last digit (workers seed every
generator from (seed, rank), so AdaHessian's Hutchinson probes repeat).

    python benchmarks/adahessian_lr.py [--algos easgd,local_sgd] [--lrs 0.003,0.01,...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(out: Path, algo: str, lr: float, seed: int, steps: int) -> dict:
    cmd = [sys.executable, "-m", "accord", "train", "--algo", algo, "--task", "digits",
           "--workers", "2", "--steps", str(steps), "--seed", str(seed), "--optimizer",
           "adahessian", "--lr", str(lr), "--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    summary = json.loads(lines[-1])
    if done.returncode not in (0, 3):
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1]}")
    steps_seen = [json.loads(x) for x in lines if '"type": "step"' in x]
    return {"status": summary["status"], "eval_acc": summary.get("eval_acc"),
            "curve": [(r["step"], r["loss"], r["eval_loss"]) for r in steps_seen]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algos", default="easgd,local_sgd")
    ap.add_argument("--lrs", default="0.003,0.01,0.03,0.1,0.3")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    algos = args.algos.split(",")
    lrs = [float(x) for x in args.lrs.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    repeatable = True
    table: dict[tuple[str, float], list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for algo in algos:
            for lr in lrs:
                for seed in seeds:
                    a = run(Path(tmp) / f"{algo}-{lr}-{seed}-a", algo, lr, seed, args.steps)
                    b = run(Path(tmp) / f"{algo}-{lr}-{seed}-b", algo, lr, seed, args.steps)
                    repeatable &= a == b
                    table.setdefault((algo, lr), []).append(a)
                    print(f"{algo} lr {lr:g} seed {seed}: {a['status']} eval_acc "
                          f"{a['eval_acc']} (repeat {'equal' if a == b else 'DIFFERS'})",
                          file=sys.stderr)
    print(f"| lr | {' | '.join(algos)} |")
    print("|---|" + "---:|" * len(algos))
    for lr in lrs:
        cells = []
        for algo in algos:
            runs = table[algo, lr]
            accs = [r["eval_acc"] for r in runs if r["status"] == "ok"]
            bad = len(runs) - len(accs)
            cell = (f"{statistics.mean(accs):.3f} +- {statistics.stdev(accs):.3f}"
                    if len(accs) > 1 else (f"{accs[0]:.3f}" if accs else "-"))
            cells.append(cell + (f" ({bad} diverged)" if bad else ""))
        print(f"| {lr:g} | {' | '.join(cells)} |")
    print(f"every configuration repeated bit for bit: {repeatable}")


if __name__ == "__main__":
    main()
