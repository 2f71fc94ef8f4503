"""Run records: ``metrics.jsonl`` (one JSON object per line) and the run's environment."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch


def git_revision() -> str | None:
    """The git commit of the accord source tree, or None outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


def run_environment() -> dict[str, Any]:
    from . import __version__

    return {
        "accord_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "git_revision": git_revision(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
    }


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class MetricsWriter:
    """Appends records to a JSONL file, flushed after each so a crash loses nothing.

    With ``tensorboard_dir``, every number of a ``step`` record is also written as a
    TensorBoard scalar at that step (the algorithm's metrics under ``algo/``)."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None) -> None:
        self.path = Path(path)
        self.file = self.path.open("w", encoding="utf-8")
        self.last_eval: dict[str, Any] = {"eval_loss": None}  # until the first evaluation
        self.tb = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(tensorboard_dir))

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record, allow_nan=False) + "\n")
        self.file.flush()
        if self.tb is not None and record.get("type") == "step":
            step = record["step"]
            flat = {k: v for k, v in record.items() if k not in ("type", "step", "algo")}
            flat.update({f"algo/{k}": v for k, v in record.get("algo", {}).items()})
            for key, value in flat.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, step)
            self.tb.flush()

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
