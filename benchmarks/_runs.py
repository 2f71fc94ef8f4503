"""Shared by the benchmark scripts: run one `accord train` config, return its records."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from accord import bench
from accord.run import rundir
from accord.run.config import TrainConfig  # noqa: E402
from accord.run.launch import launch  # noqa: E402
from accord.run.metrics import read_metrics  # noqa: E402
from accord.run.validation import validate  # noqa: E402


def run(cfg: TrainConfig, label: str, resume: bool = True) -> list[dict] | None:
    """Run ``cfg`` (skipped if its directory already holds a run that ended ok under the same
    config) and return the records of metrics.jsonl, or None if it failed (the reason is
    printed)."""
    path = Path(cfg.out) / "metrics.jsonl"
    if resume and bench.finished(cfg):  # ended ok under this very config
        return read_metrics(path)
    validate(cfg)
    rundir.clear(cfg.out)  # a failed attempt or another config: start clean
    start = time.time()
    result = launch(cfg, quiet=True)
    if result.returncode:
        print(f"  {label}: FAILED {result.message}", flush=True)
        return None
    records = read_metrics(path)
    print(f"  {label}: done in {time.time() - start:.0f}s", flush=True)
    return records


__all__ = ["TrainConfig", "run"]
