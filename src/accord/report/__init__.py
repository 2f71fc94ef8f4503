"""``accord report RUNS_DIR``: tables, figures and CSV files comparing the runs in a directory.

    accord report RUNS_DIR [--out DIR] [--target-acc X] [--target-loss Y]
                  [--log-y auto|on|off] [--smooth W] [--formats png[,svg][,pdf]]

Reads every run (``metrics.jsonl``) and ``tuning.json`` under ``RUNS_DIR``, groups the
finished runs into sections (task, workers, network) and compares their groups with
``allreduce``: final metrics, bytes per step, steps, time and megabytes to a target, a
verdict, a time breakdown; then writes ``report.md``, ``figures/``, ``points.csv`` and
``summary.csv``. What it reads, computes and writes: docs/reference/report.md.

From Python: ``write_report(runs_dir, out_dir=None, target_acc=None, target_loss=None,
figures=True, warn=None, log_y="auto", smooth=0.0, formats=("png",))`` returns the path of
``report.md``; :class:`ReportError` (one line) when ``RUNS_DIR`` does not exist or holds no
readable run, or for a bad option. ``add_parser(subparsers)`` and ``run(args)`` are the
command.

Modules: ``runs``, ``sections``, ``networks``, ``tables``, ``links``, ``tuned``, ``figures``,
``panels``, ``style``, ``files``, ``fmt`` and ``writer`` (:func:`write_report`); this module
is the command and names what they export.
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
