"""Benchmark matrices: algorithms x tasks x worker counts x seeds (x hyperparameter variants).

Each run is a normal ``accord train`` run (same launcher, same ``metrics.jsonl``) in its
own directory ``OUT/<preset>/<task>/w<workers>/<label>/seed<k>`` (``custom`` for a matrix
given on the command line). Runs whose directory already holds
a finished run are skipped, so an interrupted bench resumes where it stopped; a run that
fails is recorded in ``OUT/bench.jsonl`` with its error and the bench goes on.

Presets are named lists of :class:`RunSpec` built in code (``PRESETS``):

* ``quick`` -- digits, 4 workers, one seed: allreduce, normalized, acga, local_sgd, easgd
  and wagma. The ``make demo`` default.
* ``acga-ablation`` -- the AdaCons toy (oracle step size) and digits with small per-worker
  batches (worker gradients disagree): averaging, normalised averaging, ACGA beta 0 / 0.9 /
  0.99, per-layer ACGA and AdaSum, at 4 and 8 workers, 3 seeds.
* ``elastic`` -- allreduce, local_sgd, easgd, EAMSGD, lsgd and grawa on digits with 8
  workers at periods 1, 4 and 16, 3 seeds.
* ``stragglers`` -- allreduce, wagma (wait-avoiding and synchronous), gossip,
  elastic_gossip, dpsgd, local_sgd and asynchronous easgd on digits with 8 workers, each
  worker's compute emulated as a 40 ms sleep, under a transient 4x straggler (one random
  rank per step) and a persistent one (rank 3); and allreduce against wagma
  (wait-avoiding, synchronous, and wait-avoiding with no global average) with two 4x slow
  ranks in one group (ranks 2 and 3).
* ``scaling`` -- the same algorithms at 2, 4 and 8 workers, short runs, for bytes per
  worker per step.
* ``failures`` -- easgd with uniform and with dynamic weighting, 8 workers, ranks 2 and 5
  frozen for the middle third of 300 steps, 3 seeds, under SGD, Nesterov 0.9 and Adam.
* ``all`` -- every preset above.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .config import ConfigError, TrainConfig, apply_settings, validate
from .launch import launch
from .metrics import read_metrics


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

    def config(self, out: Path) -> TrainConfig:
        run_dir = (out / self.group / self.task / f"w{self.workers}" / self.label
                   / f"seed{self.seed}")
        return TrainConfig(algo=self.algo, task=self.task, workers=self.workers,
                           steps=self.steps, seed=self.seed, out=str(run_dir),
                           label=self.label, progress=False,
                           hyperparameters=dict(self.hyperparameters),
                           **{"log_every": max(1, self.steps // 20), **self.train})


def _matrix(arms: list[tuple[str, str, dict, dict]], tasks: list[tuple[str, int, dict]],
            workers: list[int], seeds: list[int]) -> list[RunSpec]:
    """arms: (label, algo, hyperparameters, train settings); tasks: (task, steps, settings)."""
    return [RunSpec(label, algo, task, n, seed, steps, dict(hp), {**task_train, **train})
            for task, steps, task_train in tasks for n in workers
            for label, algo, hp, train in arms for seed in seeds]


def _quick() -> list[RunSpec]:
    arms = [("allreduce", "allreduce", {}, {}), ("normalized", "normalized", {}, {}),
            ("acga", "acga", {}, {}), ("local_sgd", "local_sgd", {"period": 4}, {}),
            ("easgd", "easgd", {"period": 4}, {}), ("wagma", "wagma", {}, {})]
    return _matrix(arms, [("digits", 300, {"optimizer": "adam", "lr": 3e-3})], [4], [0])


def _acga_ablation() -> list[RunSpec]:
    arms = [("allreduce", "allreduce", {}, {}), ("normalized", "normalized", {}, {}),
            ("acga-b0", "acga", {"momentum": 0.0}, {}),
            ("acga-b0.9", "acga", {"momentum": 0.9}, {}),
            ("acga-b0.99", "acga", {"momentum": 0.99}, {}),
            ("acga-layer", "acga", {"momentum": 0.99, "per_layer": True}, {}),
            ("adasum", "adasum", {}, {})]
    specs = []
    for n in (4, 8):
        toy = ("linreg", 500, {"oracle_lr": True, "accum_steps": 2, "batch_size": 128 // n})
        digits = ("digits", 400, {"optimizer": "adam", "lr": 1e-3, "batch_size": 4})
        specs += _matrix(arms, [toy, digits], [n], [0, 1, 2])
    return specs


def _elastic() -> list[RunSpec]:
    arms = [("allreduce", "allreduce", {}, {})]
    for p in (1, 4, 16):
        arms += [(f"local_sgd-p{p}", "local_sgd", {"period": p}, {}),
                 (f"easgd-p{p}", "easgd", {"period": p, "beta": 0.9}, {}),
                 (f"eamsgd-p{p}", "easgd", {"period": p, "beta": 0.9},
                  {"optimizer": "nesterov", "momentum": 0.9}),
                 (f"lsgd-p{p}", "lsgd", {"period": p}, {}),
                 (f"grawa-p{p}", "grawa", {"period": p}, {})]
    return _matrix(arms, [("digits", 400, {"lr": 0.05, "batch_size": 16})], [8], [0, 1, 2])


#: every worker's step compute is emulated by a sleep of this many seconds (on top of the
#: real, tiny digits step) so that 8 workers on 2 cores behave like 8 machines; a 4x
#: straggler sleeps 3 more of them
COMPUTE_S = 0.04
STRAGGLER_STEPS = 200
PATTERNS = {
    "transient": [f"delay:rank=random,seconds={3 * COMPUTE_S:g}"],
    "persistent": [f"delay:rank=3,seconds={3 * COMPUTE_S:g}"],
    # two slow ranks in one WAGMA group (ranks 2 and 3 pair up in phase 0 with 8 workers)
    "pair": [f"delay:rank={r},seconds={3 * COMPUTE_S:g}" for r in (2, 3)],
}
#: the ranks each pattern slows down throughout (the transient straggler moves)
SLOW_RANKS = {"transient": (), "persistent": (3,), "pair": (2, 3)}


def _decentralized_arms() -> list[tuple[str, str, dict, dict]]:
    return [("allreduce", "allreduce", {}, {}),
            ("wagma", "wagma", {"wait_avoiding": True}, {}),
            ("wagma-sync", "wagma", {"wait_avoiding": False}, {}),
            ("gossip", "gossip", {}, {}),
            ("elastic_gossip", "elastic_gossip", {}, {}),
            ("dpsgd", "dpsgd", {}, {}),
            ("local_sgd", "local_sgd", {"period": 4}, {}),
            ("easgd-async", "easgd", {"period": 4, "asynchronous": True}, {})]


def _pair_arms() -> list[tuple[str, str, dict, dict]]:
    """The arms of the two-slow-ranks pattern: WAGMA against allreduce, with and without
    its blocking global average (which waits for the slowest worker every period)."""
    return [("allreduce", "allreduce", {}, {}),
            ("wagma", "wagma", {"wait_avoiding": True}, {}),
            ("wagma-sync", "wagma", {"wait_avoiding": False}, {}),
            ("wagma-p1000", "wagma", {"wait_avoiding": True, "period": 1000}, {})]


def _stragglers() -> list[RunSpec]:
    """8 workers on digits under a transient (one random rank per step), a persistent
    (rank 3 throughout) 4x straggler, and two 4x slow ranks in one WAGMA group (ranks 2
    and 3); only the final record is logged, because a metrics record synchronises all
    workers."""
    specs = []
    for pattern, slow in PATTERNS.items():
        faults = [f"delay:rank=all,seconds={COMPUTE_S:g}", *slow]
        arms = [(f"{pattern}-{label}", algo, hp, {"faults": faults,
                                                  "log_every": STRAGGLER_STEPS})
                for label, algo, hp, _ in (_pair_arms() if pattern == "pair"
                                           else _decentralized_arms())]
        specs += _matrix(arms, [("digits", STRAGGLER_STEPS, {"lr": 0.05, "batch_size": 16})],
                         [8], [0])
    return specs


def _scaling() -> list[RunSpec]:
    """Bytes per worker per step at 2, 4 and 8 workers (no faults, short runs)."""
    arms = [(label, algo, hp, {"log_every": 24}) for label, algo, hp, _ in
            _decentralized_arms()]
    return _matrix(arms, [("digits", 24, {"lr": 0.05, "batch_size": 16})], [2, 4, 8], [0])


#: local optimizers of the failures preset: label suffix -> training settings
FAILURE_OPTIMIZERS = {"": {}, "-nesterov": {"optimizer": "nesterov", "momentum": 0.9},
                      "-adam": {"optimizer": "adam", "lr": 3e-3}}


def _failures() -> list[RunSpec]:
    """EASGD with uniform vs dynamic weighting, two of 8 workers frozen for the middle
    third of training, under SGD, Nesterov momentum 0.9 and Adam."""
    steps = 300
    third = steps // 3
    faults = [f"freeze:rank={r},start={third},end={2 * third}" for r in (2, 5)]
    arms = [(f"easgd-{weighting}{suffix}", "easgd", {"period": 4, "weighting": weighting},
             {"faults": faults, **settings})
            for suffix, settings in FAILURE_OPTIMIZERS.items()
            for weighting in ("uniform", "dynamic")]
    return _matrix(arms, [("digits", steps, {"lr": 0.05, "batch_size": 16})], [8],
                   [0, 1, 2])


PRESETS: dict[str, Callable[[], list[RunSpec]]] = {
    "quick": _quick,
    "acga-ablation": _acga_ablation,
    "elastic": _elastic,
    "stragglers": _stragglers,
    "scaling": _scaling,
    "failures": _failures,
}


def preset(name: str) -> list[RunSpec]:
    """The runs of a preset; each preset's runs live under ``OUT/<preset>/``."""
    names = list(PRESETS) if name == "all" else [name]
    if any(n not in PRESETS for n in names):
        allowed = ", ".join([*PRESETS, "all"])
        raise ConfigError(f"preset: unknown {name!r}; allowed: {allowed}")
    return [replace(s, group=n) for n in names for s in PRESETS[n]()]


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


