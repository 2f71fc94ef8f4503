"""``accord report RUNS_DIR``: tables, figures and CSV files comparing the runs in a directory.

    accord report RUNS_DIR [--out DIR] [--target-acc X] [--target-loss Y]

**Runs.** Every directory under ``RUNS_DIR`` (recursively) holding a ``metrics.jsonl`` is a
run (a directory holding only ``logs/rank*.error`` is a run that failed before rank 0 wrote
its header). A run's status is its last summary record's ``status``:

* ``ok`` -- *finished*; only finished runs enter the numbers, tables, figures, CSV files
  and targets;
* ``diverged`` -- non-finite parameters or evaluation metrics (``diverged_step``, and
  ``diverged_reason`` when given, say where and why). Never averaged into anything (not
  into one metric and out of another: out of all of them); each section names its
  diverged runs in one line, and the section "Diverged runs" lists them with the step
  and the reason. A file written before this status existed marks such a run ``ok``
  with null values; a run marked ``ok`` with a null or non-finite ``eval_*`` or
  ``consensus_distance`` in a step record (or ``eval_*`` in its summary) is taken as
  diverged at the first such step, and the table says it was inferred (a null training
  ``loss`` alone is not divergence: the non-finite guard handles one rank's NaN);
* ``failed``, ``interrupted`` and *incomplete* (no summary: killed, or still running) and
  *unreadable* -- listed in "Failed, interrupted and incomplete runs" with their cause:
  the summary's ``failed_rank`` and ``error`` and briefly its ``consequences`` (the
  secondary failures) when the summary has them; else the earliest ``logs/rank*.error``
  (the root cause; the other ranks usually only report a closed connection), else the
  summary's ``error``.

**Tuning runs.** A run whose header ``config`` has ``"eval_split": "val"`` is a *tuning
run* (``accord bench --tune``: evaluated on a held-out part of the training data, not on
the test split); a config without ``eval_split`` means ``"test"``. Tuning runs are set
aside whatever their status: they enter no section, table (not even the diverged and
failed lists), figure, target, ``points.csv`` or ``summary.csv``, since their metric is
measured on another split. The report says in one line how many were set aside (and by
status), also when no ``tuning.json`` describes them; the section "Tuning" shows them.

**Reading.** ``event`` records are normal (injected faults, excluded gradients): counted,
never warned about. Each problem of a file is one warning line for that file, however
many lines it affects: malformed lines (not JSON, or nested deeper than
``accord.schema.MAX_DEPTH``), records that break the metrics schema
(``accord.metrics.RECORD_SCHEMAS``: a step record without an integer ``step``, a header
whose ``config`` is not an object, a ``time_s`` that is not a number, ...; one line per
record type, naming the first such record's line and field), records of an unknown type.
Such lines and records are skipped. A file in which no line is a record (binary, random
bytes, JSON of another shape) or that cannot be read is one warning and an *unreadable*
run; when no run under ``RUNS_DIR`` can be read at all, the report is an error (exit
status 2) and writes nothing.

**Grouping.** A group is (task, workers, network, label), where label is ``config.label``
of the header or else the algorithm, and network the emulated link (``config.network``, or
``config.network_profile``; null or absent is the real network); the runs of a group are
its repetitions, one per seed (``config.seed``). Each (task, workers, network) is a
*section* of the report with its own tables, target, verdict and figures; the groups of a
section are compared with each other, and with the ``allreduce`` group (the baseline) when
the section has one. Runs of one label on two links are two sections, never one group:
their wall times differ by design. Two spellings of one link (``100mbit,5ms`` and
``100Mbit/s,5ms``) are one network; a profile is its path. Sections of the real network
are titled ``<task>, <workers> workers``; an emulated one adds ``, network <link>
(emulated)`` (``network profile <path> (emulated)`` for a profile). The sections of one
(task, workers) come fastest network first: the real network (nothing emulated), then by
bandwidth (then latency).

**Test metric.** ``eval_acc`` (higher is better) when the section's runs log it, else
``eval_loss`` (lower is better).

**Target.** ``--target-acc`` is used for accuracy sections and ``--target-loss`` for loss
sections. Without one, the default target is derived from a reference final value, the
mean over seeds of the metric at the last record: the ``allreduce`` group's when the
section has one, else the worst group's (lowest mean accuracy, highest mean loss). The
target is then 5% worse than the reference: ``0.95 x reference`` for accuracy and
``1.05 x reference`` for loss (``reference -/+ 0.05 |reference|`` in general). The report
states the target and which rule chose it. A seed *reaches* the target at the first logged
step whose metric is ``>=`` (accuracy) or ``<=`` (loss) the target; steps-, time- and
megabytes-to-target are that record's ``step``, ``time_s`` and ``comm_bytes / 1e6``. A
group's value is the mean over the seeds that reached the target, shown with how many did;
"vs allreduce" is the ratio of the group's mean to the allreduce group's mean ("not
reached" when no seed of the group reached it, "n/a" when no allreduce seed did).

**Final metrics.** ``eval_*`` from the summary record (the last evaluation), else from the
last step record; ``rank0_eval_*`` and ``consensus_distance`` from the last step record;
``time_s`` and ``steps_per_s`` from the summary. Shown as mean +- sample standard deviation
over seeds. Bytes per step is rank 0's cumulative ``comm_bytes`` over ``steps``, and the
same for the summary's ``comm_bytes_mean`` (mean over workers) when present.

**Verdict.** Right after each section's time-to-target table, a short list:

* which group reaches the target first in steps, in wall time and in megabytes (the group
  with the lowest mean over its seeds that reached the target, with how many did; ties are
  all named; "none reached the target" when no seed did);
* for each group other than ``allreduce``: the difference of the mean final test metric,
  group minus ``allreduce``, with its sign and which is better (accuracy higher, loss
  lower), and whether the two are *separable*. The rule: two groups are separable when each
  has at least 2 finished seeds with a final value of the metric and their seed ranges
  ``[min, max]`` of that final value do not overlap (touching ends overlap); otherwise they
  are "not separable at this scale" (the difference is within the spread of the seeds, or
  there are too few seeds to know). Without an ``allreduce`` group the list says there is no
  baseline. ``summary.csv`` has the same as ``final_diff_vs_allreduce`` and
  ``separable_vs_allreduce`` (``yes`` / ``no``; empty for the baseline and without one).

**Tuning.** ``accord bench --tune KEY=V1,V2,...`` runs each arm's grid on each tuning seed
on the ``val`` split, picks each arm's best point by its mean over the tuning seeds, then
runs the evaluation seeds on the test split at the chosen values; it writes a
``tuning.json`` in each bench group directory. Every file named ``tuning.json`` under
``RUNS_DIR`` (recursively) gives a subsection of "Tuning": its directory, the grid (several
keys mean their cartesian product), the tuning seeds, the split and the metric; then per
(task, workers) a table with one row per arm and one column per grid point (in the grid's
order): the final metric on the split, or ``diverged`` / ``failed`` / ``not run``; with
several tuning seeds, the mean ``± `` the sample std (or the point's status), then each
seed's value or status in seed order, e.g. ``0.95 ± 0.01 (0.94, 0.95, 0.96)`` or
``diverged (0.94, diverged, 0.96)``; the chosen point in bold and a "chosen" column.
Its figure ``figures/tuning_<task>_w<workers>.png`` (``-2``, ``-3``, ... appended when
several files tune the same task and workers) plots the metric (the mean over the tuning
seeds, with a +- one-std error bar when there are several) against the tuned value, one
line per arm in the arm's label colour, the chosen point as a star and the points without
a value as crosses on the lower edge; the x axis is logarithmic when the values are all
positive and span more than a factor 10, and categorical when they are not all numbers.
With several keys there is one panel per key, and an arm's line in a panel holds only its
points whose other keys are at that arm's chosen values (an arm with nothing chosen has no
line there). Under a section's settings table, a note names the keys tuned for its labels
(e.g. "lr chosen per arm on the val split, seeds 100, 101, 102: see Tuning"), and says so
when the evaluation runs' config differs from the chosen value. A ``tuning.json`` that
cannot be read or does not have the shape of :mod:`accord.tuning` (version 2, or version 1
of a single tuning seed: ``accord.tuning.SCHEMAS``) is one warning line naming the field and
is skipped.

**Emulated network.** When a section's runs emulated a network (``config.network`` or
``config.network_profile``, ``accord train --network``), a line under its settings table
names each group's link and states the cost model (``NETWORK_FORMULA``): their wall times
and times to target are emulated-network times.

**Links.** Each (task, workers) with sections on 2 or more networks gets a subsection of
"Links" comparing them, one column per network, fastest first (as above). It uses ONE
target for every network: the target the section of the fastest network chose (by the
rule of **Target**, or the one given; the fastest network with a target when the fastest
has none), said with its rule; so a column's times may differ from that section's own
table when its own default target differs. Two tables, one row per label (baseline first):

* *time to target by link* -- the mean ``time_s`` at which the seeds reached that target,
  over the seeds that did, with "n/m" seeds reached; "not reached (0/m)" when none did,
  "-" when the label did not run on that network;
* *final metric by link* -- the section's final test metric, mean +- std over seeds.

A link is placed by :func:`accord.network.parse_network` (bandwidth in bytes/s); a
profile by its default link, read from its file (as given, else relative to the run
directory and its parents up to ``RUNS_DIR``), which the report says; a profile whose file
cannot be read is placed last and is left out of the figure, as is the real network. The
figure ``figures/<task>_w<workers>_links.png``: time to target (y; logarithmic when the
plotted values span more than a factor 10) against the link's bandwidth (x, logarithmic,
in Gbit/s, one tick per link), one line per label in its colour; a label that did not
reach the target on a link has no point there (and "(not reached)" in the legend when it
reached it nowhere).

**Figures.** For each section, three PNG files with two panels each (training ``loss``,
the mean over workers, and the test metric): against ``step``, against wall time
(``time_s``) and against megabytes sent by rank 0 (``comm_bytes / 1e6``). Each line is the
mean over the seeds of a group, with a band from the minimum to the maximum seed; seeds are
aligned by step (the steps logged by every seed), and against time or megabytes the x of a
point is the mean over seeds of that step's ``time_s`` or megabytes. Each label has the same
colour in every figure: the sorted labels of the whole report take a fixed palette in turn.
The y axis of a loss panel is logarithmic when its values span more than two decades. The
default target is drawn as a dashed line on the test-metric panels.

**Files written** to ``DIR`` (default ``RUNS_DIR``):

* ``report.md`` -- environment (accord, torch and Python versions, CPU count, host names,
  git revisions, as recorded in the runs' headers; the run start dates and the report's
  date), then per section: the groups' settings (and the network and tuning notes), the
  final-metrics table, the communication and time-to-target table, the verdict, the
  membership of fault-tolerant runs (``accord train --fault-tolerant``: participants per
  step from the ``membership`` events, each run's changes, its fewest participants,
  discarded steps and respawns, and a figure of participants against step) and the
  figures; then links, tuning, diverged runs, failed, interrupted and incomplete runs, and
  the warnings;
* ``figures/<task>_w<workers>_{step,time,mb}.png`` for a section of the real network,
  ``figures/<task>_w<workers>_net-<link>_{step,time,mb}.png`` for an emulated one (``<link>``
  is the network's text with every run of characters other than letters, digits and dots
  made one ``-``: ``100mbit,5ms`` is ``100mbit-5ms``; ``-2``, ... appended if two networks
  would share it), ``figures/<task>_w<workers>_links.png``,
  ``figures/tuning_<task>_w<workers>.png`` and, for a section with fault-tolerant runs,
  ``figures/<slug>_participants.png``;
* ``points.csv`` -- every plotted point of every finished seed: task, workers, network
  (the network's text, empty for the real network), label, seed, run, step, time_s,
  mb_sent, loss and the evaluation columns;
* ``summary.csv`` -- one row per group (with the same ``network`` column): every number of
  the report's tables at full precision, and the verdict against ``allreduce``.

From Python: ``write_report(runs_dir, out_dir=None, target_acc=None, target_loss=None,
figures=True, warn=None)`` returns the path of ``report.md`` and raises
:class:`ReportError` (one line) when ``RUNS_DIR`` does not exist or holds no readable run;
``add_parser(subparsers)`` and ``run(args)`` are the ``accord report`` command. Figures
need matplotlib (the ``plots`` extra, imported only when drawing); without it the report
is written without figures.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import os
import re
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..failures import StorageError, storage_error
from ..metrics import Outcome, run_outcome, scan_metrics
from ..network import Link, load_network_profile, parse_network
from ..schema import SchemaError
from ..tuning import TUNING_FILE, Tuning, TuningArm, TuningPoint, scalar_key, setting_key
from ..tuning import load as load_tuning

log = logging.getLogger(__package__)  # accord.report, as before the move

PROG = "accord report"
BASELINE = "allreduce"
ACC_FACTOR = 0.95  # default accuracy target: 0.95 x reference
LOSS_FACTOR = 1.05  # default loss target: 1.05 x reference
LOG_SPAN = 100.0  # log y axis for a loss panel whose values span more than two decades
FIGURE_DIR = "figures"
# tab10, then the darker halves of tab20b / Dark2: distinct on white, fixed order.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39",
           "#7b4173", "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e")
LINESTYLES = ("-", "--", ":", "-.")
ENV_KEYS = (("accord", "accord_version"), ("torch", "torch_version"),
            ("python", "python_version"), ("platform", "platform"), ("host", "hostname"),
            ("cpu count", "cpu_count"), ("git revision", "git_revision"))
SAME_IN_GROUP = ("algorithm", "hyperparameters", "steps", "optimizer", "lr", "batch_size",
                 "accum_steps", "momentum", "weight_decay", "oracle_lr")
X_AXES = (("step", "step"), ("time", "wall time (s)"), ("mb", "MB sent by rank 0"))

Warn = Callable[[str], None]


class ReportError(Exception):
    """A report that cannot be made, said in one line."""


# -- reading runs -------------------------------------------------------------------------

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
    def seed(self) -> int:
        seed = self.config.get("seed", 0)
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else 0

    @property
    def error(self) -> str:
        """The cause of a run that did not end ok, in one line (see the module docstring)."""
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
    # records that break their type's schema (accord.metrics.RECORD_SCHEMAS): one warning
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


# -- tuning.json (its one schema: accord.tuning) -----------------------------------------------

def _arms_of(t: Tuning, task: str, workers: int) -> list[TuningArm]:
    """The arms of one (task, workers), the baseline first, then by label."""
    arms = [a for a in t.arms if (a.task, a.workers) == (task, workers)]
    return sorted(arms, key=lambda a: (a.label != BASELINE, a.label))


def _fmt_value(value: Any) -> str:
    """A grid value: 0.001, 3e-05, 0.9, 128, sgd."""
    if isinstance(value, float) and not isinstance(value, bool):
        return f"{value:g}"
    return value if isinstance(value, str) else json.dumps(value)


def _fmt_setting(setting: dict[str, Any] | None) -> str:
    if not setting:
        return "none"
    return ", ".join(f"{k}={_fmt_value(v)}" for k, v in setting.items())


def _fmt_seeds(seeds: list[int]) -> str:
    """``seed 100`` or ``seeds 100, 101, 102`` (empty when the file names none)."""
    if not seeds:
        return ""
    return f"seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}"


def load_tunings(root: Path, warn: Warn) -> list[Tuning]:
    """Every readable tuning.json under root; one warning per file that is not (naming the
    field, see accord.tuning.SCHEMAS)."""
    tunings = []
    for path in sorted(p for p in root.rglob(TUNING_FILE) if p.is_file()):
        name = _relative(path.parent, root)
        where = _relative(path, root)
        try:
            tunings.append(load_tuning(path, where, name))
        except OSError as e:
            warn(f"{where}: cannot be read ({e.strerror or e}); skipped")
        except SchemaError as e:
            warn(f"{where}: not a tuning file ({e.detail()}); skipped")
    return tunings


# -- numbers per run and per group ----------------------------------------------------------

def final_values(run: Run) -> dict[str, float | None]:
    """The run's final metrics (see the module docstring)."""
    last = run.steps[-1] if run.steps else {}
    summary = run.summary or {}
    values: dict[str, float | None] = {}
    for key in [*last, *summary]:
        if _is_eval_key(key) and key not in values:
            if key.startswith("eval_") and key in summary:
                values[key] = _num(summary[key])
            else:
                values[key] = _num(last.get(key))
    steps = _num(summary.get("steps")) or _num(last.get("step"))
    time_s = _num(summary.get("time_s"))
    if time_s is None:
        time_s = _num(last.get("time_s"))
    speed = _num(summary.get("steps_per_s"))
    if speed is None and steps and time_s:
        speed = steps / time_s
    comm = _num(summary.get("comm_bytes"))
    if comm is None:
        comm = _num(last.get("comm_bytes"))
    comm_mean = _num(summary.get("comm_bytes_mean"))
    values.update({
        "time_s": time_s, "steps_per_s": speed, "steps": steps,
        "mb_sent": comm / 1e6 if comm is not None else None,
        "bytes_per_step": comm / steps if comm is not None and steps else None,
        "bytes_per_step_mean_workers":
            comm_mean / steps if comm_mean is not None and steps else None,
    })
    return values


