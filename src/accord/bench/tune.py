"""``accord bench --tune``: the grid and the tuning seeds, one tuning run per arm, grid point
and seed on the validation split, each arm's choice by its mean over the tuning seeds, and
the ``tuning.json`` of each group (its one schema: :mod:`accord.bench.tuning`)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..run.config import MAX_SEED, ConfigError, TrainConfig
from ..run.validation import validate
from .reuse import previous
from .specs import RunSpec, apply_overrides
from .tuning import TUNING_FILE, Tuning, TuningArm, TuningPoint, TuningRun, best_point
from .tuning import save as save_tuning

#: the default tuning seeds: not one of the presets' evaluation seeds. Three, because one
#: seed can put an arm at an edge-of-stability learning rate and flip a comparison
TUNE_SEEDS = (100, 101, 102)


def parse_tune_seeds(text: str, flag: str = "--tune-seeds") -> list[int]:
    """``--tune-seeds S1,S2,...`` as a list; ConfigError (one line, naming ``flag``) unless
    they are integers from 0 to 2**63 - 1, each once, at least one."""
    items = [t.strip() for t in text.split(",")]
    if items == [""]:
        raise ConfigError(f"{flag}: got no seed; allowed: at least one (e.g. 100,101,102)")
    try:
        seeds = [int(t) for t in items]
    except ValueError:
        seeds = []
    if len(seeds) != len(items):
        raise ConfigError(f"{flag}: expected comma-separated integers (e.g. 100,101,102), "
                          f"got {text!r}")
    return check_tune_seeds(seeds, flag)


def check_tune_seeds(seeds: list[int], flag: str = "--tune-seeds") -> list[int]:
    """``seeds`` unchanged, or ConfigError (one line, naming ``flag``)."""
    if not seeds:
        raise ConfigError(f"{flag}: got no seed; allowed: at least one (e.g. 100,101,102)")
    for seed in seeds:
        if not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"{flag}: got {seed}; allowed: integers from 0 to 2**63 - 1")
    repeated = next((s for s, n in Counter(seeds).items() if n > 1), None)
    if repeated is not None:
        raise ConfigError(f"{flag}: {repeated} given twice; allowed: each seed once")
    return list(seeds)


def _seed_list(seeds: int | list[int] | tuple[int, ...]) -> list[int]:
    """A single tuning seed is a list of one."""
    return [seeds] if isinstance(seeds, int) else list(seeds)


def parse_tune(items: list[str]) -> dict[str, list[str]]:
    """``--tune KEY=V1,V2,...`` (repeatable; several keys make the cartesian product) as
    {key: [value texts]}; ConfigError (one line) for a malformed item or a repeated key.
    Whether a key exists is checked per run by :func:`plan` (as for ``--set``)."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, rest = item.partition("=")
        key = key.strip()
        values = [v.strip() for v in rest.split(",")]
        if not sep or not key or not rest.strip() or any(not v for v in values):
            raise ConfigError(f"--tune: expected KEY=V1,V2,... (e.g. lr=1e-3,3e-3), got "
                              f"{item!r}")
        if key in grid:
            raise ConfigError(f"--tune: {key!r} given twice; allowed: each key once")
        if len(set(values)) != len(values):
            raise ConfigError(f"--tune {key}: a value is repeated in {rest!r}")
        if key in ("eval_split", "train.eval_split", "seed"):
            raise ConfigError(f"--tune: {key!r} cannot be tuned; allowed: a training "
                              "setting or an algorithm hyperparameter")
        grid[key] = values
    return grid