def plan(specs: list[RunSpec], out: Path) -> list[TrainConfig]:
    """Validate every run before any starts; ConfigError names the run and the field."""
    configs = []
    labels: dict[tuple, RunSpec] = {}
    for spec in specs:
        key = (spec.group, spec.task, spec.workers, spec.label, spec.seed)
        if key in labels and labels[key] != spec:
            raise ConfigError(f"bench: two different runs share the label {spec.label!r}")
        labels[key] = spec
        cfg = spec.config(out)
        try:
            validate(cfg, check_out=False)
        except ConfigError as e:
            raise ConfigError(f"run {spec.label} ({spec.task}, {spec.workers} workers): {e}") \
                from None
        configs.append(cfg)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".accord-write-test").write_text("")
        (out / ".accord-write-test").unlink()
    except OSError as e:
        raise ConfigError(f"out: cannot write to {str(out)!r} ({e.strerror}); allowed: a "
                          "writable directory") from None
    return configs


def finished(cfg: TrainConfig) -> bool:
    path = Path(cfg.out) / "metrics.jsonl"
    if not path.exists():
        return False
    try:
        records = read_metrics(path)
    except (OSError, ValueError):
        return False
    return bool(records) and records[-1].get("status") == "ok"


@dataclass
class BenchResult:
    ran: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