def reach(run: Run, metric: str, target: float, higher: bool) -> dict[str, float] | None:
    """The first step record whose metric reaches the target: step, time_s, mb."""
    for rec in run.steps:
        value = _num(rec.get(metric))
        if value is not None and (value >= target if higher else value <= target):
            comm = _num(rec.get("comm_bytes"))
            return {"step": float(rec["step"]), "time_s": _num(rec.get("time_s")),
                    "mb": comm / 1e6 if comm is not None else None}
    return None


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def _std(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.stdev(vals) if len(vals) >= 2 else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


@dataclass
class Group:
    task: str
    workers: int
    label: str
    runs: list[Run]
    finals: list[dict[str, float | None]] = field(default_factory=list)
    reached: list[dict[str, float] | None] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    def mean(self, key: str) -> float | None:
        return _mean(f.get(key) for f in self.finals)

    def std(self, key: str) -> float | None:
        return _std(f.get(key) for f in self.finals)

    def count(self, key: str) -> int:
        return sum(f.get(key) is not None for f in self.finals)

    def to_target(self, key: str) -> float | None:
        return _mean(r[key] for r in self.reached if r is not None)

    @property
    def n_reached(self) -> int:
        return sum(r is not None for r in self.reached)


def _slug(task: str, workers: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '-', task)}_w{workers}"


