"""``tuning.json``: what ``accord bench --tune`` tried and chose, declared once. The bench
writes it (:func:`save`), the bench and ``accord report`` read it (:func:`load`).

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

The schema of each version (:data:`SCHEMAS`, with :mod:`accord.schema`) is declared here once:
:func:`save` checks what it writes against it (:meth:`Tuning.to_json`, then :func:`parse`)
and the bench and the report read through :func:`load` / :func:`parse`. A file that is not UTF-8
JSON, nests too deep or breaks the schema is refused with one
:class:`accord.schema.SchemaError` naming the file and the field; fields of their own that a
file carries beyond these are allowed (older and newer writers agree on the fields above).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..schema import (
    AnyJSON,
    Boolean,
    Const,
    Custom,
    Int,
    ListOf,
    MapOf,
    Nullable,
    Number,
    Record,
    SchemaError,
    Text,
    got,
    read_json,
    validate,
)

TUNING_FILE = "tuning.json"
TUNING_VERSION = 2
READABLE_VERSIONS = (1, 2)
#: a point's status is the first of these that one of its runs has (``ok``: all of them)
STATUS_ORDER = ("diverged", "failed", "not run")
STATUSES = ("ok", *STATUS_ORDER)


#: what is wrong with a tuning.json (the name older callers catch)
Malformed = SchemaError


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


# -- the schema and reading --------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _num(value: Any) -> float | None:
    return float(value) if _is_number(value) and math.isfinite(value) else None


def _show(value: Any) -> str:
    return f"{value:.6g}" if _is_number(value) else json.dumps(value)


_SCALAR = "a number or a string"
_GRID = MapOf(ListOf(Custom(_SCALAR, lambda v: None if isinstance(v, str) or _is_number(v)
                            else _SCALAR), min_len=1),
              nonempty=True, expected="a non-empty object of lists (each key's values)")
_SETTING = MapOf(AnyJSON(), expected="an object (a grid point's setting)")
_VALUE = Nullable(Number(finite=False))
_RUN = Record({"seed": Nullable(Int()), "value": _VALUE, "status": Text(),
               "run": Nullable(Text())}, extra=True)
_POINTS = {
    1: Record({"setting": _SETTING, "value": _VALUE, "status": Text(),
               "run": Nullable(Text())}, required=("setting",), extra=True),
    2: Record({"setting": _SETTING, "runs": ListOf(_RUN, min_len=1), "value": _VALUE,
               "std": _VALUE, "status": Text()}, required=("setting", "runs"), extra=True),
}


def _arm_schema(version: int) -> Record:
    return Record({"task": Text(), "workers": Int(1), "label": Text(), "metric": Text(),
                   "higher": Boolean(), "points": ListOf(_POINTS[version]),
                   "chosen": Nullable(_SETTING), "chosen_value": _VALUE},
                  required=("task", "workers", "label", "points"), extra=True)


#: each readable version's schema; a point's ``value`` and ``status`` must also follow from
#: its runs (checked by :func:`parse`)
SCHEMAS: dict[int, Record] = {
    1: Record({"version": Const(1), "grid": _GRID, "seed": Nullable(Int()), "split": Text(),
               "arms": ListOf(_arm_schema(1))}, required=("version", "grid", "arms"),
              extra=True),
    2: Record({"version": Const(2), "grid": _GRID, "seeds": ListOf(Int(), min_len=1),
               "split": Text(), "arms": ListOf(_arm_schema(2))},
              required=("version", "grid", "seeds", "arms"), extra=True),
}


def _run(data: dict[str, Any], seed: Any = None) -> TuningRun:
    value = data.get("value")
    status = data.get("status", "ok" if value is not None else "not run")
    return TuningRun(data.get("seed", seed), _num(value) if status == "ok" else None, status,
                     data.get("run"))


def _point(data: dict[str, Any], at: str, version: int, seed: int | None) -> TuningPoint:
    if version == 1:
        return TuningPoint(data["setting"], (_run(data, seed),))
    point = TuningPoint(data["setting"], tuple(_run(r) for r in data["runs"]))
    status, value = data.get("status", point.status), data.get("value", point.value)
    if status != point.status:
        raise SchemaError(f"{at}.status", f"{json.dumps(point.status)} (what its runs say)",
                          got(status))
    if not (value is None and point.value is None or _is_number(value)
            and point.value is not None
            and math.isclose(value, point.value, rel_tol=1e-9, abs_tol=1e-12)):
        raise SchemaError(f"{at}.value", f"the mean of its runs ({_show(point.value)})",
                          _show(value))
    return point


def parse(data: Any, name: str = "") -> Tuning:
    """A tuning.json's content (version 1 or 2) as a :class:`Tuning`;
    :class:`accord.schema.SchemaError` (naming the field) when it does not have the shape
    of :data:`SCHEMAS`."""
    if not isinstance(data, dict):
        raise SchemaError("", "a JSON object (a tuning file)", got(data))
    version = data.get("version")
    if not _is_int(version) or version not in READABLE_VERSIONS:
        readable = " or ".join(map(str, READABLE_VERSIONS))
        raise SchemaError("version", f"{readable} (the versions this accord reads)",
                          got(version))
    validate(SCHEMAS[version], data)
    seed = data.get("seed") if version == 1 else None
    seeds = ([] if seed is None else [seed]) if version == 1 else data["seeds"]
    parsed = []
    for i, arm in enumerate(data["arms"]):
        metric = arm.get("metric", "eval_acc")
        points = [_point(p, f"arms[{i}].points[{j}]", version, seed)
                  for j, p in enumerate(arm["points"])]
        parsed.append(TuningArm(arm["task"], arm["workers"], arm["label"], metric,
                                arm.get("higher", "loss" not in metric), points,
                                arm.get("chosen") or None, _num(arm.get("chosen_value"))))
    return Tuning(data["grid"], seeds, data.get("split", "val"), parsed, name)


def load(path: str | os.PathLike, file: str | None = None, name: str = "") -> Tuning:
    """The :class:`Tuning` in the file at ``path``; :class:`accord.schema.SchemaError`
    naming the file (``file``, default the path) and the field when it is not UTF-8 JSON of
    that shape. ``OSError`` (missing, unreadable) is the caller's to word."""
    file = str(path) if file is None else file
    data = read_json(path, file)
    try:
        return parse(data, name)
    except SchemaError as e:
        raise e.in_file(file) from None


def save(tuning: Tuning, path: str | os.PathLike) -> Tuning:
    """Write ``tuning`` to the tuning.json at ``path`` (the bench, after choosing) and return
    what was written. The arms of a readable file already there with the same grid and
    seeds are kept, except those ``tuning`` has anew: a bench over part of a group
    (``--tasks fashion`` after ``--tasks digits``) keeps the other arms' tuning; any other
    file is written anew. What is written is first checked as every reader will check it
    (:func:`parse`), then written beside ``path`` (``tuning.json.tmp``) and renamed over it,
    so a reader never sees half a file."""
    path = Path(path)
    try:
        before = load(path)
    except (OSError, SchemaError):  # unreadable or not of the schema: written anew
        before = None
    if before is not None and (before.grid, before.seeds) == (tuning.grid, tuning.seeds):
        mine = {(a.task, a.workers, a.label) for a in tuning.arms}
        tuning = replace(tuning, arms=[a for a in before.arms
                                       if (a.task, a.workers, a.label) not in mine]
                         + tuning.arms)
    data = tuning.to_json()
    parse(data)  # what every reader will demand (SCHEMAS)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return tuning
