"""Reading the runs under RUNS_DIR: a :class:`Run` per directory holding a ``metrics.jsonl``
(or only ``logs/rank*.error``), its status and cause, and the warnings of its file (see
docs/reference/report.md, Runs and their status, Reading the files)."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..run.metrics import Outcome, run_outcome, scan_metrics

Warn = Callable[[str], None]


class ReportError(Exception):
    """A report that cannot be made, said in one line."""


def _num(value: Any) -> float | None:
    """A finite real number as float, else None (bools, strings, NaN, missing)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _is_eval_key(key: str) -> bool:
    return key.startswith(("eval_", "rank0_eval_")) or key == "consensus_distance"


@dataclass
class Run:
    path: Path
    name: str  # path relative to RUNS_DIR
    header: dict[str, Any] | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)  # step records, in file order
    summary: dict[str, Any] | None = None
    first_error: str | None = None  # the earliest logs/rank*.error
    outcome: Outcome = field(default_factory=lambda: Outcome("incomplete"))
    events: int = 0  # event records (normal: faults, excluded gradients)
    #: checkpoint / resume / restart records (a resumed run continues in the same file)
    lifecycle: dict[str, int] = field(default_factory=dict)
    unreadable: str | None = None  # why metrics.jsonl could not be read at all
    #: fault-tolerant runs: (step, participants) at the start and at every change of
    #: membership (``membership`` events), in step order; empty for a fixed world
    membership: list[tuple[int, int]] = field(default_factory=list)
    discarded: int = 0  # fault-tolerant runs: ``discarded`` events (one per worker, step)

    @property
    def status(self) -> str:
        """ok, diverged, failed, interrupted, incomplete or unreadable."""
        status = self.outcome.status
        if status == "ok":
            return "ok" if self.header is not None else "unreadable"
        if status in ("diverged", "failed", "interrupted"):
            return status
        if self.first_error:
            return "failed"
        return "unreadable" if self.unreadable else "incomplete"

    @property
    def readable(self) -> bool:
        """Something of the run could be read: a record of its metrics.jsonl or an error
        report in logs/."""
        return self.header is not None or self.summary is not None or bool(self.steps) \
            or self.first_error is not None

    @property
    def config(self) -> dict[str, Any]:
        config = (self.header or {}).get("config")
        return config if isinstance(config, dict) else {}

    @property
    def tuning(self) -> bool:
        """A tuning run: evaluated on the val split (``accord bench --tune``), set aside."""
        return self.config.get("eval_split") == "val"

    @property
    def task(self) -> str:
        return str(self.config.get("task", "?"))

    @property
    def workers(self) -> int:
        header = self.header or {}
        for value in (header.get("world_size"), self.config.get("workers")):
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return 0

    @property
    def algorithm(self) -> str:
        return str((self.header or {}).get("algorithm") or self.config.get("algo") or "?")

    @property
    def label(self) -> str:
        return str(self.config.get("label") or self.algorithm)

    @property
    def network(self) -> str | None:
        """The emulated network as the run gave it: ``config.network`` (``100mbit,5ms``),
        ``profile PATH`` for ``config.network_profile``, None for the real network (also
        when the config predates these keys)."""
        text = self.config.get("network")
        if text:
            return str(text).strip()
        profile = self.config.get("network_profile")
        return f"profile {profile}" if profile else None

    @property
    def real_links(self) -> bool:
        """True when the network was shaped for real (``accord train --links real``)."""
        return self.config.get("links") == "real"

    @property
    def seed(self) -> int:
        seed = self.config.get("seed", 0)
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else 0

    @property
    def error(self) -> str:
        """The cause of a run that did not end ok, in one line (see
        docs/reference/report.md, Runs and their status)."""
        outcome = self.outcome
        if self.status == "diverged":
            return outcome.describe() + (" (inferred from null values)" if outcome.inferred
                                         else "")
        if self.status == "interrupted":
            return outcome.cause() or "interrupted (SIGINT or SIGTERM)"
        if outcome.consequences and outcome.error:  # the summary names the root cause
            return outcome.cause()
        if self.first_error:
            return self.first_error
        if outcome.error:
            return outcome.cause()
        if self.unreadable:
            return f"metrics.jsonl: {self.unreadable}"
        if self.header is None:
            return "no header record"
        return "no summary record (killed, or still running)"


