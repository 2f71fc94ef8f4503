"""Local launcher: N worker processes on localhost with the environment torchrun sets.

Each worker runs the same entry as under torchrun (``python -m accord train ...`` with
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, ... set), so a run started here
and one started with ``torchrun --nproc_per_node=N -m accord train ...`` execute the same
code. Rank 0 writes to the terminal; other ranks to ``OUT/logs/rank<r>.log``.

The launcher hosts the job's key-value store itself (a TCPStore bound to a port the
operating system picks, which the workers join as clients, as under torchrun's agent), so
no port can be taken between choosing and binding it, and the store outlives any worker.
It holds ``OUT/.accord.lock`` while the run lives.

Failure: when a worker exits with an error the launcher stops the others (after a short
grace period in which they leave their own reports), names the rank that failed first
and its cause, lists the other ranks' errors as consequences (:mod:`accord.run.failures`),
and writes that as the final summary of ``metrics.jsonl``, so a run never hangs on a dead
worker and its record blames the right rank. Exit codes of the workers: 0 (ok) and 3
(diverged, see :func:`accord.run.train.run_worker`) are clean ends.

Each worker also hands its error record to the launcher through a pipe of its own
(``ACCORD_REPORT_FD``): when ``OUT/logs`` is on a full disk its ``rank<r>.error`` cannot be
written, and the run's one line still names the error (a
:class:`accord.run.failures.StorageError`: the file and the errno). The final summary is
written whole or not at all (:func:`finish_summary`); when it cannot be, the one line says
so and why.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from .config import ConfigError, TrainConfig
from .failures import REPORT_FD, Exit, Failure, StorageError, attribute, read_reports
from .metrics import append_record
from .process import LAUNCHED, launched_here, under_torchrun  # noqa: F401 - re-exported
from .rundir import RunLock

GRACE_S = 3.0  # after the first failure, time the others get to exit on their own
CLEAN_EXITS = (0, 3)  # ok, diverged
@dataclass
class LaunchResult:
    returncode: int
    failed_rank: int | None = None
    message: str = ""


def worker_env(rank: int, world: int, port: int, restart: int = 0,
               max_restarts: int = 0) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
        "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "ROLE_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "TORCHELASTIC_RESTART_COUNT": str(restart),
        "TORCHELASTIC_MAX_RESTARTS": str(max_restarts),
        # the store is the launcher's: every rank joins it as a client
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        # the launcher already checked and locked the run directory
        LAUNCHED: "1",
    })
    env.pop("TORCHELASTIC_ERROR_FILE", None)
    # Oversubscribed cores make intra-op threads a net loss; torchrun does the same.
    env.setdefault("OMP_NUM_THREADS", "1")
    src = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def launch(cfg: TrainConfig, *, quiet: bool = False) -> LaunchResult:
    """Run ``cfg`` on ``cfg.workers`` local processes and wait for them.

    ``quiet`` sends rank 0's output to its log file as well (used by multi-run drivers).
    With ``cfg.max_restarts`` R > 0, a failed attempt (a worker died or raised) stops every
    worker, appends a ``restart`` record to ``metrics.jsonl`` and starts all of them again
    with ``--resume auto`` (from the newest complete checkpoint; from step 0 without one),
    up to R times; crash and kill faults fire once per run directory, so an injected death
    does not repeat.
    """
    out = Path(cfg.out)
    logs = out / "logs"
    lock = RunLock(out)
    try:
        lock.acquire()
    except ConfigError as e:
        return LaunchResult(2, None, str(e))
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    try:
        attempt_cfg = cfg
        for restart in range(cfg.max_restarts + 1):
            result, failure = _attempt(attempt_cfg, logs, quiet, restart)
            if failure is None or restart == cfg.max_restarts:
                if failure is not None:
                    _unwritten(result, finish_summary(out / "metrics.jsonl", "failed",
                                                      failure.record()))
                return result
            try:
                append_record(out / "metrics.jsonl", {
                    "type": "restart", "restart": restart + 1,
                    "max_restarts": cfg.max_restarts, "time": time.time(),
                    **failure.record()})
            except StorageError as e:  # a restart could not be recorded: nor would its run
                _unwritten(result, finish_summary(out / "metrics.jsonl", "failed",
                                                  failure.record()))
                result.message += f"; not restarted: {e}"
                return result
            print(f"accord train: {result.message}; restarting every worker from the newest "
                  f"checkpoint (restart {restart + 1} of {cfg.max_restarts})", file=sys.stderr)
            attempt_cfg = dataclasses.replace(cfg, resume="auto")
        return result  # pragma: no cover - the loop always returns
    except KeyboardInterrupt:
        result = LaunchResult(130, None, "interrupted")
        _unwritten(result, finish_summary(out / "metrics.jsonl", "interrupted",
                                          {"error": "interrupted (SIGINT or SIGTERM)"},
                                          keep=("interrupted",)))
        return result
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        lock.release()


def _unwritten(result: LaunchResult, reason: str | None) -> None:
    """Add to the run's one line that its summary could not be written, and why."""
    if reason is not None:
        result.message += f" (no summary: {reason})"