# -- emulated networks ------------------------------------------------------------------------

NetworkKey = tuple  # () for the real network; see _network_key


def _network_key(text: str | None) -> NetworkKey:
    """What makes two runs' networks the same: the parsed link (``100mbit,5ms`` and
    ``100Mbit/s,5ms`` are one link), a profile's path, else the text."""
    if text is None:
        return ()
    if text.startswith("profile "):
        return ("profile", text[len("profile "):])
    try:
        link = parse_network(text)
    except ValueError:
        return ("text", text)
    return ("link", link.bandwidth, link.latency)


@dataclass(frozen=True)
class NetworkInfo:
    """A section's network: its text as the runs gave it (None: the real network), the
    link that places it among the others (a profile's default link; None when unknown)
    and how it was placed, for a profile."""
    text: str | None = None
    link: Link | None = None
    note: str = ""

    @property
    def order(self) -> tuple:
        """Fastest first: the real network (nothing emulated), then by bandwidth (higher
        first) and latency (lower first), then the networks of unknown bandwidth."""
        if self.text is None:
            return (0, 0.0, 0.0, "")
        if self.link is None:
            return (2, 0.0, 0.0, self.text)
        return (1, -self.link.bandwidth, self.link.latency, self.text)

    @property
    def name(self) -> str:
        return self.text if self.text is not None else "real network"


def _network_info(run: Run, root: Path | None) -> NetworkInfo:
    text = run.network
    key = _network_key(text)
    if not key:
        return NetworkInfo()
    if key[0] == "link":
        return NetworkInfo(text, Link(key[1], key[2]))
    if key[0] == "text":
        return NetworkInfo(text, None, "not a link this report can read, so its bandwidth "
                                       "is unknown")
    path = Path(key[1])
    candidates = [path]
    if not path.is_absolute():  # as given (the working directory), then from the run up
        folder = run.path
        while True:
            candidates.append(folder / path)
            if folder == root or folder.parent == folder or root is None:
                break
            folder = folder.parent
    for candidate in candidates:
        if candidate.is_file():
            try:
                default = load_network_profile(candidate).default
            except ValueError as e:
                return NetworkInfo(text, None, f"its file cannot be read ({e}), so its "
                                               "bandwidth is unknown")
            return NetworkInfo(text, default, f"placed by its default link, "
                                              f"{default.describe()} (the pairs with a link "
                                              "of their own are not taken into account)")
    return NetworkInfo(text, None, "its file was not found, so its bandwidth is unknown")


def _network_slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "x"


@dataclass
class Section:
    task: str
    workers: int
    groups: list[Group]  # baseline first, then by label
    metric: str = "eval_loss"
    higher: bool = False
    target: float | None = None
    target_rule: str = ""
    network: NetworkInfo = field(default_factory=NetworkInfo)
    network_key: NetworkKey = ()
    slug: str = ""  # figure file names: <task>_w<workers>[_net-<link>]

    def __post_init__(self) -> None:
        if not self.slug:
            self.slug = _slug(self.task, self.workers)
            if self.network.text is not None:
                self.slug += f"_net-{_network_slug(self.network.text)}"

    @property
    def baseline(self) -> Group | None:
        return next((g for g in self.groups if g.label == BASELINE), None)

    @property
    def title(self) -> str:
        title = f"{self.task}, {self.workers} worker{'s' if self.workers != 1 else ''}"
        if self.network.text is not None:
            title += f", network {self.network.text} (emulated)"
        return title


def _setting(run: Run, key: str) -> Any:
    if key == "algorithm":
        return run.algorithm
    if key == "hyperparameters":
        return (run.header or {}).get("hyperparameters", run.config.get(key))
    return run.config.get(key)


def build_sections(runs: list[Run], target_acc: float | None, target_loss: float | None,
                   warn: Warn, root: Path | None = None) -> list[Section]:
    """The sections (task, workers, network) with their groups, targets and seeds reached;
    ``root`` is where relative network profile paths are also looked for."""
    infos: dict[NetworkKey, NetworkInfo] = {}
    by_group: dict[tuple[str, int, NetworkKey, str], list[Run]] = {}
    for run in runs:
        key = _network_key(run.network)
        if key not in infos:
            infos[key] = _network_info(run, root)
        by_group.setdefault((run.task, run.workers, key, run.label), []).append(run)
    by_section: dict[tuple[str, int, NetworkKey], list[Group]] = {}
    for (task, workers, key, label), members in sorted(by_group.items()):
        members.sort(key=lambda r: (r.seed, r.name))
        text = infos[key].text
        where = f"{task} x{workers}" + (f" (network {text})" if text is not None else "") \
            + f" {label}"
        for seed, n in Counter(r.seed for r in members).items():
            if n > 1:
                warn(f"{where}: {n} finished runs with seed {seed}; all are counted as "
                     "repetitions")
        for setting in SAME_IN_GROUP:
            values = sorted({json.dumps(_setting(r, setting), sort_keys=True)
                             for r in members})
            if len(values) > 1:
                warn(f"{where}: the runs differ in {setting} "
                     f"({', '.join(values)}); use --label to tell variants apart")
        group = Group(task, workers, label, members, [final_values(r) for r in members])
        by_section.setdefault((task, workers, key), []).append(group)
    sections = []
    slugs: set[str] = set()
    for (task, workers, key), groups in sorted(
            by_section.items(), key=lambda kv: (kv[0][0], kv[0][1], infos[kv[0][2]].order)):
        groups.sort(key=lambda g: (g.label != BASELINE, g.label))
        section = Section(task, workers, groups, network=infos[key], network_key=key)
        slug, n = section.slug, 1
        while section.slug in slugs:  # two networks with the same safe form
            n += 1
            section.slug = f"{slug}-{n}"
        slugs.add(section.slug)
        has_acc = any(_num(rec.get("eval_acc")) is not None
                      for g in groups for r in g.runs for rec in r.steps)
        section.metric, section.higher = ("eval_acc", True) if has_acc else ("eval_loss", False)
        _choose_target(section, target_acc if has_acc else target_loss)
        for group in groups:
            group.reached = ([reach(r, section.metric, section.target, section.higher)
                              for r in group.runs] if section.target is not None
                             else [None] * len(group.runs))
        sections.append(section)
    return sections


def _choose_target(section: Section, given: float | None) -> None:
    metric = section.metric
    if given is not None:
        option = "--target-acc" if section.higher else "--target-loss"
        section.target, section.target_rule = given, f"given ({option})"
        return
    base = section.baseline
    reference = base.mean(metric) if base is not None else None
    if reference is not None:
        whose = f"the {BASELINE} group's mean final {metric}"
    else:
        means = [(g.mean(metric), g.label) for g in section.groups
                 if g.mean(metric) is not None]
        if not means:
            section.target, section.target_rule = None, f"no final {metric}"
            return
        reference, label = (min if section.higher else max)(means)
        worst = "lowest" if section.higher else "highest"
        whose = f"the {worst} mean final {metric} among groups ({label})"
    if section.higher:
        section.target = reference - (1 - ACC_FACTOR) * abs(reference)
        section.target_rule = f"default: {ACC_FACTOR:g} x {whose}, {_fmt(reference)}"
    else:
        section.target = reference + (LOSS_FACTOR - 1) * abs(reference)
        section.target_rule = f"default: {LOSS_FACTOR:g} x {whose}, {_fmt(reference)}"


# -- formatting -------------------------------------------------------------------------------

def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):d}" if abs(value) < 1e6 else f"{value:.{digits}g}"
    return f"{value:.{digits}g}"


