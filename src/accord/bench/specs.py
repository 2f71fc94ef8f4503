"""A bench matrix: :class:`RunSpec` (one run: label, algorithm, task, workers, seed,
settings) and its run directory, a matrix from the command line (:func:`custom`),
``--set`` and ``--fault`` applied to every run, labels that are safe directory names, and
:func:`plan`, which validates every run before any starts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..run.config import ConfigError, TrainConfig, apply_settings
from ..run.real_links import check_real_links
from ..run.validation import validate


@dataclass(frozen=True)
class RunSpec:
    label: str
    algo: str
    task: str
    workers: int
    seed: int
    steps: int
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields (lr, ...)
    group: str = "custom"  # the preset: a directory of its own, reported on its own
    point: str = ""  # a tuning run: its grid point's directory, between label and seed

    def config(self, out: Path) -> TrainConfig:
        run_dir = out / self.group / task_dir(self.task) / f"w{self.workers}" / self.label
        if self.point:
            run_dir = run_dir / self.point
        run_dir = run_dir / f"seed{self.seed}"
        return TrainConfig(algo=self.algo, task=self.task, workers=self.workers,
                           steps=self.steps, seed=self.seed, out=str(run_dir),
                           label=self.label, progress=False,
                           hyperparameters=dict(self.hyperparameters),
                           **{"log_every": max(1, self.steps // 20), **self.train})


def task_dir(task: str) -> str:
    """The directory name of a task's runs: a built-in task's name, or for a user task
    (``path/to/file.py:Name``, ``pkg.mod:Name``) ``file.Name`` / ``pkg.mod.Name`` with
    anything but letters, digits, ``.``, ``_`` and ``-`` dropped (never a path)."""
    if ":" not in task:
        return task
    target, _, attr = task.rpartition(":")
    stem = Path(target).stem if target.endswith(".py") else target
    name = re.sub(r"[^A-Za-z0-9._-]", "", f"{stem}.{attr}").strip(".")
    return name or "task"


def _matrix(arms: list[tuple[str, str, dict, dict]], tasks: list[tuple[str, int, dict]],
            workers: list[int], seeds: list[int]) -> list[RunSpec]:
    """arms: (label, algo, hyperparameters, train settings); tasks: (task, steps, settings)."""
    return [RunSpec(label, algo, task, n, seed, steps, dict(hp), {**task_train, **train})
            for task, steps, task_train in tasks for n in workers
            for label, algo, hp, train in arms for seed in seeds]


def custom(algos: list[str], variants: list[str], tasks: list[str], workers: list[int],
           seeds: list[int], steps: int) -> list[RunSpec]:
    """A matrix from the command line: ``algos`` by name, ``variants`` as
    ``LABEL=ALGO[:key=value,key=value]``."""
    arms = [(a, a, {}, {}) for a in algos]
    for v in variants:
        label, sep, rest = v.partition("=")
        algo, _, items = rest.partition(":")
        if not sep or not label or not algo:
            raise ConfigError(f"--variant: expected LABEL=ALGO[:key=value,...], got {v!r}")
        hp = {}
        for item in filter(None, items.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise ConfigError(f"--variant {label}: expected key=value, got {item!r}")
            hp[key] = value
        arms.append((label, algo, hp, {}))
    if not arms:
        raise ConfigError("bench: give --preset, --algos or --variant")
    for label, *_ in arms:
        check_label(label)
    return _matrix(arms, [(t, steps, {}) for t in tasks], workers, seeds)


def apply_overrides(specs: list[RunSpec], settings: list[str]) -> list[RunSpec]:
    """``--set key=value`` for every run (algorithm hyperparameter or training setting)."""
    if not settings:
        return specs
    out = []
    for spec in specs:
        cfg = TrainConfig(algo=spec.algo, hyperparameters=dict(spec.hyperparameters))
        before = {f: getattr(cfg, f) for f in TrainConfig.SETTABLE}
        apply_settings(cfg, settings)
        train = {**spec.train, **{f: getattr(cfg, f) for f in TrainConfig.SETTABLE
                                  if getattr(cfg, f) != before[f]}}
        out.append(replace(spec, hyperparameters=cfg.hyperparameters, train=train))
    return out


def apply_faults(specs: list[RunSpec], faults: list[str]) -> list[RunSpec]:
    """``--fault SPEC`` (repeatable) for every run: added to the run's own faults, and named
    in its label (``acga`` -> ``acga_slow-rank1-factor3``), so a run with injected faults
    never shares a directory, a reuse or a report row with one without. ConfigError (one
    line) for a spec that does not parse for a run's world size and steps."""
    if not faults:
        return specs
    from ..run import faults as fault_specs

    tags = []
    for text in faults:
        kind, _, rest = text.partition(":")
        fields = [f.replace("=", "") for f in rest.split(",") if f]
        tags.append("-".join([kind, *fields]))
    tag = re.sub(r"[^A-Za-z0-9._-]", "", "_".join(tags))
    out = []
    for spec in specs:
        for text in faults:
            try:
                fault_specs.parse(text, spec.workers, spec.steps)
            except ValueError as e:
                raise ConfigError(f"--fault: {str(e).splitlines()[0]}") from None
        label = f"{spec.label}_{tag}"
        check_label(label)
        out.append(replace(spec, label=label, train={
            **spec.train, "faults": [*spec.train.get("faults", []), *faults]}))
    return out


#: a label is one directory name: these characters only, and neither "." nor ".."
SAFE_LABEL = re.compile(r"[A-Za-z0-9._-]+")


def check_label(label: str, what: str = "label") -> None:
    """ConfigError (one line) unless ``label`` is a safe directory name."""
    if not isinstance(label, str) or not SAFE_LABEL.fullmatch(label) or label in (".", ".."):
        raise ConfigError(f"bench: {what} {label!r} is not a safe directory name; allowed: "
                          "letters, digits, '.', '_' and '-' (not '.' or '..')")


def plan(specs: list[RunSpec], out: Path, *, create: bool = True) -> list[TrainConfig]:
    """Validate every run before any starts; ConfigError names the run and the field.
    ``create``: then create ``out`` and check it is writable (:func:`check_out`)."""
    configs = []
    labels: dict[tuple, RunSpec] = {}
    for spec in specs:
        check_label(spec.label)
        check_label(spec.group, "preset directory")
        if spec.point:
            check_label(spec.point, "grid point directory")
        key = (spec.group, spec.task, spec.workers, spec.label, spec.point, spec.seed)
        if key in labels and labels[key] != spec:
            raise ConfigError(f"bench: two different runs share the label {spec.label!r}")
        labels[key] = spec
        cfg = spec.config(out)
        try:
            validate(cfg, check_out=False)
            check_real_links(cfg)  # root and hosts, before the first run of a real-links bench
        except ConfigError as e:
            # a task name with a control character would split the line: quoted then
            task = spec.task if spec.task.isprintable() else repr(spec.task)
            raise ConfigError(f"run {spec.label} ({task}, {spec.workers} workers): {e}") \
                from None
        configs.append(cfg)
    if create:
        check_out(out)
    return configs


def check_out(out: Path) -> None:
    """Create ``out`` and check it is writable; ConfigError (one line) if not."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".accord-write-test").write_text("")
        (out / ".accord-write-test").unlink()
    except OSError as e:
        raise ConfigError(f"out: cannot write to {str(out)!r} ({e.strerror}); allowed: a "
                          "writable directory") from None
