"""GPU smoke run: every registered algorithm, one process per visible GPU, 30 steps.

    .venv/bin/python benchmarks/gpu_smoke.py [--out runs/gpu_smoke] [--steps 30]

Each algorithm trains the ``fashion`` CNN (or the ``digits`` MLP when the Fashion-MNIST
files are not installed) with ``--device cuda`` and the nccl backend, and the script
prints, per algorithm: whether the run finished, its final training loss, its step time
relative to ``allreduce`` (measured in the same invocation), and, for the gradient-phase
algorithms, whether the replicas agree (consensus distance 0 at the last record). On a
machine without CUDA it says so and exits 0 without running anything.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402

from accord import algorithms  # noqa: E402
from accord.run.config import TrainConfig  # noqa: E402
from accord.run.rundir import clear  # noqa: E402
from accord.tasks import get_task  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import run  # noqa: E402

GRADIENT_PHASE = ("allreduce", "normalized", "acga", "adasum")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/gpu_smoke")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device here (torch.cuda.is_available() is False); "
              "nothing to run")
        return 0
    gpus = torch.cuda.device_count()
    try:
        get_task("fashion").check_data(None)
        task = "fashion"
    except ValueError:
        task = "digits"
    print(f"gpu_smoke: {gpus} GPU(s), one worker each, task {task}, {args.steps} steps")
    rows = {}
    for name in sorted(algorithms.REGISTRY):
        cfg = TrainConfig(algo=name, task=task, workers=gpus, steps=args.steps,
                          out=str(Path(args.out) / name), device="cuda", backend="nccl",
                          log_every=args.steps, progress=False, optimizer="adam", lr=1e-3)
        clear(cfg.out)
        records = run(cfg, name, resume=False)
        rows[name] = records
    base = rows.get("allreduce")
    base_rate = base[-1]["steps_per_s"] if base else None
    print(f"\n{'algorithm':<16} {'finished':>9} {'final loss':>11} {'step time':>10} "
          f"{'replicas agree':>15}")
    for name, records in rows.items():
        if not records or records[-1].get("status") != "ok":
            print(f"{name:<16} {'no':>9}")
            continue
        steps = [r for r in records if r.get("type") == "step"]
        loss = steps[-1]["loss"] if steps else None
        rate = records[-1]["steps_per_s"]
        rel = f"{base_rate / rate:.2f}x" if base_rate else "-"
        agree = "-"
        if name in GRADIENT_PHASE and steps:
            agree = "yes" if steps[-1].get("consensus_distance") == 0 else "NO"
        loss_text = f"{loss:.4f}" if loss is not None else "nan"
        print(f"{name:<16} {'yes':>9} {loss_text:>11} {rel:>10} {agree:>15}")
    print("step time: relative to allreduce in this run (lower is faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
