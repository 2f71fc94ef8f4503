"""``accord report RUNS_DIR``: tables, figures and CSV files comparing the runs in a directory.

    accord report RUNS_DIR [--out DIR] [--target-acc X] [--target-loss Y]
                  [--log-y auto|on|off] [--smooth W] [--formats png[,svg][,pdf]]

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
(``accord.run.metrics.RECORD_SCHEMAS``: a step record without an integer ``step``, a header
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
  has at least ``SEPARABLE_SEEDS`` (3) finished seeds with a final value of the metric
  and their seed ranges
  ``[min, max]`` of that final value do not overlap (touching ends overlap); otherwise they
  are "not separable at this scale" (the difference is within the spread of the seeds, or
  there are too few seeds to know). Without an ``allreduce`` group the list says there is no
  baseline. ``summary.csv`` has the same as ``final_diff_vs_allreduce`` and
  ``separable_vs_allreduce`` (``yes`` / ``no``; empty for the baseline and without one).
* when a group has fewer than 3 finished seeds, a last line names those groups and says
  that separability is judged only from 3.

**Time breakdown.** Per group, the mean over seeds of each run's wall time (the summary's
``time_s``) in three parts that sum to it (:func:`time_breakdown`): *communication*, the
seconds rank 0's communicator counted (``comm_s``; a blocking collective's wait for the
other ranks is in it); *compute*, the rest of rank 0's training loop
(``worker_time_s[0]``, else ``train_s``); *waiting*, the wall time outside that loop
(start-up, restarts, the wait at the end for slower workers). Communication counted beyond
the loop's time (a background thread's) is capped at it. A table in the section (its note
says what each part is measured from) and a figure.

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
cannot be read or does not have the shape of :mod:`accord.bench.tuning` (version 2, or version 1
of a single tuning seed: ``accord.bench.tuning.SCHEMAS``) is one warning line naming the field and
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

A link is placed by :func:`accord.comm.network.parse_network` (bandwidth in bytes/s); a
profile by its default link, read from its file (as given, else relative to the run
directory and its parents up to ``RUNS_DIR``), which the report says; a profile whose file
cannot be read is placed last and is left out of the figure, as is the real network. The
figure ``figures/<task>_w<workers>_links.png``: time to target (y; logarithmic when the
plotted values span more than a factor 10) against the link's bandwidth (x, logarithmic,
in Gbit/s, one tick per link), one line per label in its colour; a label that did not
reach the target on a link has no point there (and "(not reached)" in the legend when it
reached it nowhere).

**Figures.** For each section, three figures with the training ``loss`` (the mean over
workers), ``eval_loss`` and the test metric (the consensus model's; two panels when the
metric is ``eval_loss``): against ``step``, against wall time (``time_s``) and against
megabytes sent by rank 0 (``comm_bytes / 1e6``); then (:mod:`accord.report.panels`) the
consensus distance and rank 0 minus the consensus model against step, the algorithms'
observables (the step records' ``algo`` numbers that change during a run; those that keep
one value are listed in the text) and the time breakdown, each when the records hold its
numbers. Each line is the mean over the seeds of a group, with a band from the minimum to
the maximum seed; seeds are aligned by step (the steps logged by every seed), and against
time or megabytes the x of a point is the mean over seeds of that step's ``time_s`` or
megabytes. Colour by algorithm, fixed by its name (the same in every report), line style
by variant (straggler, other fault, compression, emulated link), a marker for labels that
share both (:mod:`accord.report.style`); where curves coincide the first is the widest and
a later equal one carries markers. ``--log-y`` (``auto``, the default: a logarithmic y
axis for a panel whose positive values span more than two decades, symmetric-log for a
loss or distance panel that also holds zeros; ``on``: the loss and distance panels
always; ``off``); ``--smooth W`` (an exponential moving average of weight ``0 <= W < 1``,
debiased as TensorBoard's, on the curves and bands, the raw mean faint behind; default 0;
tables, targets and CSV files are never smoothed); ``--formats`` (PNG always, SVG and PDF
beside it). A bad value is a :class:`ReportError` naming the option and what is allowed.
The default target is drawn as a dashed line on the test-metric panels.

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
* ``figures/<task>_w<workers>_{step,time,mb,consensus,observables,breakdown}.png`` for a
  section of the real network (and ``.svg`` / ``.pdf`` beside each with ``--formats``),
  ``figures/<task>_w<workers>_net-<link>_<same>.png`` for an emulated one (``<link>``
  is the network's text with every run of characters other than letters, digits and dots
  made one ``-``: ``100mbit,5ms`` is ``100mbit-5ms``; ``-2``, ... appended if two networks
  would share it), ``figures/<task>_w<workers>_links.png``,
  ``figures/tuning_<task>_w<workers>.png`` and, for a section with fault-tolerant runs,
  ``figures/<slug>_participants.png``;
* ``points.csv`` -- every plotted point of every finished seed: task, workers, network
  (the network's text, empty for the real network), label, seed, run, step, time_s,
  mb_sent, loss and the evaluation columns;
* ``summary.csv`` -- one row per group (with the same ``network`` column): every number of
  the report's tables at full precision, the verdict against ``allreduce`` and the time
  breakdown (``compute_s_mean``, ``communication_s_mean``, ``waiting_s_mean``).

From Python: ``write_report(runs_dir, out_dir=None, target_acc=None, target_loss=None,
figures=True, warn=None, log_y="auto", smooth=0.0, formats=("png",))`` returns the path
of ``report.md`` and raises :class:`ReportError` (one line) when ``RUNS_DIR`` does not
exist or holds no readable run, or for a bad option;
``add_parser(subparsers)`` and ``run(args)`` are the ``accord report`` command. Figures
need matplotlib (the ``plots`` extra, imported only when drawing); without it the report
is written without figures.

**Modules.** ``runs`` (reading a run), ``sections`` (groups, sections, targets and their
numbers), ``networks`` (emulated networks), ``tables`` (a section's markdown), ``links``
(the section "Links"), ``tuned`` (``tuning.json`` in the report), ``figures`` (the metric
curves, links, membership and tuning figures), ``panels`` (consensus, observables, time
breakdown), ``style`` (colours, line styles, smoothing, the figure options), ``files``
(writing a file whole; the CSV files), ``fmt`` (shared pieces of text)
and ``writer`` (:func:`write_report`); this module is the command and names what they
export.
"""