def grid_points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every point of the grid, the first key varying slowest."""
    points: list[dict[str, str]] = [{}]
    for key, values in grid.items():
        points = [{**p, key: v} for p in points for v in values]
    return points


def point_dir(point: dict[str, str]) -> str:
    """The directory of a grid point's runs, e.g. ``tune-lr-1e-3`` (keys without their
    ``algo.``/``train.`` prefix); one ``seed<k>`` directory per tuning seed inside."""
    return "tune-" + "_".join(f"{k.split('.')[-1]}-{v}" for k, v in point.items())


def _arm(spec: RunSpec) -> tuple:
    return (spec.group, spec.task, spec.workers, spec.label)


def tuning_specs(specs: list[RunSpec], grid: dict[str, list[str]],
                 seeds: int | list[int] | tuple[int, ...], *, flag: str = "--tune-seeds"
                 ) -> list[RunSpec]:
    """One run per arm (group, task, workers, label), grid point and tuning seed (in that
    order), evaluated on the held-out validation split (``eval_split=val``: part of the
    training data, never the test split). ConfigError (naming ``flag``) if a tuning seed is
    not a valid one (:func:`check_tune_seeds`) or is one of the evaluation seeds."""
    seeds = check_tune_seeds(_seed_list(seeds), flag)
    used = sorted({s.seed for s in specs})
    clash = [s for s in seeds if s in used]
    if clash:
        subject = f"{flag} {clash[0]}" if flag == "--tune-seed" else f"{flag}: {clash[0]}"
        raise ConfigError(f"{subject} is also an evaluation seed; allowed: "
                          f"{'a seed' if len(seeds) == 1 else 'seeds'} not in "
                          f"{', '.join(map(str, used))}")
    arms: dict[tuple, RunSpec] = {}
    for spec in specs:
        arms.setdefault(_arm(spec), spec)
    out = []
    for template in arms.values():
        for point in grid_points(grid):
            base = replace(template, point=point_dir(point))
            try:
                tuned = apply_overrides([base], [f"{k}={v}" for k, v in point.items()])[0]
            except ConfigError as e:
                raise ConfigError(f"--tune: {e}") from None
            out += [replace(tuned, seed=seed, train={**tuned.train, "eval_split": "val"})
                    for seed in seeds]
    return out


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _setting_value(cfg: TrainConfig, key: str) -> Any:
    """The value ``key`` took in ``cfg`` (parsed for a training setting, the number or text
    of an algorithm hyperparameter)."""
    name = key.split(".")[-1]
    if not key.startswith("train.") and name in cfg.hyperparameters:
        value = cfg.hyperparameters[name]
        return _number(value) if isinstance(value, str) else value
    return getattr(cfg, name)


def selection_metric(task: str) -> tuple[str, bool]:
    """(metric, higher is better) by which a tuning run is judged: the final ``eval_acc``
    when the task has accuracy, else the final ``eval_loss``."""
    from ..tasks import get_task

    return ("eval_acc", True) if get_task(task).has_accuracy else ("eval_loss", False)


@dataclass
class TuningChoice:
    """What tuning chose: per arm (group, task, workers, label) the grid point (as the
    ``--tune`` texts) or None when no grid point finished on every tuning seed; and per
    group the record written to its tuning.json."""

    chosen: dict[tuple, dict[str, str] | None]
    files: list[Path]
    records: dict[tuple, TuningArm] = field(default_factory=dict)  # per arm, as written


#: what a tuning run's state counts as in tuning.json (see accord.bench.tuning)
_TUNING_STATUS = {"absent": "not run", "stale": "not run", "unreadable": "failed",
                  "incomplete": "failed", "interrupted": "not run"}


def choose(specs: list[RunSpec], grid: dict[str, list[str]],
           seeds: int | list[int] | tuple[int, ...], out: Path) -> TuningChoice:
    """Read every tuning run's final metric on the validation split, judge each grid point
    by its mean over the tuning seeds (accord.bench.tuning: a point with a seed that did not end
    ok never wins; a tie goes to the first point in grid order), pick each arm's best and
    write ``OUT/<group>/tuning.json`` per group (the grid, the seeds, each point's mean,
    spread, status and per-seed runs, the choice)."""
    seeds = check_tune_seeds(_seed_list(seeds))
    points = grid_points(grid)
    arms: dict[tuple, RunSpec] = {}
    for spec in specs:
        arms.setdefault(_arm(spec), spec)
    chosen: dict[tuple, dict[str, str] | None] = {}
    records: dict[tuple, TuningArm] = {}
    per_group: dict[str, list[TuningArm]] = {}
    for key, template in arms.items():
        metric, higher = selection_metric(template.task)
        runs = tuning_specs([template], grid, seeds)  # point by point, seed by seed
        rows = []
        for i, point in enumerate(points):
            results = []
            for spec in runs[i * len(seeds):(i + 1) * len(seeds)]:
                cfg = spec.config(out)
                validate(cfg, check_out=False)  # fills in the defaults, as the run recorded
                prev = previous(cfg)
                value = (prev.summary or {}).get(metric) if prev.state == "ok" else None
                results.append(TuningRun(
                    cfg.seed, float(value) if isinstance(value, int | float)
                    and math.isfinite(value) else None,
                    _TUNING_STATUS.get(prev.state, prev.state),
                    Path(cfg.out).relative_to(out / template.group).as_posix()))
            rows.append(TuningPoint({k: _setting_value(cfg, k) for k in point},
                                    tuple(results)))
        best = best_point([p.value for p in rows], higher)
        chosen[key] = points[best] if best is not None else None
        records[key] = TuningArm(template.task, template.workers, template.label, metric,
                                 higher, rows, rows[best].setting if best is not None else None,
                                 rows[best].value if best is not None else None)
        per_group.setdefault(template.group, []).append(records[key])
    files = []
    for group, arm_rows in per_group.items():
        path = out / group / TUNING_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        # save keeps the arms of an earlier bench over another part of the group
        save_tuning(Tuning({k: [_number(v) for v in vs] for k, vs in grid.items()}, seeds,
                           "val", arm_rows), path)
        files.append(path)
    return TuningChoice(chosen, files, records)


def apply_choice(specs: list[RunSpec], tuning: TuningChoice) -> list[RunSpec]:
    """The evaluation runs at each arm's chosen point (an arm without one keeps its own
    settings)."""
    out = []
    for spec in specs:
        point = tuning.chosen.get(_arm(spec))
        out.append(apply_overrides([spec], [f"{k}={v}" for k, v in point.items()])[0]
                   if point else spec)
    return out


def _spread(arm: TuningArm) -> str:
    """`` (eval_acc 0.93 +- 0.01 over 3 seeds)`` for the chosen point, or nothing."""
    point = next((p for p in arm.points if arm.chosen is not None
                  and p.setting == arm.chosen), None)
    if point is None or point.value is None:
        return ""
    std = f" +- {point.std:.2g}" if point.std is not None else ""
    n = len(point.runs)
    return f" ({arm.metric} {point.value:.4g}{std} over {n} seed{'s' * (n != 1)})"


def tuning_table(specs: list[RunSpec], grid: dict[str, list[str]],
                 tuning: TuningChoice) -> str:
    """One line per arm: the chosen point (with its mean and spread over the tuning seeds),
    or why there is none."""
    lines = []
    seen = set()
    for spec in specs:
        key = _arm(spec)
        if key in seen:
            continue
        seen.add(key)
        point = tuning.chosen.get(key)
        record = tuning.records.get(key)
        text = (", ".join(f"{k}={v}" for k, v in point.items()) +
                (_spread(record) if record is not None else "") if point else
                "no grid point finished on every tuning seed: evaluated at its own settings")
        lines.append(f"tuned {spec.label} {spec.task} x{spec.workers}: {text}")
    return "\n".join(lines)