def _fmt_bytes(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def _table(head: list[str], rows: list[list[str]], numeric: bool = True) -> list[str]:
    """A markdown table; numeric: every column after the first right-aligned."""
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---:" if i and numeric else "---" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def metric_columns(keys: Iterable[str]) -> list[str]:
    """Evaluation keys in report order: eval_loss, eval_acc, other eval_*, rank0_*, distance."""
    keys = set(keys)

    def order(k: str) -> tuple:
        fixed = {"eval_loss": 0, "eval_acc": 1, "consensus_distance": 4}
        return (fixed.get(k, 2 if k.startswith("eval_") else 3), k)

    return sorted(keys, key=order)


def _section_metrics(section: Section) -> list[str]:
    keys = {k for g in section.groups for f in g.finals for k, v in f.items()
            if _is_eval_key(k) and v is not None}
    return metric_columns(keys)


def _mean_std(group: Group, key: str) -> str:
    mean, std, n = group.mean(key), group.std(key), group.count(key)
    if mean is None:
        return "-"
    text = _fmt(mean) + (f" ± {_fmt(std, 2)}" if std is not None else "")
    return text + (f" (n={n})" if n < len(group.runs) else "")


def _to_target_cell(group: Group, key: str, section: Section) -> str:
    if section.target is None:
        return "-"
    if group.n_reached == 0:
        return "not reached"
    return _fmt(group.to_target(key))


def _vs_baseline(group: Group, key: str, section: Section) -> tuple[str, float | None]:
    base = section.baseline
    if base is None or section.target is None:
        return "-", None
    if group.n_reached == 0:
        return "not reached", None
    if base.n_reached == 0:
        return f"n/a ({BASELINE} not reached)", None
    ratio = _ratio(group.to_target(key), base.to_target(key))
    return (f"{ratio:.3g}x" if ratio is not None else "-"), ratio


# -- the report ----------------------------------------------------------------------------

def _environment(runs: list[Run]) -> list[str]:
    headers = [r.header for r in runs if r.header is not None]
    rows = []
    for name, key in ENV_KEYS:
        counts = Counter(str(h.get(key)) for h in headers if h.get(key) is not None)
        if not counts:
            rows.append([name, "-"])
        elif len(counts) == 1:
            rows.append([name, _md(next(iter(counts)))])
        else:
            rows.append([name, ", ".join(f"{_md(v)} ({n} run{'s' * (n != 1)})"
                                         for v, n in sorted(counts.items()))])
    started = sorted(str(h["started"]) for h in headers if h.get("started"))
    if started:
        rows.append(["runs started", started[0] if started[0] == started[-1]
                     else f"{started[0]} to {started[-1]}"])
    rows.append(["report date", time.strftime("%Y-%m-%dT%H:%M:%S%z")])
    return ["| | |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]


def _settings_table(section: Section) -> list[str]:
    rows = []
    for g in section.groups:
        def distinct(get: Callable[[Run], Any], g: Group = g) -> str:
            values = []
            for r in g.runs:
                text = get(r)
                if text not in values:
                    values.append(text)
            return "; ".join(values)

        rows.append([
            _md(g.label), _md(distinct(lambda r: r.algorithm)),
            _md(distinct(lambda r: json.dumps((r.header or {}).get("hyperparameters", {}),
                                              sort_keys=True))),
            _md(distinct(lambda r: str(r.config.get("optimizer", "-")))),
            _md(distinct(lambda r: "task default" if r.config.get("lr") is None
                         else str(r.config.get("lr")))),
            _md(distinct(lambda r: str(r.config.get("steps", "-")))),
            ", ".join(str(s) for s in g.seeds)])
    return _table(["label", "algorithm", "hyperparameters", "optimizer", "lr", "steps",
                   "seeds"], rows, numeric=False)


#: the emulated network's cost model, as the report states it (see accord.network)
NETWORK_FORMULA = ("each communication call waits at least its alpha-beta time on the link "
                   "(alpha = latency, beta = 1/bandwidth; N ranks, payload M): allreduce "
                   "2(N-1) alpha + 2(N-1)/N M beta, all-gather (N-1)(alpha + m beta) for a "
                   "contribution m, broadcast ceil(log2 N)(alpha + M beta), send and exchange "
                   "alpha + M beta; computation is not slowed")


def _network_note(section: Section) -> list[str]:
    """A line saying the network was emulated (wall times include the emulated waits),
    with the link of each group and the formula; nothing for runs on the real network."""
    links = []
    for g in section.groups:
        for r in g.runs:
            link = r.config.get("network") or (
                f"profile {r.config['network_profile']}" if r.config.get("network_profile")
                else None)
            if link and (g.label, link) not in links:
                links.append((g.label, link))
    if not links:
        return []
    where = "; ".join(f"{_md(label)}: {_md(link)}" for label, link in links)
    return [f"**Emulated network** ({where}): wall times and time to target include the "
            f"emulated waits; {NETWORK_FORMULA}.", ""]


# -- links: one (task, workers) on several networks --------------------------------------------

@dataclass
class LinkComparison:
    """The sections of one (task, workers) on 2 or more networks, against one target."""
    task: str
    workers: int
    sections: list[Section]  # fastest first (NetworkInfo.order)
    source: Section | None  # the section whose target is used: the fastest with one
    metric: str
    higher: bool
    target: float | None
    labels: list[str]  # baseline first, then sorted
    #: (label, index in sections) -> (seeds reached, seeds, mean time_s of those reached)
    cells: dict[tuple[str, int], tuple[int, int, float | None]]

    @property
    def title(self) -> str:
        return f"{self.task}, {self.workers} worker{'s' if self.workers != 1 else ''}"

    @property
    def figure(self) -> str:
        return f"{_slug(self.task, self.workers)}_links.png"

    def time(self, label: str, i: int) -> float | None:
        """The mean time to the target on section i, None when not reached or not run."""
        cell = self.cells.get((label, i))
        return cell[2] if cell is not None and cell[0] > 0 else None


def link_comparisons(sections: list[Section]) -> list[LinkComparison]:
    """One comparison per (task, workers) with sections on 2 or more networks."""
    by: dict[tuple[str, int], list[Section]] = {}
    for s in sections:
        by.setdefault((s.task, s.workers), []).append(s)
    comparisons = []
    for (task, workers), mine in sorted(by.items()):
        if len(mine) < 2:
            continue
        mine = sorted(mine, key=lambda s: s.network.order)
        source = next((s for s in mine if s.target is not None), None)
        ref = source or mine[0]
        target = source.target if source is not None else None
        labels = sorted({g.label for s in mine for g in s.groups},
                        key=lambda label: (label != BASELINE, label))
        cells = {}
        for i, s in enumerate(mine):
            for g in s.groups:
                hits = [reach(r, ref.metric, target, ref.higher) for r in g.runs] \
                    if target is not None else []
                cells[g.label, i] = (sum(h is not None for h in hits), len(g.runs),
                                     _mean(h["time_s"] for h in hits if h is not None))
        comparisons.append(LinkComparison(task, workers, mine, source, ref.metric, ref.higher,
                                          target, labels, cells))
    return comparisons


def _link_cell(c: LinkComparison, label: str, i: int) -> str:
    cell = c.cells.get((label, i))
    if cell is None or c.target is None:
        return "-"
    n, m, t = cell
    return f"not reached (0/{m})" if n == 0 else f"{_fmt(t)} ({n}/{m})"


def _links_tables(c: LinkComparison) -> list[str]:
    head = ["label", *[_md(s.network.name) for s in c.sections]]
    times = [[_md(label), *[_link_cell(c, label, i) for i in range(len(c.sections))]]
             for label in c.labels]
    finals = []
    for label in c.labels:
        row = [_md(label)]
        for s in c.sections:
            group = next((g for g in s.groups if g.label == label), None)
            row.append(_mean_std(group, c.metric) if group is not None else "-")
        finals.append(row)
    return [f"#### {_md(c.title)}: time to target by link (s)", "",
            "Mean time to the target over the seeds that reached it, with seeds reached / "
            "seeds.", "", *_table(head, times), "",
            f"#### {_md(c.title)}: final {c.metric} by link (mean ± std over seeds)", "",
            *_table(head, finals), ""]


def _links_section(comparisons: list[LinkComparison], drawn: dict[str, str]) -> list[str]:
    lines = ["## Links", "",
             "The same task and workers on several networks (`accord train --network` or "
             "`--network-profile`): one column per network, fastest first (the real "
             "network, nothing emulated, then by bandwidth). On an emulated link "
             f"{NETWORK_FORMULA}; the final metric should not depend on the link, the "
             "time to target does.", ""]
    for c in comparisons:
        lines += [f"### {_md(c.title)}", ""]
        if c.source is None:
            lines += [f"Target: none (no section of {_md(c.title)} has one).", ""]
        else:
            direction = ">=" if c.higher else "<="
            fastest = c.sections[0]
            whose = f"the section of the fastest network ({_md(fastest.network.name)})"
            if c.source is not fastest:
                whose = (f"the section of the fastest network with a target "
                         f"({_md(c.source.network.name)}; {_md(fastest.network.name)} has "
                         "none)")
            lines += [f"Target: `{c.metric} {direction} {_fmt(c.target)}`, for every network "
                      f"the one {whose} chose ({_md(c.source.target_rule)}), so that the "
                      "columns compare; a section's own target may differ.", ""]
        for s in c.sections:
            if s.network.note:
                lines += [f"`{_md(s.network.text)}`: {_md(s.network.note)}.", ""]
        lines += _links_tables(c)
        name = drawn.get(c.figure)
        if name:
            left = [s.network.name for s in c.sections if s.network.link is None]
            caption = ("Time to target against the link's bandwidth, one line per label; a "
                       "label that did not reach the target on a link has no point there.")
            if left:
                caption += f" Not in the figure (no bandwidth): {_md(', '.join(left))}."
            lines += [caption, "", f"![{_md(c.title)}: time to target by link]"
                                   f"({FIGURE_DIR}/{name})", ""]
    return lines


def _final_table(section: Section) -> list[str]:
    keys = _section_metrics(section) + ["time_s", "steps_per_s"]
    rows = [[_md(g.label), str(len(g.runs))] + [_mean_std(g, k) for k in keys]
            for g in section.groups]
    return _table(["label", "seeds"] + keys, rows)


def _target_table(section: Section) -> list[str]:
    rows = []
    for g in section.groups:
        rows.append([
            _md(g.label), _fmt_bytes(g.mean("bytes_per_step")),
            _fmt_bytes(g.mean("bytes_per_step_mean_workers")), _fmt(g.mean("mb_sent")),
            _to_target_cell(g, "step", section), _to_target_cell(g, "time_s", section),
            _to_target_cell(g, "mb", section),
            f"{g.n_reached}/{len(g.runs)}" if section.target is not None else "-",
            _vs_baseline(g, "step", section)[0], _vs_baseline(g, "time_s", section)[0]])
    return _table(["label", "bytes/step (rank 0)", "bytes/step (mean over workers)",
                   "MB sent (rank 0)", "steps to target", "time to target (s)",
                   "MB to target", "seeds reached", f"steps vs {BASELINE}",
                   f"time vs {BASELINE}"], rows)


def _who(r: Run) -> list[str]:
    return [_md(r.label) if r.header else "-", _md(r.task) if r.header else "-",
            str(r.workers) if r.header else "-", str(r.seed) if r.header else "-"]


def _problems_table(problems: list[Run]) -> list[str]:
    rows = []
    for r in problems:
        last = r.steps[-1]["step"] if r.steps else "-"
        error = r.error if len(r.error) <= 300 else r.error[:297] + "..."
        rows.append([f"`{_md(r.name)}`", r.status, *_who(r), str(last), _md(error)])
    return _table(["run", "status", "label", "task", "workers", "seed", "last step",
                   "cause"], rows, numeric=False)


def _left_out(section: Section, diverged: list[Run]) -> list[str]:
    """A line naming the section's diverged runs, which its numbers leave out."""
    mine = [r for r in diverged if (r.task, r.workers, _network_key(r.network))
            == (section.task, section.workers, section.network_key)]
    if not mine:
        return []
    names = ", ".join(f"{_md(r.label)} seed {r.seed} (diverged at step {_diverged_step(r)})"
                      for r in mine)
    return [f"Not in these numbers: {names}; see Diverged runs.", ""]


# -- verdict ----------------------------------------------------------------------------------

TO_TARGET = (("step", "in steps", " steps"), ("time_s", "in wall time", " s"),
             ("mb", "in MB", " MB"))


def _first_to_target(section: Section, key: str, unit: str) -> str:
    """The group(s) with the lowest mean to-target value, with their seeds reached."""
    if section.target is None:
        return "no target"
    reached = [g for g in section.groups if g.n_reached > 0]
    if not reached:
        return "none reached the target"
    values = [(g.to_target(key), g) for g in reached if g.to_target(key) is not None]
    if not values:
        return "not logged"
    best = min(v for v, _ in values)
    winners = [g for v, g in values if v == best]
    names = " and ".join(_md(g.label) for g in winners)
    seeds = ", ".join(f"{g.n_reached}/{len(g.runs)} seeds" for g in winners)
    return f"{names} ({_fmt(best)}{unit}, {seeds} reached it)"


@dataclass
class Comparison:
    """A group's final test metric against the baseline's (see the module docstring)."""
    diff: float | None  # mean(group) - mean(baseline)
    separable: bool
    why: str  # the ranges, or what is missing


def compare(group: Group, base: Group, metric: str) -> Comparison:
    mine = [v for v in (f.get(metric) for f in group.finals) if v is not None]
    theirs = [v for v in (f.get(metric) for f in base.finals) if v is not None]
    if not mine or not theirs:
        who = group.label if not mine else base.label
        return Comparison(None, False, f"{who} has no final {metric}")
    diff = statistics.fmean(mine) - statistics.fmean(theirs)
    few = [(g.label, len(v)) for g, v in ((group, mine), (base, theirs)) if len(v) < 2]
    if few:
        label, n = few[0]
        return Comparison(diff, False, f"{label} has {n} finished seed; 2 needed")
    ranges = f"seed ranges [{_fmt(min(mine))}, {_fmt(max(mine))}] and " \
             f"[{_fmt(min(theirs))}, {_fmt(max(theirs))}]"
    apart = max(mine) < min(theirs) or max(theirs) < min(mine)
    return Comparison(diff, apart, ranges + (" do not overlap" if apart else " overlap"))


def _membership_runs(section: Section) -> list[tuple[Group, Run]]:
    return [(g, r) for g in section.groups for r in sorted(g.runs, key=lambda r: r.seed)
            if r.membership]


def _membership(section: Section, figure: str | None) -> list[str]:
    """The membership of the section's fault-tolerant runs (nothing for fixed worlds)."""
    runs = _membership_runs(section)
    if not runs:
        return []
    rows = []
    for g, r in runs:
        changes = [f"{n} (step {step})" for step, n in r.membership]
        respawns = (r.summary or {}).get("respawns")
        rows.append([_md(g.label), str(r.seed), " → ".join(changes),
                     str(min(n for _, n in r.membership)), str(r.discarded),
                     "" if respawns is None else str(respawns)])
    lines = ["### Membership (fault-tolerant runs)", "",
             "Participants at the start and after every change (the step of the first "
             "quorum with the new membership); discarded: steps a worker rolled back "
             "(one per worker and step).", "",
             *_table(["label", "seed", "participants", "fewest", "discarded", "respawns"],
                     rows), ""]
    if figure:
        lines += [f"![{_md(section.title)}: participants against step]"
                  f"({FIGURE_DIR}/{figure})\n"]
    return lines


def _verdict(section: Section) -> list[str]:
    firsts = "; ".join(f"{where}, {_first_to_target(section, key, unit)}"
                       for key, where, unit in TO_TARGET)
    lines = ["**Verdict.**", "", f"- First to the target: {firsts}."]
    base = section.baseline
    if base is None:
        lines.append(f"- No {BASELINE} group in this section: no baseline to compare the "
                     "final metric with.")
        return lines + [""]
    metric = section.metric
    for g in section.groups:
        if g is base:
            continue
        c = compare(g, base, metric)
        if c.diff is None:
            lines.append(f"- {_md(g.label)} vs {BASELINE}: not separable at this scale "
                         f"({_md(c.why)}).")
            continue
        if c.diff == 0:
            better = "equal means"
        else:
            ahead = g.label if (c.diff > 0) == section.higher else BASELINE
            better = f"{_md(ahead)} better"
        judged = "separable" if c.separable else "not separable at this scale"
        lines.append(f"- {_md(g.label)} vs {BASELINE}: final {metric} {c.diff:+.4g} "
                     f"({better}); {judged} ({_md(c.why)}).")
    return lines + [""]


# -- tuning in the report ---------------------------------------------------------------------

def _tuned_note(section: Section, tunings: list[Tuning]) -> list[str]:
    """Under a section's settings table: which keys were tuned for its labels, and any
    evaluation run whose config is not at the chosen value."""
    labels = {g.label: g for g in section.groups}
    lines = []
    for t in tunings:
        arms = [a for a in _arms_of(t, section.task, section.workers) if a.label in labels]
        if not arms:
            continue
        seed = f", {_fmt_seeds(t.seeds)}" if t.seeds else ""
        keys = ", ".join(t.grid)
        chosen = "; ".join(f"{_md(a.label)}: {_md(_fmt_setting(a.chosen))}" for a in arms)
        text = (f"{_md(keys)} chosen per arm on the {_md(t.split)} split{seed} ({chosen}): "
                f"see Tuning (`{_md(t.name)}`).")
        off = []
        for a in arms:
            for key, value in (a.chosen or {}).items():
                wrong: list[Any] = []
                for r in labels[a.label].runs:
                    used = _tuned_value(r, key)
                    if used is not None and scalar_key(used) != scalar_key(value) \
                            and used not in wrong:
                        wrong.append(used)
                if wrong:
                    off.append(f"{_md(a.label)} ran with {key}="
                               f"{', '.join(_md(_fmt_value(v)) for v in wrong)}, not the "
                               f"chosen {_md(_fmt_value(value))}")
        if off:
            text += " Note: " + "; ".join(off) + "."
        lines += [text, ""]
    return lines


def _tuned_value(run: Run, key: str) -> Any:
    """A tuned key's value in an evaluation run, as the bench reads it: ``algo.NAME`` or a
    plain NAME of the algorithm's hyperparameters, else the config field ``NAME`` (also
    for ``train.NAME``); None when the run has neither."""
    name = key.split(".")[-1]
    hyper = (run.header or {}).get("hyperparameters", run.config.get("hyperparameters"))
    if not key.startswith("train.") and isinstance(hyper, dict) and name in hyper:
        return hyper[name]
    return run.config.get(name)


def _point_text(point: TuningPoint) -> str:
    """One seed: its value or status. Several: the mean +- sample std (or the point's
    status), then each seed's value or status in seed order."""
    if point.value is not None:
        text = _fmt(point.value)
        if point.std is not None:
            text += f" ± {_fmt(point.std, 2)}"
    else:
        text = "-" if point.status == "ok" else _md(point.status)
    if len(point.runs) > 1:
        each = ", ".join(_fmt(r.value) if r.value is not None else
                         ("-" if r.status == "ok" else _md(r.status)) for r in point.runs)
        text += f" ({each})"
    return text


def _tuning_cell(point: TuningPoint | None, chosen: bool) -> str:
    if point is None:
        return "-"
    text = _point_text(point)
    return f"**{text}**" if chosen else text


def _tuning_table(t: Tuning, arms: list[TuningArm]) -> list[str]:
    columns = t.columns()
    rows = []
    for a in arms:
        points = {setting_key(p.setting): p for p in a.points}
        chosen = setting_key(a.chosen) if a.chosen else None
        cells = [_tuning_cell(points.get(setting_key(c)), setting_key(c) == chosen)
                 for c in columns]
        pick = _md(_fmt_setting(a.chosen)) if a.chosen else "none"
        point = points.get(chosen) if chosen is not None else None
        if point is not None and point.value is not None:
            pick += f" ({_fmt(point.value)}" + (
                f" ± {_fmt(point.std, 2)})" if point.std is not None else ")")
        elif a.chosen and a.chosen_value is not None:
            pick += f" ({_fmt(a.chosen_value)})"
        rows.append([_md(a.label), *cells, pick])
    return _table(["label", *[_md(_fmt_setting(c)) for c in columns], "chosen"], rows)


def _tuning_section(tunings: list[Tuning], figures: dict[tuple[int, str, int], str]
                    ) -> list[str]:
    lines = ["## Tuning", "",
             "Runs of the tuning seeds on a held-out split, one per arm, grid point and seed: "
             "the final metric, or why there is none. With several tuning seeds a point is "
             "judged by its mean over them (shown ± the sample std, then each seed's value "
             "in seed order); a point with a seed that did not finish is never chosen. The "
             "chosen point of each arm is in bold; its evaluation seeds are run there.", ""]
    for i, t in enumerate(tunings):
        grid = "; ".join(f"{_md(k)} in {{{', '.join(_md(_fmt_value(v)) for v in values)}}}"
                         for k, values in t.grid.items())
        product = " (every combination)" if len(t.grid) > 1 else ""
        metrics = sorted({(a.metric, a.higher) for a in t.arms})
        metric = ", ".join(f"`{_md(m)}` ({'higher' if h else 'lower'} is better)"
                           for m, h in metrics) or "-"
        seeds = (f"Tuning seed{'s' * (len(t.seeds) > 1)}: "
                 f"{', '.join(map(str, t.seeds)) or '-'}")
        if len(t.seeds) > 1:
            seeds += " (each point judged by its mean over them)"
        lines += [f"### `{_md(t.name)}`", "",
                  f"Grid: {grid}{product}. {seeds}. Split: {_md(t.split)}. "
                  f"Metric: {metric}.", ""]
        if not t.arms:
            lines += ["No arm.", ""]
        for task, workers in t.sections():
            title = f"{task}, {workers} worker{'s' if workers != 1 else ''}"
            lines += [f"#### {_md(title)}", "", *_tuning_table(t, _arms_of(t, task, workers)),
                      ""]
            name = figures.get((i, task, workers))
            if name:
                caption = ("One line per arm; a star marks the chosen point, a cross on the "
                           "lower edge a point without a value (see the table).")
                if len(t.grid) > 1:
                    caption += (" One panel per key: an arm's line shows its points whose "
                                "other keys are at that arm's chosen values.")
                lines += [caption, "",
                          f"![{_md(title)}: tuning on the {_md(t.split)} split]"
                          f"({FIGURE_DIR}/{name})", ""]
    return lines


def _set_aside(tuning_runs: list[Run], tunings: list[Tuning]) -> list[str]:
    if not tuning_runs:
        return []
    counts = Counter(r.status for r in tuning_runs)
    by_status = ", ".join(f"{n} {'finished' if status == 'ok' else status}"
                          for status, n in sorted(counts.items()))
    n = len(tuning_runs)
    where = "see Tuning" if tunings else f"no {TUNING_FILE} describes them"
    return [f"Set aside: {n} tuning run{'s' * (n != 1)} (`eval_split` val, evaluated on a "
            f"held-out part of the training data: {by_status}); they are in no number, "
            f"table or figure of the sections; {where}.", ""]


def _diverged_step(r: Run) -> str:
    step = r.outcome.diverged_step
    return "unknown" if step is None else str(step)


def _diverged_table(diverged: list[Run]) -> list[str]:
    rows = [[f"`{_md(r.name)}`", *_who(r), _diverged_step(r),
             "inferred: null evaluation values in a file marked ok" if r.outcome.inferred
             else _md(r.outcome.reason or "-")] for r in diverged]
    return _table(["run", "label", "task", "workers", "seed", "diverged at step", "reason"],
                  rows, numeric=False)


def write_report(runs_dir: str | Path, out_dir: str | Path | None = None, *,
                 target_acc: float | None = None, target_loss: float | None = None,
                 figures: bool = True, warn: Warn | None = None) -> Path:
    """Write report.md, figures/, points.csv and summary.csv; return report.md's path.

    ``figures=False`` skips drawing (the tables and CSV files are the same); ``warn`` gets
    each warning (default: logged)."""
    collected: list[str] = []

    def note(message: str) -> None:
        collected.append(message)
        (warn or log.warning)(message)

    root = Path(runs_dir)
    if not root.is_dir():
        raise ReportError(f"runs directory {str(root)!r} does not exist")
    # an accuracy is a fraction and every task's loss is >= 0: a target outside that range
    # is never reached, and the report would say so of every run instead of refusing it
    for name, value, ok, allowed in (
            ("--target-acc", target_acc, lambda x: 0 <= x <= 1,
             "a number from 0 to 1 (accuracy as a fraction, e.g. 0.9)"),
            ("--target-loss", target_loss, lambda x: x >= 0, "a finite number >= 0")):
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise ReportError(f"{name}: got {value!r}, allowed: {allowed}")
    runs = [load_run(d, root, note) for d in find_runs(root)]
    if not runs:
        raise ReportError(f"no runs (no metrics.jsonl) under {str(root)!r}")
    if not any(r.readable for r in runs):
        raise ReportError(f"no readable run under {str(root)!r}: {len(runs)} run "
                          f"director{'ies' if len(runs) != 1 else 'y'} and none holds a "
                          f"metrics record (first: {runs[0].name}: "
                          f"{runs[0].error})")
    out = Path(out_dir) if out_dir is not None else root
    try:
        out.mkdir(parents=True, exist_ok=True)
        if figures:
            (out / FIGURE_DIR).mkdir(exist_ok=True)
    except OSError as e:
        raise ReportError(f"cannot write to {str(out)!r} ({e.strerror or e})") from None

    tunings = load_tunings(root, note)
    tuning_runs = [r for r in runs if r.tuning]
    evaluated = [r for r in runs if not r.tuning]
    finished = [r for r in evaluated if r.status == "ok"]
    diverged = [r for r in evaluated if r.status == "diverged"]
    problems = [r for r in evaluated if r.status not in ("ok", "diverged")]
    sections = build_sections(finished, target_acc, target_loss, note, root)
    comparisons = link_comparisons(sections)
    labels = sorted({g.label for s in sections for g in s.groups}
                    | {a.label for t in tunings for a in t.arms})
    styles = {label: (PALETTE[i % len(PALETTE)], LINESTYLES[i // len(PALETTE) % len(LINESTYLES)])
              for i, label in enumerate(labels)}

    drawn: dict[str, list[str]] = {}
    links_drawn: dict[str, str] = {}
    members_drawn: dict[str, str] = {}
    tuning_drawn: dict[tuple[int, str, int], str] = {}
    try:
        import matplotlib  # noqa: F401  (the plots extra)
    except ImportError:
        if figures:
            note("figures not drawn: matplotlib is not installed (pip install "
                 "'accord[plots]')")
    else:
        with _writing(out / FIGURE_DIR):  # a full disk, a file-size limit: one line
            for section in sections if figures else []:
                drawn[section.slug] = draw_section(section, styles, out / FIGURE_DIR)
                if _membership_runs(section):
                    name = f"{section.slug}_participants.png"
                    draw_membership(section, styles, out / FIGURE_DIR / name)
                    members_drawn[section.slug] = name
            for c in comparisons if figures else []:
                if draw_links(c, styles, out / FIGURE_DIR / c.figure):
                    links_drawn[c.figure] = c.figure
            taken: set[str] = set()
            for i, t in enumerate(tunings if figures else []):
                for task, workers in t.sections():
                    slug = f"tuning_{_slug(task, workers)}"
                    name, n = f"{slug}.png", 1
                    while name in taken:
                        n += 1
                        name = f"{slug}-{n}.png"
                    taken.add(name)
                    draw_tuning(t, _arms_of(t, task, workers), styles, out / FIGURE_DIR / name)
                    tuning_drawn[i, task, workers] = name

    _replace(out / "points.csv", lambda p: _write_points(p, sections))
    _replace(out / "summary.csv", lambda p: _write_summary(p, sections))

    counts = Counter(r.status for r in evaluated)
    lines = [f"# accord report: {_md(root.resolve().name or root)}", "",
             f"{len(evaluated)} runs under `{_md(root)}`: {counts['ok']} finished, "
             f"{counts['diverged']} diverged, {counts['failed']} failed, "
             f"{counts['interrupted']} interrupted, "
             f"{counts['incomplete'] + counts['unreadable']} incomplete or unreadable. "
             "Only finished runs (status ok) enter the numbers, tables and figures; "
             "diverged runs are listed apart with the step they diverged at. Groups are "
             "(task, workers, network, label) and their seeds are the repetitions. Final "
             "metrics are mean ± sample std over seeds. Files: `points.csv` (every plotted point), "
             "`summary.csv` (these tables at full precision).", "",
             *_set_aside(tuning_runs, tunings), "## Environment", "",
             *_environment(runs), ""]
    for section in sections:
        direction = ">=" if section.higher else "<="
        target = (f"`{section.metric} {direction} {_fmt(section.target)}` "
                  f"({_md(section.target_rule)})" if section.target is not None
                  else f"none ({_md(section.target_rule)})")
        lines += [f"## {_md(section.title)}", "",
                  f"Test metric: `{section.metric}` ({'higher' if section.higher else 'lower'} "
                  f"is better). Target: {target}.", "",
                  *_left_out(section, diverged), "### Groups", "",
                  *_settings_table(section), "", *_network_note(section),
                  *_tuned_note(section, tunings),
                  "### Final metrics (mean ± std over seeds)", "", *_final_table(section), "",
                  "### Communication and time to target", "",
                  "Bytes are payloads handed to collectives, cumulative over the run. To-target "
                  "values are means over the seeds that reached the target.", "",
                  *_target_table(section), "", *_verdict(section),
                  *_membership(section, members_drawn.get(section.slug))]
        if drawn.get(section.slug):
            lines += ["### Figures", "",
                      "Mean over seeds, band from the lowest to the highest seed.", ""]
            lines += [f"![{_md(section.title)}, against {xlabel}]({FIGURE_DIR}/{name})\n"
                      for (_, xlabel), name in zip(X_AXES, drawn[section.slug], strict=True)]
    if not sections:
        lines += ["No finished run.", ""]
    if comparisons:
        lines += _links_section(comparisons, links_drawn)
    if tunings:
        lines += _tuning_section(tunings, tuning_drawn)
    if diverged:
        lines += ["## Diverged runs", "",
                  "Non-finite parameters or evaluation metrics: not averaged into any "
                  "number, table or figure above.", "", *_diverged_table(diverged), ""]
    if problems:
        lines += ["## Failed, interrupted and incomplete runs", "",
                  *_problems_table(problems), ""]
    if collected:
        shown = collected[:50]
        lines += ["## Warnings", "", *[f"- {_md(w)}" for w in shown]]
        if len(collected) > len(shown):
            lines.append(f"- ... and {len(collected) - len(shown)} more")
        lines.append("")
    path = out / "report.md"
    _replace(path, lambda p: p.write_text("\n".join(lines), encoding="utf-8"))
    return path


def _replace(path: Path, write: Callable[[Path], Any]) -> None:
    """``write`` a temporary file, then rename it to ``path``: an earlier report's file stays
    whole unless the new one is; a refused write is one StorageError line (:func:`_writing`)."""
    tmp = path.with_name(path.name + ".tmp")
    with _writing(path):
        try:
            write(tmp)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)


def _savefig(fig: Any, path: Path) -> None:
    """``fig.savefig(path)`` through a temporary file (an earlier figure stays whole, and a
    refused write names the figure's file)."""
    _replace(path, lambda p: fig.savefig(p, format=path.suffix.lstrip(".") or None))


@contextlib.contextmanager
def _writing(path: Path):
    """A write of the report: an OSError (ENOSPC, EFBIG, EROFS, EACCES) becomes one
    :class:`accord.failures.StorageError` line naming ``path`` and the errno."""
    try:
        yield
    except OSError as e:
        raise storage_error(e, path) from None


# -- CSV files ------------------------------------------------------------------------------

def _csv_value(value: Any) -> Any:
    return "" if value is None else value


def _write_points(path: Path, sections: list[Section]) -> None:
    keys = metric_columns({k for s in sections for g in s.groups for r in g.runs
                           for rec in r.steps for k in rec if _is_eval_key(k)})
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "workers", "network", "label", "seed", "run", "step",
                         "time_s", "mb_sent", "loss", *keys])
        for s in sections:
            for g in s.groups:
                for r in g.runs:
                    for rec in r.steps:
                        comm = _num(rec.get("comm_bytes"))
                        writer.writerow([
                            s.task, s.workers, s.network.text or "", g.label, r.seed,
                            r.name, rec["step"],
                            _csv_value(_num(rec.get("time_s"))),
                            _csv_value(comm / 1e6 if comm is not None else None),
                            _csv_value(_num(rec.get("loss"))),
                            *[_csv_value(_num(rec.get(k))) for k in keys]])


def _write_summary(path: Path, sections: list[Section]) -> None:
    keys = metric_columns({k for s in sections for k in _section_metrics(s)})
    keys += ["time_s", "steps_per_s", "steps", "bytes_per_step", "bytes_per_step_mean_workers",
             "mb_sent"]
    head = ["task", "workers", "network", "label", "algorithm", "n_seeds", "seeds"]
    head += [f"{k}_{stat}" for k in keys for stat in ("mean", "std")]
    head += ["target_metric", "target", "target_rule", "n_reached", "steps_to_target_mean",
             "time_to_target_mean", "mb_to_target_mean", f"steps_to_target_vs_{BASELINE}",
             f"time_to_target_vs_{BASELINE}", f"final_diff_vs_{BASELINE}",
             f"separable_vs_{BASELINE}"]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(head)
        for s in sections:
            for g in s.groups:
                algos = sorted({r.algorithm for r in g.runs})
                row: list[Any] = [s.task, s.workers, s.network.text or "", g.label,
                                  ";".join(algos), len(g.runs),
                                  ";".join(str(x) for x in g.seeds)]
                for k in keys:
                    row += [_csv_value(g.mean(k)), _csv_value(g.std(k))]
                hit = s.target is not None and g.n_reached > 0
                row += [s.metric, _csv_value(s.target), s.target_rule,
                        g.n_reached if s.target is not None else "",
                        _csv_value(g.to_target("step") if hit else None),
                        _csv_value(g.to_target("time_s") if hit else None),
                        _csv_value(g.to_target("mb") if hit else None),
                        _csv_value(_vs_baseline(g, "step", s)[1]),
                        _csv_value(_vs_baseline(g, "time_s", s)[1])]
                base = s.baseline
                if base is None or g is base:
                    row += ["", ""]
                else:
                    c = compare(g, base, s.metric)
                    row += [_csv_value(c.diff), "yes" if c.separable else "no"]
                writer.writerow(row)


# -- figures --------------------------------------------------------------------------------

@dataclass
class Curve:
    step: list[float]
    time_s: list[float]
    mb: list[float]
    mean: list[float]
    lo: list[float]
    hi: list[float]
    n: int  # seeds


def curve(group: Group, key: str) -> Curve:
    """Mean / min / max over seeds of ``key`` at the steps every seed logged (see docstring)."""
    tables = [{rec["step"]: rec for rec in r.steps} for r in group.runs]
    common = set.intersection(*(set(t) for t in tables)) if tables else set()
    if len(common) < 2:
        common = set().union(*(set(t) for t in tables))
    nan = math.nan
    c = Curve([], [], [], [], [], [], len(group.runs))
    for step in sorted(common):
        recs = [t[step] for t in tables if step in t]
        vals = [v for v in (_num(rec.get(key)) for rec in recs) if v is not None]
        times = [v for v in (_num(rec.get("time_s")) for rec in recs) if v is not None]
        comms = [v for v in (_num(rec.get("comm_bytes")) for rec in recs) if v is not None]
        c.step.append(float(step))
        c.time_s.append(statistics.fmean(times) if times else nan)
        c.mb.append(statistics.fmean(comms) / 1e6 if comms else nan)
        c.mean.append(statistics.fmean(vals) if vals else nan)
        c.lo.append(min(vals) if vals else nan)
        c.hi.append(max(vals) if vals else nan)
    return c


def _log_scale(curves: list[Curve]) -> bool:
    values = [v for c in curves for v in (*c.lo, *c.hi) if not math.isnan(v)]
    return bool(values) and min(values) > 0 and max(values) / min(values) > LOG_SPAN


def draw_section(section: Section, styles: dict[str, tuple[str, str]], folder: Path
                 ) -> list[str]:
    """Three PNG files (against step, time, MB); returns their names."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [("loss", "training loss (mean over workers)"),
              (section.metric, f"test {section.metric}")]
    curves = {key: [(g, curve(g, key)) for g in section.groups] for key, _ in panels}
    names = []
    for axis, xlabel in X_AXES:
        fig = Figure(figsize=(12, 4.3), dpi=100)  # fixed margins: constrained layout is slow
        fig.subplots_adjust(left=0.065, right=0.80, bottom=0.13, top=0.88, wspace=0.25)
        FigureCanvasAgg(fig)
        for i, (key, ylabel) in enumerate(panels):
            ax = fig.add_subplot(1, 2, i + 1)
            for group, c in curves[key]:
                x = {"step": c.step, "time": c.time_s, "mb": c.mb}[axis]
                colour, style = styles[group.label]
                seeds = f"{c.n} seed{'s' * (c.n != 1)}"
                ax.plot(x, c.mean, color=colour, linestyle=style, linewidth=1.6,
                        marker="o" if len(x) <= 12 else None, markersize=3,
                        label=f"{group.label} ({seeds})")
                if c.n > 1:
                    ax.fill_between(x, c.lo, c.hi, color=colour, alpha=0.18, linewidth=0)
            if key == section.metric and section.target is not None:
                ax.axhline(section.target, color="#444444", linestyle="--", linewidth=0.9,
                           label=f"target {_fmt(section.target)}")
            if "loss" in key and _log_scale([c for _, c in curves[key]]):
                ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            if i == 1:
                fig.legend(*ax.get_legend_handles_labels(), loc="center left",
                           bbox_to_anchor=(0.81, 0.5), fontsize=8, frameon=False)
        fig.suptitle(f"{section.title}: against {xlabel}")
        name = f"{section.slug}_{axis}.png"
        _savefig(fig, folder / name)
        names.append(name)
    return names


def draw_membership(section: Section, styles: dict[str, tuple[str, str]], path: Path
                    ) -> None:
    """Participants against step, a step line per fault-tolerant run (its label's
    colour; seeds nudged apart vertically so that equal timelines stay visible)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = _membership_runs(section)
    fig = Figure(figsize=(9, 3.8), dpi=100)
    fig.subplots_adjust(left=0.08, right=0.72, bottom=0.14, top=0.88)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    seeds = sorted({r.seed for _, r in runs})
    seen: set[str] = set()
    for g, r in runs:
        last = max([r.membership[-1][0], *(rec["step"] for rec in r.steps),
                    _num((r.summary or {}).get("steps")) or 0])
        xs = [step for step, _ in r.membership] + [last]
        nudge = 0.04 * (seeds.index(r.seed) - (len(seeds) - 1) / 2)
        ys = [n + nudge for _, n in r.membership]
        ys.append(ys[-1])
        colour, style = styles[g.label]
        ax.step(xs, ys, where="post", color=colour, linestyle=style, linewidth=1.4,
                label=None if g.label in seen else g.label)
        seen.add(g.label)
    ax.set_xlabel("step")
    ax.set_ylabel("participants")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="center left",
               bbox_to_anchor=(0.73, 0.5), fontsize=8, frameon=False)
    fig.suptitle(f"{section.title}: participants per step")
    _savefig(fig, path)