from __future__ import annotations

import argparse
import sys

from ..run.failures import StorageError
from .figures import (
    LOG_SPAN,
    X_AXES,
    Curve,
    curve,
    draw_links,
    draw_membership,
    draw_section,
    draw_tuning,
)
from .figures import _tuning_lines as _tuning_lines  # the tuning tests call it
from .fmt import FIGURE_DIR
from .links import LinkComparison, link_comparisons
from .networks import NETWORK_FORMULA, NetworkInfo, NetworkKey
from .panels import draw_breakdown, draw_consensus, draw_observables
from .runs import ReportError, Run, Warn, find_runs, load_run
from .sections import (
    ACC_FACTOR,
    BASELINE,
    LOSS_FACTOR,
    SAME_IN_GROUP,
    SEPARABLE_SEEDS,
    TIME_PARTS,
    Comparison,
    Group,
    Section,
    build_sections,
    compare,
    final_values,
    metric_columns,
    reach,
    time_breakdown,
)
from .style import (
    FORMATS,
    LINESTYLES,
    LOG_Y,
    PALETTE,
    FigureOptions,
    Style,
    algorithm_colour,
    figure_options,
    label_styles,
    variant_kinds,
)
from .tables import ENV_KEYS, TO_TARGET
from .tuned import load_tunings
from .writer import write_report

__all__ = [
    "ACC_FACTOR", "BASELINE", "ENV_KEYS", "FIGURE_DIR", "FORMATS", "LINESTYLES", "LOG_SPAN",
    "LOG_Y", "LOSS_FACTOR", "NETWORK_FORMULA", "PALETTE", "PROG", "SAME_IN_GROUP",
    "SEPARABLE_SEEDS", "TIME_PARTS", "TO_TARGET", "X_AXES", "Comparison", "Curve",
    "FigureOptions", "Group", "LinkComparison", "NetworkInfo", "NetworkKey", "ReportError",
    "Run", "Section", "Style", "Warn", "add_parser", "algorithm_colour", "build_sections",
    "compare", "curve", "draw_breakdown", "draw_consensus", "draw_links", "draw_membership",
    "draw_observables", "draw_section", "draw_tuning", "figure_options", "final_values",
    "find_runs", "label_styles", "link_comparisons", "load_run", "load_tunings",
    "metric_columns", "reach", "run", "time_breakdown", "variant_kinds", "write_report",
]

PROG = "accord report"


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
    p.add_argument("--log-y", default="auto", metavar="WHEN",
                   help=f"logarithmic y axis for the loss and consensus-distance panels: "
                        f"{', '.join(LOG_Y)} (default auto: when a panel's values span more "
                        "than two decades; on: always, symmetric-log where a value is 0)")
    p.add_argument("--smooth", default="0", metavar="W",
                   help="smooth the curves by an exponential moving average of weight W, "
                        "from 0 (default: none) up to but not including 1 (TensorBoard's "
                        "0.6 is a common choice); the tables are never smoothed")
    p.add_argument("--formats", default="png", metavar="F[,F...]",
                   help=f"figure formats, from {', '.join(FORMATS)} (default png; PNG is "
                        "always written, e.g. png,svg or png,pdf for a paper)")
    return p


def run(args: argparse.Namespace) -> int:
    def warn(message: str) -> None:
        print(f"{PROG}: warning: {message}", file=sys.stderr)

    try:
        path = write_report(args.runs_dir, args.out, target_acc=args.target_acc,
                            target_loss=args.target_loss, warn=warn,
                            log_y=getattr(args, "log_y", "auto"),
                            smooth=getattr(args, "smooth", 0.0),
                            formats=getattr(args, "formats", "png"))
    except ReportError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except StorageError as e:  # not bad input: the storage refused a write (exit 1)
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    print(f"report: {path}")
    return 0
