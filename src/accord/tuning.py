"""``tuning.json``: what ``accord bench --tune`` tried and chose, declared once. The bench
writes it (:meth:`Tuning.to_json`), ``accord report`` reads it (:func:`parse`).

Version 2 (written by this accord)::

    {"version": 2, "grid": {"lr": [0.001, 0.003]}, "seeds": [100, 101, 102], "split": "val",
     "arms": [{"task": "digits", "workers": 8, "label": "acga", "metric": "eval_acc",
               "higher": true,
               "points": [{"setting": {"lr": 0.001}, "value": 0.91, "std": 0.004,
                           "status": "ok",
                           "runs": [{"seed": 100, "value": 0.905, "status": "ok",
                                     "run": "digits/w8/acga/tune-lr-0.001/seed100"},
                                    ...]},
                          ...],
               "chosen": {"lr": 0.003}, "chosen_value": 0.93}]}

A point's ``runs`` are its tuning runs, one per tuning seed in the order of ``seeds``: each
run's ``value`` is its final ``metric`` on ``split``, null unless its ``status`` is ``ok``
(the statuses: ``ok``, ``diverged``, ``failed``, ``not run``); ``run`` is its directory
relative to the file's. The point's own fields follow from its runs (:class:`TuningPoint`):
``status`` is ``ok`` when every run's is, else ``diverged`` when a run diverged, else
``failed`` when one failed, else ``not run``; ``value`` is the mean of the runs' values and
``std`` their sample standard deviation (null with one seed), both null unless the status
is ``ok``. The rule of :func:`best_point`: a point is judged by its ``value`` (the mean over
the tuning seeds); only an ``ok`` point can win, so a point with one diverged seed never
does; a tie goes to the first point in grid order. ``chosen`` is the winner's setting
(null when no point is ``ok``) and ``chosen_value`` its value. A file whose point ``value``
or ``status`` does not follow from its runs is refused, naming the field.

Version 1 (one tuning seed: ``"seed": 100`` instead of ``seeds``, and each point's own
``value``, ``status`` and ``run`` instead of ``runs``) is still read, as points with one run.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from typing import Any

TUNING_FILE = "tuning.json"
TUNING_VERSION = 2
READABLE_VERSIONS = (1, 2)
#: a point's status is the first of these that one of its runs has (``ok``: all of them)
STATUS_ORDER = ("diverged", "failed", "not run")
STATUSES = ("ok", *STATUS_ORDER)


class Malformed(Exception):
    """What is wrong with a tuning.json, in a few words (the field's path first)."""


@dataclass(frozen=True)
class TuningRun:
    """One tuning run: a grid point on one tuning seed."""

    seed: int | None
    value: float | None  # the final metric on the split; None unless status is ok
    status: str
    run: str | None = None  # its directory, relative to the tuning.json's

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "value": self.value, "status": self.status,
                "run": self.run}


@dataclass(frozen=True)
class TuningPoint:
    """A grid point and its runs, one per tuning seed."""

    setting: dict[str, Any]
    runs: tuple[TuningRun, ...]

    @property
    def status(self) -> str:
        statuses = {r.status for r in self.runs}
        if statuses == {"ok"}:
            return "ok"
        return next((s for s in STATUS_ORDER if s in statuses), "not run")

    @property
    def value(self) -> float | None:
        """The mean over the tuning seeds (exact, so independent of their order), or None."""
        if self.status != "ok":
            return None
        values = [r.value for r in self.runs]
        if any(v is None for v in values):
            return None
        return statistics.mean(values)

    @property
    def std(self) -> float | None:
        """The sample standard deviation over the tuning seeds (None with one)."""
        if self.value is None or len(self.runs) < 2:
            return None
        return statistics.stdev(r.value for r in self.runs)

    def to_json(self) -> dict[str, Any]:
        return {"setting": self.setting, "value": self.value, "std": self.std,
                "status": self.status, "runs": [r.to_json() for r in self.runs]}


@dataclass(frozen=True)
class TuningArm:
    """One arm (task, workers, label): every grid point, and the one chosen."""

    task: str
    workers: int
    label: str
    metric: str
    higher: bool
    points: list[TuningPoint]
    chosen: dict[str, Any] | None
    chosen_value: float | None

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "workers": self.workers, "label": self.label,
                "metric": self.metric, "higher": self.higher,
                "points": [p.to_json() for p in self.points], "chosen": self.chosen,
                "chosen_value": self.chosen_value}


@dataclass
class Tuning:
    """One tuning.json: the grid, the tuning seeds, the split and every arm."""

    grid: dict[str, list[Any]]
    seeds: list[int]
    split: str
    arms: list[TuningArm]
    name: str = ""  # where it was read: the directory holding it (set by the reader)

    def to_json(self) -> dict[str, Any]:
        return {"version": TUNING_VERSION, "grid": self.grid, "seeds": self.seeds,
                "split": self.split, "arms": [a.to_json() for a in self.arms]}

    def sections(self) -> list[tuple[str, int]]:
        return sorted({(a.task, a.workers) for a in self.arms})

    def columns(self) -> list[dict[str, Any]]:
        """The grid's points in its order (cartesian product, first key slowest), then any
        setting of a point that is not one of them, in file order."""
        columns: list[dict[str, Any]] = [{}]
        for key, values in self.grid.items():
            columns = [{**c, key: v} for c in columns for v in values]
        seen = {setting_key(c) for c in columns}
        for arm in self.arms:
            for point in arm.points:
                if setting_key(point.setting) not in seen:
                    seen.add(setting_key(point.setting))
                    columns.append(point.setting)
        return columns