def draw_links(c: LinkComparison, styles: dict[str, tuple[str, str]], path: Path) -> bool:
    """Time to target against link bandwidth, one line per label (see the module
    docstring); False (nothing written) when no network has a known bandwidth."""
    placed = [(i, s.network.link.bandwidth * 8 / 1e9) for i, s in enumerate(c.sections)
              if s.network.link is not None]
    if not placed:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(8, 4.5), dpi=100)
    fig.subplots_adjust(left=0.1, right=0.72, bottom=0.13, top=0.88)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    shown: list[float] = []
    for label in c.labels:
        points = sorted((gbit, t) for i, gbit in placed
                        if (t := c.time(label, i)) is not None)
        colour, style = styles.get(label, (PALETTE[0], LINESTYLES[0]))
        ax.plot([x for x, _ in points], [y for _, y in points], color=colour,
                linestyle=style, marker="o", markersize=5, linewidth=1.6,
                label=label if points else f"{label} (not reached)")
        shown += [y for _, y in points]
    ax.set_xscale("log")
    ticks = sorted({gbit for _, gbit in placed})
    ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(ticks[0] / 2, ticks[-1] * 2)
    if shown and min(shown) > 0 and max(shown) / min(shown) > 10:
        ax.set_yscale("log")
    ax.set_xlabel("link bandwidth (Gbit/s)")
    ax.set_ylabel("time to target (s)")
    ax.grid(True, alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="center left",
               bbox_to_anchor=(0.73, 0.5), fontsize=8, frameon=False)
    direction = ">=" if c.higher else "<="
    target = f"{c.metric} {direction} {_fmt(c.target)}" if c.target is not None else "none"
    fig.suptitle(f"{c.title}: time to target ({target}) by link")
    _savefig(fig, path)
    return True


