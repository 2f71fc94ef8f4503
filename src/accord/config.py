"""TrainConfig (the settings of one training run), its validation, and ``--set`` parsing.

Everything here runs before any worker process starts: :func:`validate` raises
:class:`ConfigError` naming the first bad field and what is allowed, so the CLI can
print one line and exit with status 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import algorithms, faults
from .metrics import tensorboard_available
from .tasks import get_task

OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw")
BACKENDS = ("gloo", "nccl")
NONFINITE = ("exclude", "skip", "off")


class ConfigError(ValueError):
    """A bad setting, reported as one line before any worker starts."""


@dataclass
class TrainConfig:
    algo: str = "allreduce"
    task: str = "digits"
    workers: int = 2
    steps: int = 100
    seed: int = 0
    out: str = "runs/run"
    lr: float | None = None  # None: the task's default
    batch_size: int | None = None  # per worker and micro-step; None: the task's default
    accum_steps: int = 1
    optimizer: str = "sgd"
    momentum: float | None = None  # optimizer momentum; None: 0 for sgd, 0.9 for nesterov
    weight_decay: float = 0.0
    oracle_lr: bool = False
    log_every: int = 10
    timeout: float = 60.0  # process-group timeout in seconds: a started collective
    idle_timeout: float = 1800.0  # seconds a worker may wait for another's compute
    backend: str = "gloo"
    data_dir: str | None = None  # where a task looks for its data files (task default if None)
    progress: bool = True
    label: str | None = None  # name of this variant in reports (default: the algorithm)
    tensorboard: bool = False  # also write TensorBoard event files to OUT/tensorboard
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)
    nonfinite: str = "exclude"  # a rank's non-finite gradient: exclude it, skip the step, off

    # -- settings reachable with --set key=value when the algorithm has no such key --------
    SETTABLE = ("lr", "batch_size", "accum_steps", "optimizer", "momentum", "weight_decay",
                "oracle_lr", "log_every", "timeout", "idle_timeout", "nonfinite")

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else get_task(self.task).default_lr

    def resolved_batch_size(self) -> int:
        return self.batch_size if self.batch_size is not None else \
            get_task(self.task).default_batch_size

    def resolved_momentum(self) -> float:
        if self.momentum is not None:
            return self.momentum
        return 0.9 if self.optimizer == "nesterov" else 0.0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_argv(self) -> list[str]:
        """Arguments of ``accord train`` that rebuild this config (for worker processes)."""
        argv = ["--algo", self.algo, "--task", self.task, "--workers", str(self.workers),
                "--steps", str(self.steps), "--seed", str(self.seed), "--out", self.out,
                "--accum-steps", str(self.accum_steps), "--optimizer", self.optimizer,
                "--weight-decay", repr(self.weight_decay), "--log-every", str(self.log_every),
                "--timeout", repr(self.timeout), "--idle-timeout", repr(self.idle_timeout),
                "--backend", self.backend,
                "--nonfinite", self.nonfinite]
        if self.lr is not None:
            argv += ["--lr", repr(self.lr)]
        if self.batch_size is not None:
            argv += ["--batch-size", str(self.batch_size)]
        if self.momentum is not None:
            argv += ["--momentum", repr(self.momentum)]
        if self.data_dir is not None:
            argv += ["--data-dir", self.data_dir]
        if self.label is not None:
            argv += ["--label", self.label]
        if self.tensorboard:
            argv.append("--tensorboard")
        if self.oracle_lr:
            argv.append("--oracle-lr")
        if not self.progress:
            argv.append("--no-progress")
        for key, value in self.hyperparameters.items():
            if value is None:  # an unset optional hyperparameter
                continue
            text = json.dumps(value) if isinstance(value, bool) else str(value)
            argv += ["--set", f"algo.{key}={text}"]
        for spec in self.faults:
            argv += ["--fault", spec]
        return argv


def apply_settings(cfg: TrainConfig, settings: list[str]) -> None:
    """Apply ``--set key=value`` items: an algorithm hyperparameter if the algorithm has
    that key, else a training setting. ``algo.key`` / ``train.key`` force the target."""
    spec = algorithms.get(cfg.algo).hyperparameters
    for item in settings:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set: expected key=value, got {item!r}")
        target = None
        if key.startswith("algo."):
            target, key = "algo", key[5:]
        elif key.startswith("train."):
            target, key = "train", key[6:]
        if target == "algo" or (target is None and key in spec):
            if key not in spec:
                allowed = ", ".join(sorted(spec)) or "none"
                raise ConfigError(
                    f"--set: unknown hyperparameter {key!r} for algorithm {cfg.algo!r}; "
                    f"allowed: {allowed}")
            cfg.hyperparameters[key] = value
        elif key in TrainConfig.SETTABLE:
            setattr(cfg, key, _parse_setting(key, value))
        else:
            allowed = sorted(set(spec) | set(TrainConfig.SETTABLE))
            raise ConfigError(
                f"--set: unknown key {key!r}; allowed for {cfg.algo!r}: {', '.join(allowed)}")


def _parse_setting(key: str, value: str) -> Any:
    kind = {f.name: f.type for f in dataclasses.fields(TrainConfig)}[key]
    text = value.strip()
    try:
        if "bool" in kind:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError
            return text.lower() in ("true", "1", "yes", "on")
        if "int" in kind:
            number = float(text)
            if number != int(number):
                raise ValueError
            return int(number)
        if "float" in kind:
            return float(text)
    except ValueError:
        raise ConfigError(f"--set {key}: cannot read {value!r} as {kind}") from None
    return text


def validate(cfg: TrainConfig, *, check_out: bool = True) -> None:
    """Raise ConfigError naming the first bad field and what is allowed."""
    try:
        task = get_task(cfg.task)
        workers = cfg.workers if isinstance(cfg.workers, int) and cfg.workers >= 1 else None
        cfg.hyperparameters = algorithms.validate(cfg.algo, cfg.hyperparameters, workers)
    except ValueError as e:
        raise ConfigError(str(e)) from None

    def need(ok: bool, name: str, allowed: str, value: Any) -> None:
        if not ok:
            raise ConfigError(f"{name}: got {value!r}, allowed: {allowed}")

    need(isinstance(cfg.workers, int) and cfg.workers >= 1, "workers", "an integer >= 1",
         cfg.workers)
    need(isinstance(cfg.steps, int) and cfg.steps >= 1, "steps", "an integer >= 1", cfg.steps)
    need(cfg.lr is None or cfg.lr > 0, "lr", "a number > 0", cfg.lr)
    max_bs = task.max_batch_size
    need(cfg.batch_size is None or 1 <= cfg.batch_size <= (max_bs or float("inf")),
         "batch_size", f"an integer >= 1{f' and <= {max_bs}' if max_bs else ''}",
         cfg.batch_size)
    need(cfg.accum_steps >= 1, "accum_steps", "an integer >= 1", cfg.accum_steps)
    need(cfg.optimizer in OPTIMIZERS, "optimizer", ", ".join(OPTIMIZERS), cfg.optimizer)
    need(cfg.momentum is None or 0.0 <= cfg.momentum < 1.0, "momentum",
         "a number >= 0 and < 1", cfg.momentum)
    need(cfg.weight_decay >= 0.0, "weight_decay", "a number >= 0", cfg.weight_decay)
    need(cfg.log_every >= 1, "log_every", "an integer >= 1", cfg.log_every)
    need(cfg.timeout > 0, "timeout", "seconds > 0", cfg.timeout)
    need(cfg.idle_timeout >= cfg.timeout, "idle_timeout",
         f"seconds >= timeout ({cfg.timeout:g})", cfg.idle_timeout)
    need(cfg.backend in BACKENDS, "backend", ", ".join(BACKENDS), cfg.backend)
    need(cfg.nonfinite in NONFINITE, "nonfinite", ", ".join(NONFINITE), cfg.nonfinite)
    need(not cfg.tensorboard or tensorboard_available(), "tensorboard",
         "only with the tensorboard package installed (pip install tensorboard)",
         cfg.tensorboard)
    try:
        task.check_data(cfg.data_dir)
    except ValueError as e:
        raise ConfigError(f"task {cfg.task!r}: {e}") from None
    if cfg.oracle_lr:
        need(task.has_oracle_lr, "oracle_lr",
             "only with a task that has an oracle step size (linreg)", cfg.oracle_lr)
        need(cfg.optimizer == "sgd" and cfg.resolved_momentum() == 0.0, "oracle_lr",
             "only with --optimizer sgd and momentum 0", cfg.oracle_lr)
    try:
        cfg.faults = [faults.parse(spec, cfg.workers, cfg.steps).spec for spec in cfg.faults]
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if check_out:
        _check_writable(cfg.out)


def _check_writable(out: str) -> None:
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".accord-write-test-{os.getpid()}"  # ranks probe concurrently
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ConfigError(f"out: cannot write to {out!r} ({reason}); allowed: a writable "
                          "directory") from None