def _attempt(cfg: TrainConfig, logs: Path, quiet: bool,
             restart: int) -> tuple[LaunchResult, Failure | None]:
    """One start of every worker, to the end or the first failure (every worker stopped)."""
    logs.mkdir(parents=True, exist_ok=True)
    for pattern in ("rank*.error", "rank*.traceback", "rank*.heartbeat"):
        for stale in logs.glob(pattern):
            stale.unlink()
    # a fresh store per attempt: nothing of a failed attempt's traffic is left in it
    store = dist.TCPStore("127.0.0.1", 0, cfg.workers + 1, is_master=True,
                          timeout=timedelta(seconds=cfg.timeout), wait_for_workers=False)
    cmd = [sys.executable, "-m", "accord", "train", *cfg.to_argv()]
    procs: list[subprocess.Popen] = []
    files = []
    reports: dict[int, int] = {}  # rank -> read end of the pipe it reports its error on
    try:
        for rank in range(cfg.workers):
            if rank == 0 and not quiet:
                stdout = stderr = None
            else:
                f = (logs / f"rank{rank}.log").open("ab" if restart else "wb")
                files.append(f)
                stdout, stderr = f, subprocess.STDOUT
            read, write = os.pipe()
            os.set_blocking(read, False)
            reports[rank] = read
            env = worker_env(rank, cfg.workers, store.port, restart, cfg.max_restarts)
            env[REPORT_FD] = str(write)
            try:
                procs.append(subprocess.Popen(
                    cmd, env=env, stdout=stdout, stderr=stderr, pass_fds=(write,),
                    preexec_fn=_die_with_parent))
            finally:
                os.close(write)
        result, failure = _wait(procs, logs, cfg.timeout, reports)
        if failure is not None:
            _stop(procs)
        return result, failure
    except KeyboardInterrupt:
        _stop(procs)
        raise
    finally:
        _stop(procs)
        for f in files:
            f.close()
        for fd in reports.values():
            os.close(fd)
        del store


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


def _wait(procs: list[subprocess.Popen], logs: Path, timeout: float,
          reports: dict[int, int] | None = None) -> tuple[LaunchResult, Failure | None]:
    exits: dict[int, Exit] = {}
    failed_at: float | None = None
    stopped = False
    while True:
        now = time.time()
        for rank, p in enumerate(procs):
            code = p.poll()
            if code is not None and rank not in exits:
                exits[rank] = Exit(code, now, stopped=stopped)
                if code not in CLEAN_EXITS and failed_at is None:
                    failed_at = time.monotonic()
        if len(exits) == len(procs):
            break
        if failed_at is not None and time.monotonic() - failed_at > min(GRACE_S, timeout):
            stopped = True  # whatever ends from here on was stopped by us
            _stop(procs)
        time.sleep(0.05)
    if failed_at is None:
        return LaunchResult(0), None
    failure = attribute(logs, len(procs), exits, reported=read_reports(reports or {}))
    message = f"worker rank {failure.rank} failed"
    if failure.step is not None:
        message += f" at step {failure.step}"
    message += f": {failure.error}"
    # (a pointer only to a file that is there: on a full disk it may not be)
    if failure.rank and (logs / f"rank{failure.rank}.log").exists():
        message += f" (log: {logs / f'rank{failure.rank}.log'})"
    elif failure.rank == 0 and _nonempty(logs / "rank0.traceback"):
        message += f" (traceback: {logs / 'rank0.traceback'})"
    return LaunchResult(1, failure.rank, message), failure


def _nonempty(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


def finish_summary(path: Path, status: str, fields: dict,
                   keep: tuple[str, ...] = ()) -> str | None:
    """Make the last record of ``metrics.jsonl`` a summary with ``status`` and ``fields``
    (replacing a summary rank 0 wrote, unless its status is ok, diverged or in ``keep``),
    keeping the last evaluation. Written to a temporary file and renamed: never half a file.

    Returns None when the file ends with a summary (or has no records to end), else one
    line saying why it could not be written. A full disk may not hold the new copy: then
    the summary is appended instead (a record is whole or absent), or rank 0's own failed
    summary is kept; the records already there are never touched."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    if not records:
        return None
    old = records[-1] if records[-1].get("type") == "summary" else None
    # a run that ended by itself (every step done, or diverged) keeps its summary whatever
    # happened afterwards (a worker failing at exit, a signal during teardown)
    if old is not None and old.get("status") in (*keep, "ok", "diverged"):
        return None
    if old is not None:
        records.pop()
    evals = [r for r in records if r.get("type") == "step"]
    last = {k: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("eval_")}
    kept = {k: v for k, v in (old or {}).items()
            if k not in ("type", "status", "error", "failed_rank", "failed_step",
                         "consequences")}
    summary = {"type": "summary", "status": status, **last, **kept, **fields}
    records.append(summary)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if old is not None:
            return None  # rank 0's own summary (failed or interrupted) stays
        try:
            append_record(path, summary)
        except StorageError as e:
            return str(e)
        return None
    os.replace(tmp, path)
    return None


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