def best_point(values: list[float | None], higher: bool) -> int | None:
    """Index of the best finite value (the first in grid order on a tie); None if none."""
    best = None
    for i, v in enumerate(values):
        if v is None or not math.isfinite(v):
            continue
        if best is None or (v > values[best] if higher else v < values[best]):
            best = i
    return best


def scalar_key(value: Any) -> Any:
    """A value compared as a number when it is one or spells one ("1e-3" is 0.001)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, int | float) and not isinstance(value, bool):
        return ("n", float(value))
    return ("s", json.dumps(value, sort_keys=True))


def setting_key(setting: dict[str, Any]) -> tuple:
    """A setting compared by value: 0.001, 1e-3 and 1 / 1.0 are the same."""
    return tuple(sorted((k, scalar_key(v)) for k, v in setting.items()))


# -- reading ----------------------------------------------------------------------------------

def _need(cond: bool, what: str) -> None:
    if not cond:
        raise Malformed(what)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _num(value: Any) -> float | None:
    return float(value) if _is_number(value) and math.isfinite(value) else None


def _show(value: Any) -> str:
    return f"{value:.6g}" if _is_number(value) else json.dumps(value)


def _run(data: dict[str, Any], at: str, seed: Any = None) -> TuningRun:
    value = data.get("value")
    _need(value is None or _is_number(value), f"{at}.value is not a number or null")
    status = data.get("status", "ok" if value is not None else "not run")
    _need(isinstance(status, str), f"{at}.status is not a string")
    seed = data.get("seed", seed)
    _need(seed is None or _is_int(seed), f"{at}.seed is not an integer")
    run = data.get("run")
    return TuningRun(seed, _num(value) if status == "ok" else None, status,
                     run if isinstance(run, str) else None)


def _point(data: Any, at: str, version: int, seed: int | None) -> TuningPoint:
    _need(isinstance(data, dict) and isinstance(data.get("setting"), dict),
          f"{at} has no 'setting' object")
    if version == 1:
        return TuningPoint(data["setting"], (_run(data, at, seed),))
    runs = data.get("runs")
    _need(isinstance(runs, list) and bool(runs), f"{at}.runs is not a non-empty list")
    for k, run in enumerate(runs):
        _need(isinstance(run, dict), f"{at}.runs[{k}] is not an object")
    point = TuningPoint(data["setting"],
                        tuple(_run(r, f"{at}.runs[{k}]") for k, r in enumerate(runs)))
    status, value = data.get("status", point.status), data.get("value", point.value)
    _need(status == point.status,
          f"{at}.status {status!r} does not follow from its runs ({point.status!r})")
    _need(value is None and point.value is None or _is_number(value)
          and point.value is not None and math.isclose(value, point.value, rel_tol=1e-9,
                                                       abs_tol=1e-12),
          f"{at}.value {_show(value)} is not the mean of its runs ({_show(point.value)})")
    return point


def parse(data: Any, name: str = "") -> Tuning:
    """A tuning.json's content (version 1 or 2) as a :class:`Tuning`; :class:`Malformed`
    (naming the field) when it does not have this shape."""
    _need(isinstance(data, dict), "not a JSON object")
    version = data.get("version")
    _need(version in READABLE_VERSIONS,
          f"version {version!r}; this accord reads versions "
          f"{', '.join(map(str, READABLE_VERSIONS))}")
    grid = data.get("grid")
    _need(isinstance(grid, dict) and bool(grid), "'grid' is not a non-empty object")
    for key, values in grid.items():
        _need(isinstance(values, list) and bool(values)
              and all(isinstance(v, str | int | float) for v in values),
              f"grid {key!r} is not a non-empty list of numbers or strings")
    if version == 1:
        seed = data.get("seed")
        _need(seed is None or _is_int(seed), "'seed' is not an integer")
        seeds = [] if seed is None else [seed]
    else:
        seed = None
        seeds = data.get("seeds")
        _need(isinstance(seeds, list) and bool(seeds) and all(_is_int(s) for s in seeds),
              "'seeds' is not a non-empty list of integers")
    split = data.get("split", "val")
    _need(isinstance(split, str), "'split' is not a string")
    arms = data.get("arms")
    _need(isinstance(arms, list), "'arms' is not a list")
    parsed = []
    for i, arm in enumerate(arms):
        where = f"arms[{i}]"
        _need(isinstance(arm, dict), f"{where} is not an object")
        for key, ok in (("task", isinstance(arm.get("task"), str)),
                        ("workers", _is_int(arm.get("workers"))),
                        ("label", isinstance(arm.get("label"), str)),
                        ("points", isinstance(arm.get("points"), list))):
            _need(ok, f"{where}.{key} missing or of the wrong type")
        metric = arm.get("metric", "eval_acc")
        _need(isinstance(metric, str), f"{where}.metric is not a string")
        higher = arm.get("higher", "loss" not in metric)
        _need(isinstance(higher, bool), f"{where}.higher is not true or false")
        chosen = arm.get("chosen")
        _need(chosen is None or isinstance(chosen, dict), f"{where}.chosen is not an object")
        chosen_value = arm.get("chosen_value")
        _need(chosen_value is None or _is_number(chosen_value),
              f"{where}.chosen_value is not a number")
        points = [_point(p, f"{where}.points[{j}]", version, seed)
                  for j, p in enumerate(arm["points"])]
        parsed.append(TuningArm(arm["task"], arm["workers"], arm["label"], metric, higher,
                                points, chosen or None, _num(chosen_value)))
    return Tuning(grid, seeds, split, parsed, name)
