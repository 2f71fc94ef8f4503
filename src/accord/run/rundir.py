"""Run directories that cannot mix: one run per ``--out``, a lock for the live one.

* A directory that already holds a run (``metrics.jsonl``, or worker logs) is refused
  unless ``--overwrite`` is given, which first removes what accord writes there
  (``metrics.jsonl``, ``logs/``, ``tensorboard/``) and nothing else.
* A live run holds ``OUT/.accord.lock`` (process id and host, created exclusively); a
  second run on the same directory is refused while that process lives. A lock left by
  a process that is gone (same host) is taken over.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from ..errors import ConfigError

LOCK = ".accord.lock"
#: what a run writes into its directory (all of it goes with --overwrite)
RUN_FILES = ("metrics.jsonl", "logs", "tensorboard")


def previous_run(out: str | Path) -> str | None:
    """What in ``out`` shows an earlier run, or None for a fresh directory."""
    path = Path(out)
    if (path / "metrics.jsonl").exists():
        return "metrics.jsonl"
    logs = path / "logs"
    if logs.is_dir() and any(logs.iterdir()):
        return "logs/"
    return None


def prepare(out: str | Path, overwrite: bool) -> None:
    """Refuse a directory holding a run (ConfigError) unless ``overwrite``; then clear it."""
    busy = holder(out)
    if busy is not None:
        raise ConfigError(f"out: {str(out)!r} is in use by a live run ({busy}); allowed: "
                          "another directory, or wait for that run to end")
    found = previous_run(out)
    if found is None:
        return
    if not overwrite:
        raise ConfigError(f"out: {str(out)!r} already holds a run ({found}); allowed: a new "
                          "directory, or --overwrite to clear it first")
    clear(out)


def clear(out: str | Path) -> None:
    """Remove a previous run's files from ``out`` (nothing else)."""
    path = Path(out)
    for name in RUN_FILES:
        target = path / name
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        elif target.exists():
            target.unlink()


def holder(out: str | Path) -> str | None:
    """Who holds the lock of ``out`` ("pid N on host H"), or None when nobody live does."""
    path = Path(out) / LOCK
    try:
        pid, host = path.read_text().split()[:2]
        pid_n = int(pid)
    except (OSError, ValueError):
        return None
    if host == socket.gethostname():
        try:
            os.kill(pid_n, 0)
        except ProcessLookupError:
            return None  # a stale lock
        except OSError:
            pass
    return f"pid {pid_n} on {host}"


class RunLock:
    """Held by the process that drives a run (the launcher, or rank 0 under torchrun)."""

    def __init__(self, out: str | Path) -> None:
        self.path = Path(out) / LOCK
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                busy = holder(self.path.parent)
                if busy is not None:
                    raise ConfigError(f"out: {str(self.path.parent)!r} is in use by a live "
                                      f"run ({busy}); allowed: another directory") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {socket.gethostname()}\n")
            self.held = True
            return
        raise ConfigError(f"out: could not lock {str(self.path)!r}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