def find_runs(root: Path) -> list[Path]:
    """Run directories under root: metrics.jsonl, or logs/rank*.error without it."""
    dirs = {p.parent for p in root.rglob("metrics.jsonl") if p.is_file()}
    for p in root.rglob("rank*.error"):
        if p.parent.name == "logs" and not (p.parent.parent / "metrics.jsonl").exists():
            dirs.add(p.parent.parent)
    return sorted(dirs)


def _first_error(run_dir: Path) -> str | None:
    found = []
    for p in (run_dir / "logs").glob("rank*.error"):
        try:
            rec = json.loads(p.read_text(encoding="utf-8").strip().splitlines()[0])
            found.append((float(rec.get("time", math.inf)), f"rank {rec['rank']}: "
                          f"{rec['error']}"))
        except (OSError, ValueError, IndexError, KeyError, TypeError, AttributeError):
            continue
    return min(found)[1] if found else None


def _lines(numbers: list[int], shown: int = 5) -> str:
    text = ", ".join(str(n) for n in numbers[:shown])
    more = len(numbers) - shown
    return f"line{'s' * (len(numbers) != 1)} {text}" + (f" and {more} more" if more > 0 else "")


def load_run(run_dir: Path, root: Path, warn: Warn) -> Run:
    """Read one run; at most one warning per kind of problem in its metrics.jsonl (event
    records are normal and never warned about)."""
    run = Run(path=run_dir, name=_relative(run_dir, root))
    run.first_error = _first_error(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return run
    where = f"{run.name}/metrics.jsonl"
    try:
        scan = scan_metrics(path)
    except OSError as e:
        run.unreadable = f"cannot be read ({e.strerror or e})"
        warn(f"{where}: {run.unreadable}; skipped")
        return run
    if scan.lines and not scan.readable:
        lines = f"{scan.lines} line{'s' * (scan.lines != 1)}"
        if scan.invalid:  # JSON objects, but none a record of its schema
            number, _, error = scan.invalid[0]
            run.unreadable = (f"not a metrics file (none of its {lines} is a record of the "
                              f"metrics schema; line {number}: {error})")
        else:
            run.unreadable = f"not a metrics file (none of its {lines} is a JSON record)"
        warn(f"{where}: {run.unreadable}; skipped")
        return run
    if scan.malformed:
        n = len(scan.malformed)
        warn(f"{where}: {n} malformed JSON line{'s' * (n != 1)} skipped "
             f"({_lines(scan.malformed)})")
    # records that break their type's schema (accord.run.metrics.RECORD_SCHEMAS): one warning
    # per type, naming the first one's line and field
    invalid: dict[str, list[tuple[int, Exception]]] = {}
    for number, kind, error in scan.invalid:
        invalid.setdefault(kind, []).append((number, error))
    for kind, found in sorted(invalid.items()):
        n = len(found)
        number, error = found[0]
        warn(f"{where}: {n} {kind} record{'s' * (n != 1)} skipped, not of the metrics "
             f"schema (line {number}: {error})")
    unknown: Counter[str] = Counter()
    records = []
    for record in scan.records:
        kind = record.get("type")
        if kind == "header":
            run.header = record
        elif kind == "step":
            run.steps.append(record)
        elif kind == "summary":
            run.summary = record
        elif kind == "event":
            run.events += 1
            if record.get("kind") == "membership":
                step, who = record.get("step"), record.get("participants")
                if isinstance(step, int) and isinstance(who, list):
                    run.membership.append((step, len(who)))
            elif record.get("kind") == "discarded":
                run.discarded += 1
        elif kind in ("checkpoint", "resume", "restart", "start"):
            # a resumed or restarted run is still one run: its step records continue
            run.lifecycle[kind] = run.lifecycle.get(kind, 0) + 1
            continue
        else:
            unknown[str(kind)] += 1
            continue
        records.append(record)
    if unknown:
        n = sum(unknown.values())
        kinds = ", ".join(repr(k) for k in sorted(unknown)[:5])
        warn(f"{where}: {n} record{'s' * (n != 1)} of unknown type skipped ({kinds})")
    run.outcome = run_outcome(records)
    run.membership.sort(key=lambda change: change[0])  # merged over workers by time
    return run


def _relative(path: Path, root: Path) -> str:
    try:
        rel = path.relative_to(root).as_posix()
    except ValueError:
        rel = path.as_posix()
    return rel if rel != "." else path.name or "."