def _tuning_lines(t: Tuning, arm: TuningArm, key: str
                  ) -> tuple[list[tuple[Any, float]], list[Any], Any]:
    """An arm's points on the axis of ``key``: (x, value) of the points with a value, the x
    of those without, and the chosen x (None when none or not on this line). With several
    keys, only the points whose other keys are at the arm's chosen values."""
    on_line = _on_line(t, arm, key)
    good = [(p.setting[key], p.value) for p in on_line if p.value is not None]
    missing = [p.setting[key] for p in on_line if p.value is None]
    pick = (arm.chosen or {}).get(key)
    return good, missing, pick


def _on_line(t: Tuning, arm: TuningArm, key: str) -> list[TuningPoint]:
    """An arm's points on the axis of ``key`` (see :func:`_tuning_lines`)."""
    others = [k for k in t.grid if k != key]
    if others and not arm.chosen:
        return []
    chosen = arm.chosen or {}
    return [p for p in arm.points if key in p.setting
            and all(k in p.setting and scalar_key(p.setting[k]) == scalar_key(chosen.get(k))
                    for k in others)]


def draw_tuning(t: Tuning, arms: list[TuningArm], styles: dict[str, tuple[str, str]],
                path: Path) -> None:
    """The metric against each tuned key, one line per arm (see the module docstring)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = list(t.grid)
    fig = Figure(figsize=(4.6 * len(keys) + 2.4, 4.0), dpi=100)
    fig.subplots_adjust(left=0.5 / (4.6 * len(keys) + 2.4) * 1.6,
                        right=1 - 2.3 / (4.6 * len(keys) + 2.4), bottom=0.14, top=0.86,
                        wspace=0.3)
    FigureCanvasAgg(fig)
    metrics = sorted({a.metric for a in arms})
    handles: dict[str, Any] = {}
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        values = []
        for arm in arms:
            for p in arm.points:
                if key in p.setting and p.setting[key] not in values:
                    values.append(p.setting[key])
        values += [v for v in t.grid[key] if v not in values]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if numeric:
            def pos(v: Any) -> float:
                return float(v)
        else:
            order = [v for v in t.grid[key]] + [v for v in values if v not in t.grid[key]]

            def pos(v: Any, order: list[Any] = order) -> float:
                return float(order.index(v))

            ax.set_xticks(range(len(order)), [_fmt_value(v) for v in order])
        edge = ax.get_xaxis_transform()  # x in data, y in axes
        for arm in arms:
            colour, style = styles.get(arm.label, (PALETTE[0], LINESTYLES[0]))
            good, missing, pick = _tuning_lines(t, arm, key)
            good.sort(key=lambda xv: pos(xv[0]))
            xs, ys = [pos(x) for x, _ in good], [v for _, v in good]
            line, = ax.plot(xs, ys, color=colour, linestyle=style, marker="o", markersize=4,
                            linewidth=1.5, label=arm.label)
            handles.setdefault(arm.label, line)
            spread = [(pos(p.setting[key]), p.value, p.std) for p in _on_line(t, arm, key)
                      if p.value is not None and p.std is not None]
            if spread:  # several tuning seeds: +- one sample std around the mean
                ax.errorbar([x for x, _, _ in spread], [v for _, v, _ in spread],
                            yerr=[e for _, _, e in spread], color=colour, linestyle="none",
                            capsize=3, linewidth=1)
            if pick is not None:
                y = next((v for x, v in good if scalar_key(x) == scalar_key(pick)), None)
                if y is not None:
                    ax.plot([pos(pick)], [y], marker="*", markersize=15, color=colour,
                            markeredgecolor="black", linestyle="none", zorder=5)
            if missing:
                ax.plot([pos(x) for x in missing], [0.03] * len(missing), marker="x",
                        markersize=7, color=colour, linestyle="none", transform=edge,
                        clip_on=False)
        positive = [float(v) for v in values if numeric and float(v) > 0]
        if numeric and values and len(positive) == len(values) \
                and max(positive) / min(positive) > 10:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(f"{', '.join(metrics)} ({t.split} split)")
        ax.grid(True, alpha=0.3)
        if len(keys) > 1:
            ax.set_title(f"{key} (other keys at each arm's chosen values)", fontsize=9)
    fig.legend(list(handles.values()), list(handles), loc="center left",
               bbox_to_anchor=(1 - 2.2 / (4.6 * len(keys) + 2.4), 0.5), fontsize=8,
               frameon=False)
    task, workers = arms[0].task, arms[0].workers
    seed = f", {_fmt_seeds(t.seeds)}" if t.seeds else ""
    fig.suptitle(f"{task}, {workers} worker{'s' if workers != 1 else ''}: tuning on the "
                 f"{t.split} split{seed}")
    _savefig(fig, path)


# -- command line ---------------------------------------------------------------------------

def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report", help="tables, figures and CSV files comparing the runs in a directory",
        description="Report on every run under RUNS_DIR: final metrics, bytes per step, "
                    "steps and time to a target, relative to allreduce, with figures. "
                    "Writes report.md, figures/, points.csv and summary.csv.")
    p.add_argument("runs_dir", metavar="RUNS_DIR", help="directory searched for metrics.jsonl")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="where to write the report (default: RUNS_DIR)")
    p.add_argument("--target-acc", type=float, default=None, metavar="X",
                   help=f"accuracy target (default: {ACC_FACTOR:g} x the allreduce group's "
                        "mean final eval_acc, else the lowest group's)")
    p.add_argument("--target-loss", type=float, default=None, metavar="Y",
                   help=f"loss target for tasks without accuracy (default: {LOSS_FACTOR:g} x "
                        "the allreduce group's mean final eval_loss, else the highest group's)")
    return p


def run(args: argparse.Namespace) -> int:
    def warn(message: str) -> None:
        print(f"{PROG}: warning: {message}", file=sys.stderr)

    try:
        path = write_report(args.runs_dir, args.out, target_acc=args.target_acc,
                            target_loss=args.target_loss, warn=warn)
    except ReportError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except StorageError as e:  # not bad input: the storage refused a write (exit 1)
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    print(f"report: {path}")
    return 0
