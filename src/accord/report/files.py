"""Writing the report's files: each one whole or not at all (:func:`_replace`), a refused
write as one :class:`accord.run.failures.StorageError` line (:func:`_writing`), and the CSV
files ``points.csv`` and ``summary.csv``."""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..run.failures import storage_error
from .runs import _is_eval_key, _num
from .sections import BASELINE, TIME_PARTS, Section, _section_metrics, compare, metric_columns
from .tables import _vs_baseline


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


@contextlib.contextmanager
def _writing(path: Path):
    """A write of the report: an OSError (ENOSPC, EFBIG, EROFS, EACCES) becomes one
    :class:`accord.run.failures.StorageError` line naming ``path`` and the errno."""
    try:
        yield
    except OSError as e:
        raise storage_error(e, path) from None


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
             f"separable_vs_{BASELINE}", *[f"{part}_s_mean" for part in TIME_PARTS]]
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
                parts = g.breakdown() or {}
                row += [_csv_value(parts.get(part)) for part in TIME_PARTS]
                writer.writerow(row)
