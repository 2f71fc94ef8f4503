"""Which worker failed first, and why: attribution from what the workers left behind.

When one worker fails, every other worker fails soon after with a *consequence* (a
closed connection, a collective that timed out waiting for it), and the first error a
process sees is rarely the root cause. Every worker therefore leaves evidence in
``OUT/logs`` while it runs:

* ``rank<r>.heartbeat``: its process id, host, the step it is in and the phase of the
  step (``compute``: forward/backward and injected delays; ``aggregate``: the
  algorithm's hooks and the optimizer; ``record``: a metrics record; ``done``), with the
  time the phase began. Rewritten in place twice per step (a few microseconds).
* ``rank<r>.error``: on an exception, one JSON line (time, error message, step); the
  traceback goes to ``rank<r>.traceback``. Under the local launcher the same record also
  goes through a pipe (:func:`send_report`): a worker whose disk is full cannot write it.

:func:`attribute` reads them (plus, from the local launcher, each process's exit code)
and names the root cause:

1. a worker that died by a signal nobody sent it (SIGKILL, a segfault), or whose process
   is gone without a report (seen from a rank on the same host under torchrun);
2. else the earliest error that is not a consequence;
3. else, when every error is a consequence (timeouts), a worker that reported nothing
   and was still inside a step the longest: it hung;
4. else the earliest error.

Every other worker's error is listed as a consequence of the root cause.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: substrings (lower case) of errors that follow from another worker's failure
CONSEQUENCES = ("connection closed by peer", "connection reset by peer", "broken pipe",
                "timed out", "timeout", "background exchange failed", "no round finished",
                "econnreset", "connection refused", "socket closed", "read error",
                "stopped by the launcher")


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``: how a failure is named everywhere."""
    return (f"{type(exc).__name__}: {exc}".splitlines() or [type(exc).__name__])[0]


class StorageError(OSError):
    """A write that the storage refused (a full disk, a file-size limit, a read-only file
    system, no permission), named in one line: ``cannot write PATH: ENOSPC (No space left
    on device)``. An OSError, with the original ``errno`` and the path as ``filename``."""

    def __init__(self, path: str | os.PathLike, error: OSError) -> None:
        super().__init__(error.errno, error.strerror or str(error), os.fspath(path))

    def __str__(self) -> str:
        code = errno.errorcode.get(self.errno, f"errno {self.errno}") \
            if self.errno is not None else "error"
        return f"cannot write {self.filename}: {code} ({self.strerror})"


def storage_error(exc: BaseException, path: str | os.PathLike) -> StorageError | None:
    """``exc`` (raised while writing ``path``) as a :class:`StorageError`, or None when no
    OSError is behind it. torch's writer raises a RuntimeError of its own ("unexpected pos")
    whose context is the OSError of the failed write: that one is found too."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        if isinstance(error, StorageError):
            return error
        if isinstance(error, OSError) and error.errno is not None:
            return StorageError(error.filename or path, error)
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


#: the environment variable naming the pipe a worker of the local launcher reports its
#: error on: a worker whose disk is full cannot leave ``rank<r>.error`` there
REPORT_FD = "ACCORD_REPORT_FD"


def send_report(record: dict[str, Any]) -> None:
    """Hand this worker's error record to the local launcher through its pipe (one write of
    one line, below PIPE_BUF, so it arrives whole); nothing without a launcher."""
    fd = os.environ.get(REPORT_FD)
    if not fd:
        return
    record = {**record, "error": str(record.get("error", ""))[:1000]}  # well below PIPE_BUF
    try:
        os.write(int(fd), (json.dumps(record) + "\n").encode())
    except (OSError, ValueError):
        pass  # evidence only


def read_reports(fds: dict[int, int]) -> dict[int, dict[str, Any]]:
    """The error records the workers sent on their pipes (``fds``: rank -> read end,
    non-blocking), by rank."""
    out = {}
    for rank, fd in fds.items():
        data = b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                break
            if not chunk:
                break
            data += chunk
        for line in data.decode(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "error" in record:
                out[rank] = {**record, "rank": rank}
    return out


def is_consequence(message: str) -> bool:
    text = message.lower()
    return any(c in text for c in CONSEQUENCES)


class Heartbeat:
    """This worker's current step and phase in ``rank<r>.heartbeat`` (one small in-place
    write per call, no flush to disk needed: readers are on the same host)."""

    def __init__(self, logs: Path, rank: int) -> None:
        self.path = logs / f"rank{rank}.heartbeat"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.prefix = f"{os.getpid()} {socket.gethostname()} "
        self.step = 0

    def beat(self, step: int, phase: str) -> None:
        self.step = step
        line = f"{self.prefix}{step} {phase} {time.time():.6f}".ljust(120) + "\n"
        try:
            os.pwrite(self.fd, line.encode(), 0)
        except OSError:
            pass  # evidence only: never fail a run over it

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


@dataclass
class Beat:
    pid: int
    host: str
    step: int
    phase: str
    time: float


@dataclass
class Exit:
    """A worker process's end as the local launcher saw it."""

    code: int
    time: float
    stopped: bool = False  # terminated by the launcher after another failure


