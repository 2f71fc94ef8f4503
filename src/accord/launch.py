"""Local launcher: N worker processes on localhost with the environment torchrun sets.

Each worker runs the same entry as under torchrun (``python -m accord train ...`` with
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, ... set), so a run started here
and one started with ``torchrun --nproc_per_node=N -m accord train ...`` execute the same
code. Rank 0 writes to the terminal; other ranks to ``OUT/logs/rank<r>.log``.

Failure: when a worker exits with an error the launcher stops the others and reports the
rank that failed first (workers write ``OUT/logs/rank<r>.error`` with a timestamp), so a
run never hangs on a dead worker.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .config import TrainConfig

GRACE_S = 3.0  # after the first failure, time the others get to exit on their own


@dataclass
class LaunchResult:
    returncode: int
    failed_rank: int | None = None
    message: str = ""


def under_torchrun() -> bool:
    """True inside a process started by torchrun (or by this launcher)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(rank: int, world: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
        "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "ROLE_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
    })
    # Oversubscribed cores make intra-op threads a net loss; torchrun does the same.
    env.setdefault("OMP_NUM_THREADS", "1")
    src = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def launch(cfg: TrainConfig, *, quiet: bool = False) -> LaunchResult:
    """Run ``cfg`` on ``cfg.workers`` local processes and wait for them.

    ``quiet`` sends rank 0's output to its log file as well (used by multi-run drivers).
    """
    out = Path(cfg.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for stale in logs.glob("rank*.error"):
        stale.unlink()
    port = free_port()
    cmd = [sys.executable, "-m", "accord", "train", *cfg.to_argv()]
    procs: list[subprocess.Popen] = []
    files = []
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    try:
        for rank in range(cfg.workers):
            if rank == 0 and not quiet:
                stdout = stderr = None
            else:
                f = (logs / f"rank{rank}.log").open("wb")
                files.append(f)
                stdout, stderr = f, subprocess.STDOUT
            procs.append(subprocess.Popen(cmd, env=worker_env(rank, cfg.workers, port),
                                          stdout=stdout, stderr=stderr,
                                          preexec_fn=_die_with_parent))
        result = _wait(procs, logs, cfg.timeout)
        if result.returncode:
            _stop(procs)
            _record_failure(out / "metrics.jsonl", result)
        return result
    except KeyboardInterrupt:
        _stop(procs)
        return LaunchResult(130, None, "interrupted")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        _stop(procs)
        for f in files:
            f.close()


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # run the launcher's cleanup: stop the workers


def _die_with_parent() -> None:
    """In the child before exec: be killed if the launcher dies (Linux), so a killed
    launcher never leaves workers behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _wait(procs: list[subprocess.Popen], logs: Path, timeout: float) -> LaunchResult:
    first: tuple[int, int] | None = None  # (rank, returncode) of the first failure seen
    failed_at = 0.0
    while True:
        codes = [p.poll() for p in procs]
        if first is None:
            for rank, code in enumerate(codes):
                if code not in (None, 0):
                    first, failed_at = (rank, code), time.monotonic()
                    break
        if all(c is not None for c in codes):
            break
        if first is not None and time.monotonic() - failed_at > min(GRACE_S, timeout):
            _stop(procs)
            break
        time.sleep(0.05)
    if first is None:
        return LaunchResult(0)
    rank, code = _root_cause(logs, first)
    reason = _error_line(logs, rank)
    if not reason:
        reason = (f"killed by signal {signal.Signals(-code).name}" if code < 0
                  else f"exit code {code}")
    log_hint = logs / f"rank{rank}.log" if rank else None
    message = f"worker rank {rank} failed: {reason}"
    if log_hint is not None:
        message += f" (log: {log_hint})"
    return LaunchResult(1, rank, message)


def _record_failure(path: Path, result: LaunchResult) -> None:
    """Close ``metrics.jsonl`` with a failed summary when rank 0 could not write one
    (it was stopped while waiting on a peer that had died)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    if not records or records[-1].get("type") == "summary":
        return
    evals = [r for r in records if r.get("type") == "step"]
    last = {k: v for k, v in (evals[-1] if evals else {}).items()
            if k.startswith("eval_")}
    record = {"type": "summary", "status": "failed", "failed_rank": result.failed_rank,
              "error": result.message, **last}
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _root_cause(logs: Path, first: tuple[int, int]) -> tuple[int, int]:
    """The earliest reported error wins; a worker that died without a report (killed)
    is the root cause if it was seen first, since the others' errors follow from it."""
    rank, code = first
    if code < 0:
        return first
    reports = []
    for path in logs.glob("rank*.error"):
        try:
            rec = json.loads(path.read_text())
            reports.append((float(rec["time"]), int(rec["rank"])))
        except (ValueError, KeyError, OSError):
            continue
    if reports:
        return min(reports)[1], code
    return first


def _error_line(logs: Path, rank: int) -> str:
    path = logs / f"rank{rank}.error"
    try:
        return json.loads(path.read_text())["error"]
    except (OSError, ValueError, KeyError):
        return ""


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 5.0
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