def run_bench(configs: list[TrainConfig], out: Path, *, progress: bool = True,
              echo: Callable[[str], None] = print) -> BenchResult:
    """Run every config not finished yet, one after another; failures are recorded."""
    from tqdm import tqdm

    result = BenchResult()
    todo = []
    for cfg in configs:
        if finished(cfg):
            result.skipped += 1
        else:
            todo.append(cfg)
    if result.skipped:
        echo(f"bench: {result.skipped} of {len(configs)} runs already finished, skipping them")
    # weight runs by steps x workers so the time estimate follows the work, not the count
    weights = [c.steps * c.workers for c in todo]
    bar = tqdm(total=sum(weights), disable=not progress, unit="work", dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")
    log = (out / "bench.jsonl").open("a", encoding="utf-8")
    try:
        for i, (cfg, weight) in enumerate(zip(todo, weights, strict=True)):
            name = f"{cfg.label} {cfg.task} x{cfg.workers} seed {cfg.seed}"
            bar.set_description(f"[{i + 1}/{len(todo)}] {name}")
            start = time.time()
            launched = launch(cfg, quiet=True)
            record = {"run": cfg.out, "label": cfg.label, "task": cfg.task,
                      "workers": cfg.workers, "seed": cfg.seed,
                      "seconds": time.time() - start,
                      "status": "ok" if launched.returncode == 0 else "failed"}
            if launched.returncode:
                record["error"] = launched.message
                result.failed.append((name, launched.message))
                bar.write(f"bench: {name} failed: {launched.message}")
            else:
                result.ran += 1
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.update(weight)
            if launched.returncode == 130:
                raise KeyboardInterrupt
    finally:
        bar.close()
        log.close()
    return result


def summary_table(configs: list[TrainConfig]) -> str:
    """Final metrics per (task, workers, label), mean over the finished seeds."""
    groups: dict[tuple, list[dict]] = {}
    for cfg in configs:
        if finished(cfg):
            summary = read_metrics(Path(cfg.out) / "metrics.jsonl")[-1]
            groups.setdefault((cfg.task, cfg.workers, cfg.label), []).append(summary)
    lines = [f"{'task':<12} {'workers':>7} {'label':<16} {'seeds':>5} {'eval_loss':>10} "
             f"{'eval_acc':>8} {'time_s':>7} {'MB/worker':>9}"]
    for (task, workers, label), runs in groups.items():
        acc = _mean(runs, "eval_acc")
        mb = _mean(runs, "comm_bytes_mean") or _mean(runs, "comm_bytes") or 0.0
        lines.append(f"{task:<12} {workers:>7} {label:<16} {len(runs):>5} "
                     f"{_mean(runs, 'eval_loss'):>10.4g} "
                     f"{'-' if acc is None else f'{acc:.4f}':>8} "
                     f"{_mean(runs, 'time_s'):>7.1f} {mb / 1e6:>9.2f}")
    return "\n".join(lines)


def _mean(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return sum(values) / len(values) if values else None