@dataclass
class Failure:
    rank: int | None
    error: str
    step: int | None = None
    consequences: list[dict[str, Any]] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """The summary fields of ``metrics.jsonl``."""
        return {"failed_rank": self.rank, "error": self.error, "failed_step": self.step,
                "consequences": self.consequences}


def read_errors(logs: Path) -> dict[int, dict[str, Any]]:
    out = {}
    for path in logs.glob("rank*.error"):
        try:
            rec = json.loads(path.read_text())
            out[int(rec["rank"])] = rec
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def read_beats(logs: Path) -> dict[int, Beat]:
    out = {}
    for path in logs.glob("rank*.heartbeat"):
        try:
            rank = int(path.name[4:-len(".heartbeat")])
            pid, host, step, phase, stamp = path.read_text().split()
            out[rank] = Beat(int(pid), host, int(step), phase, float(stamp))
        except (OSError, ValueError):
            continue
    return out


def _gone(beat: Beat) -> bool:
    """Whether the process of ``beat`` has ended (only decidable on its own host)."""
    if beat.host != socket.gethostname():
        return False
    try:
        os.kill(beat.pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def attribute(logs: Path, world: int, exits: dict[int, Exit] | None = None,
              ignore: int | None = None,
              reported: dict[int, dict[str, Any]] | None = None) -> Failure:
    """The root cause of a failed run (see the module docstring). ``exits``: the local
    launcher's view of each process; without it (under torchrun) a process that is gone
    is found by its pid when it ran on this host. ``ignore``: a rank whose liveness is
    not in question (the caller itself). ``reported``: error records the workers sent on
    the launcher's pipes (:func:`read_reports`), for ranks whose file could not be written."""
    errors = {**(reported or {}), **read_errors(logs)}
    beats = read_beats(logs)
    primaries: list[tuple[float, int, str]] = []
    for r in range(world):
        err, beat = errors.get(r), beats.get(r)
        ex = (exits or {}).get(r)
        if err is not None and not is_consequence(str(err.get("error", ""))):
            primaries.append((float(err.get("time", 0.0)), r, str(err["error"])))
        elif err is None and ex is not None and ex.code < 0 and not ex.stopped:
            name = _signal_name(-ex.code)
            when = beat.time if beat is not None else ex.time
            primaries.append((when, r, f"killed by {name}"))
        elif (err is None and exits is None and beat is not None and r != ignore
              and beat.phase != "done" and _gone(beat)):
            primaries.append((beat.time, r, "the process ended without a report (killed?)"))
    if primaries:
        _, root, cause = min(primaries)
    else:
        waiting = [(beats[r].time, r) for r in range(world)
                   if r not in errors and r in beats and beats[r].phase in ("compute",)]
        if waiting and errors:
            _, root = min(waiting)
            beat = beats[root]
            first = min(float(e.get("time", 0.0)) for e in errors.values())
            cause = (f"hung: no progress for {max(0.0, first - beat.time):.0f} s inside step "
                     f"{beat.step} ({beat.phase}) while the others waited for it")
        elif errors:
            root = min(errors, key=lambda r: float(errors[r].get("time", 0.0)))
            cause = str(errors[root]["error"])
        else:
            ex = {r: e for r, e in (exits or {}).items() if e.code != 0}
            if not ex:
                return Failure(None, "unknown failure (no worker left a report)")
            root = min(ex, key=lambda r: ex[r].time)
            code = ex[root].code
            cause = f"killed by {_signal_name(-code)}" if code < 0 else f"exit code {code}"
    step = None
    if root in errors and errors[root].get("step") is not None:
        step = int(errors[root]["step"])
    elif root in beats:
        step = beats[root].step
    consequences = [{"rank": r, "error": str(errors[r]["error"])}
                    for r in sorted(errors) if r != root]
    return Failure(root, cause, step, consequences)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def wait_for_reports(logs: Path, world: int, rank: int, seconds: float) -> None:
    """After a consequence error: give the other workers ``seconds`` to leave their own
    report (an error, or an end), so that attribution sees the root cause."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        errors, beats = read_errors(logs), read_beats(logs)
        if any(not is_consequence(str(e.get("error", ""))) for r, e in errors.items()
               if r != rank):
            return
        if any(b.phase != "done" and _gone(b) for r, b in beats.items() if r != rank):
            return
        time.sleep(0.1)
