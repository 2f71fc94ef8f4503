"""Run records: ``metrics.jsonl`` (one JSON object per line) and the run's environment.

The records' schema (:data:`RECORD_SCHEMAS`, by ``type``, with :mod:`accord.schema`) is the
one every reader of a run applies through :func:`scan_metrics` (resuming, the bench's reuse,
``accord report``): the fields they read have their types (``header``: ``config`` an
object, ``world_size`` an integer >= 1; ``step``: ``step`` an integer >= 0, ``loss`` and
every ``eval_*`` a number or null; ``summary``: ``status`` a string, ``steps`` an integer;
...), any other field is free (a record may carry more than its readers use), and a record
of another ``type`` passes as it is (a reader decides what an unknown type means). A
writer checks a record with :func:`check_record`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..schema import (
    AnyJSON,
    Int,
    ListOf,
    MapOf,
    Nullable,
    Number,
    Record,
    SchemaError,
    Text,
    parse_json,
    validate,
)
from .failures import StorageError


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
    from .._version import __version__

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
    """Appends records to a JSONL file, each written whole before ``write`` returns, so a
    crash loses nothing.

    A record is whole or absent: a write the storage refuses (disk full, a file-size limit)
    cuts the part of the line that was written and raises
    :class:`accord.run.failures.StorageError` naming the file and the errno, so the records
    before it stay intact and the file stays readable.

    With ``tensorboard_dir``, every number of a ``step`` record is also written as a
    TensorBoard scalar at that step (the algorithm's metrics under ``algo/``)."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None,
                 append: bool = False) -> None:
        self.path = Path(path)
        # unbuffered: a failed write leaves nothing in a buffer that a later flush or close
        # would write after the cut
        self.fd: int | None = os.open(
            self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if append else os.O_TRUNC),
            0o644)
        self.size = os.fstat(self.fd).st_size  # the end of the last whole record
        self.last_eval: dict[str, Any] = {"eval_loss": None}  # until the first evaluation
        #: the run's attempts so far ({"from_step", "started"}), set by the training loop
        self.attempts: list[dict[str, Any]] = []
        # an asynchronous run's records come from its observer thread
        self.lock = threading.Lock()
        self.tb = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(tensorboard_dir))

    def write(self, record: dict[str, Any]) -> None:
        with self.lock:
            self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        if self.fd is None:
            raise ValueError(f"{self.path}: the metrics writer is closed")
        self.size = _append_whole(self.fd, self.size, self.path,
                                  (json.dumps(record, allow_nan=False) + "\n").encode())
        if self.tb is not None and record.get("type") == "step":
            step = record["step"]
            flat = {k: v for k, v in record.items() if k not in ("type", "step", "algo")}
            flat.update({f"algo/{k}": v for k, v in record.get("algo", {}).items()})
            for key, value in flat.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _append_whole(fd: int, size: int, path: Path, data: bytes) -> int:
    """Append ``data`` to the file open as ``fd`` (``O_APPEND``, ``size`` bytes of whole
    records); the new size. On a refused write the partial line is cut (the file is ``size``
    bytes again) and a StorageError naming ``path`` is raised."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError as e:
        try:
            os.ftruncate(fd, size)
        except OSError:
            pass
        raise StorageError(path, e) from None
    return size + len(data)


def append_record(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record to ``path`` whole or not at all (StorageError, one line); a torn
    last line (a writer killed mid-write) is ended first, so the record starts a line."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as e:
        raise StorageError(path, e) from None
    try:
        size = os.fstat(fd).st_size
        torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        data = (json.dumps(record, allow_nan=False) + "\n").encode()
        _append_whole(fd, size, path, b"\n" + data if torn else data)
    finally:
        os.close(fd)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# -- reading runs back: shared by ``accord bench`` (reuse, its table) and ``accord report`` --

#: the summary's ``status``; a file without a summary record is "incomplete"
STATUSES = ("ok", "diverged", "failed", "interrupted")

#: a number a reader takes as missing when it is null (a metric that was not finite, a
#: time or a count an older writer left out); ``NaN`` too, which only a hand-edit writes
_METRIC = Nullable(Number(finite=False))
_COUNT = Nullable(Number(0, finite=False))
_STEP = Int(0)
_OBJECT = MapOf(AnyJSON())
_LIFECYCLE = Record({"step": _STEP}, extra=True)

#: every record's schema by its ``type`` (see the module docstring)
RECORD_SCHEMAS: dict[str, Record] = {
    "header": Record({"config": MapOf(AnyJSON(), expected="an object (the run's config)"),
                      "algorithm": Text(), "hyperparameters": _OBJECT,
                      "world_size": Int(1), "time": Number()},
                     required=("config",), extra=True),
    "step": Record({"step": _STEP, "loss": _METRIC, "consensus_distance": _METRIC,
                    "time_s": _METRIC, "comm_bytes": _COUNT, "comm_calls": Nullable(Int(0)),
                    "comm_s": _METRIC, "algo": _OBJECT},
                   required=("step",), extra=True,
                   prefixed={"eval_": _METRIC, "rank0_eval_": _METRIC}),
    "summary": Record({"status": Text(), "steps": Nullable(_STEP), "time_s": _METRIC,
                       "steps_per_s": _METRIC, "comm_bytes": _COUNT,
                       "comm_bytes_mean": _COUNT,
                       "error": Nullable(Text()), "failed_rank": Nullable(Int(0)),
                       "failed_step": Nullable(_STEP), "diverged_step": Nullable(_STEP),
                       "diverged_reason": Nullable(Text()),
                       "consequences": ListOf(_OBJECT)},
                      required=("status",), extra=True, prefixed={"eval_": _METRIC}),
    "event": Record({"kind": Text(), "step": Nullable(_STEP)}, required=("kind",),
                    extra=True),
    "start": _LIFECYCLE, "resume": _LIFECYCLE, "restart": _LIFECYCLE,
    "checkpoint": _LIFECYCLE,
}


def check_record(record: Any) -> dict[str, Any]:
    """``record`` when it is a JSON object whose fields match its type's schema
    (:data:`RECORD_SCHEMAS`); :class:`accord.schema.SchemaError` naming the first wrong
    field otherwise. A record of another type is not checked beyond being an object."""
    if not isinstance(record, dict):
        raise SchemaError("", "a JSON object (a record)", type(record).__name__)
    kind = record.get("type")
    schema = RECORD_SCHEMAS.get(kind) if isinstance(kind, str) else None
    return validate(schema, record) if schema is not None else record


@dataclass
class MetricsScan:
    """A tolerant read of ``metrics.jsonl``: the records that match their schema, and the
    lines that are not one."""

    records: list[dict[str, Any]] = field(default_factory=list)
    lines: int = 0  # non-blank lines
    malformed: list[int] = field(default_factory=list)  # line numbers: not a JSON object
    #: records whose fields do not match their type's schema: (line number, type, error)
    invalid: list[tuple[int, str, SchemaError]] = field(default_factory=list)

    @property
    def readable(self) -> bool:
        """True when at least one line is a record (random bytes are not)."""
        return bool(self.records)


def scan_metrics(path: str | Path) -> MetricsScan:
    """Every line of ``path`` that is a record of its schema (:func:`check_record`), in
    order; the numbers of the lines that are not JSON objects (torn, binary, nested deeper
    than ``accord.schema.MAX_DEPTH``), and the records that break their schema. Undecodable
    bytes never raise; OSError does."""
    text = Path(path).read_bytes().decode("utf-8", errors="replace")
    scan = MetricsScan()
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        scan.lines += 1
        try:
            record = parse_json(line)
        except SchemaError:
            record = None
        if not isinstance(record, dict):
            scan.malformed.append(number)
            continue
        try:
            scan.records.append(check_record(record))
        except SchemaError as e:
            scan.invalid.append((number, str(record.get("type")), e))
    return scan


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and \
        math.isfinite(value)


def _bad_values(record: dict[str, Any]) -> bool:
    """A consensus-model evaluation or the consensus distance present but not finite (null
    or NaN/Inf). A null training ``loss`` alone is not divergence: one rank's non-finite
    loss makes the mean null while the non-finite guard keeps the run healthy."""
    return any(not _finite_number(v) for k, v in record.items()
               if k == "consensus_distance" or k.startswith("eval_"))


@dataclass(frozen=True)
class Outcome:
    """How a run ended, from its records (see :func:`run_outcome`)."""

    status: str  # one of STATUSES, or "incomplete" (no summary record)
    diverged_step: int | None = None
    failed_rank: int | None = None
    error: str | None = None
    consequences: tuple[tuple[Any, str], ...] = ()  # (rank, error) secondary failures
    inferred: bool = False  # diverged inferred from values in a file marked "ok"
    reason: str | None = None  # diverged_reason
    failed_step: int | None = None

    def describe(self, width: int = 300) -> str:
        """One line: "ok", "diverged at step 40", "failed: rank 1: ... (then rank 0: ...)"."""
        if self.status == "diverged":
            where = f"at step {self.diverged_step}" if self.diverged_step is not None \
                else "(step unknown)"
            return f"diverged {where}"
        if self.status == "ok":
            return "ok"
        text = self.status
        cause = self.cause()
        if cause:
            text += f": {cause}"
        elif self.status == "incomplete":
            text += ": no summary record (killed, or still running)"
        return text if len(text) <= width else text[:width - 3] + "..."

    def cause(self) -> str:
        """failed_rank and error, then the secondary failures briefly ('' if none)."""
        text = ""
        if self.error:
            where = f"rank {self.failed_rank}" if self.failed_rank is not None else ""
            if self.failed_step is not None:
                where += (" " if where else "") + f"at step {self.failed_step}"
            text = (f"{where}: " if where else "") + self.error
        if self.consequences:
            rank, error = self.consequences[0]
            more = len(self.consequences) - 1
            text += f" (then rank {rank}: {error}" + (f"; +{more} more" if more else "") + ")"
        return text


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _line(value: Any) -> str | None:
    return (str(value).splitlines() or [""])[0] if value not in (None, "") else None


def run_outcome(records: list[dict[str, Any]]) -> Outcome:
    """The outcome of a run from its records: the last summary record's ``status`` with its
    details (``diverged_step``, ``diverged_reason``; ``failed_rank``, ``failed_step``,
    ``error``, ``consequences``). No summary: "incomplete"; an unknown status too.

    Files written before the "diverged" status existed mark a diverged run "ok" with null
    values; a run marked "ok" whose step records or summary hold a null or non-finite
    ``eval_*`` or ``consensus_distance`` (what makes a run diverged today) is reported as
    diverged at the first such step (``inferred``)."""
    summary = next((r for r in reversed(records) if r.get("type") == "summary"), None)
    if summary is None:
        return Outcome("incomplete")
    status = summary.get("status")
    status = status if status in STATUSES else "incomplete"
    error = _line(summary.get("error"))
    if status == "incomplete":
        error = error or f"unknown summary status {summary.get('status')!r}"
    consequences = tuple((item.get("rank"), _line(item.get("error")) or "?")
                         for item in summary.get("consequences") or []
                         if isinstance(item, dict))
    step = _int_or_none(summary.get("diverged_step"))
    inferred = False
    if status == "ok":
        bad = next((r for r in records if r.get("type") == "step" and _bad_values(r)), None)
        if bad is not None or _bad_values(summary):
            status, inferred = "diverged", True
            step = _int_or_none(bad.get("step")) if bad is not None else None
    return Outcome(status, step, _int_or_none(summary.get("failed_rank")), error,
                   consequences, inferred, _line(summary.get("diverged_reason")),
                   _int_or_none(summary.get("failed_step")))
