"""``tuning.json`` in the report (its one schema: :mod:`accord.bench.tuning`): the files found under
RUNS_DIR, the section "Tuning", the note under a section's settings and the line on the
tuning runs set aside (see docs/reference/report.md,
Tuning runs and Tuning)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ..bench.tuning import TUNING_FILE, Tuning, TuningArm, TuningPoint, scalar_key, setting_key
from ..bench.tuning import load as load_tuning
from ..schema import SchemaError
from .fmt import FIGURE_DIR, _fmt, _fmt_seeds, _fmt_setting, _fmt_value, _md, _table
from .runs import Run, Warn, _relative
from .sections import BASELINE, Section


def _arms_of(t: Tuning, task: str, workers: int) -> list[TuningArm]:
    """The arms of one (task, workers), the baseline first, then by label."""
    arms = [a for a in t.arms if (a.task, a.workers) == (task, workers)]
    return sorted(arms, key=lambda a: (a.label != BASELINE, a.label))


def load_tunings(root: Path, warn: Warn) -> list[Tuning]:
    """Every readable tuning.json under root; one warning per file that is not (naming the
    field, see accord.bench.tuning.SCHEMAS)."""
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
