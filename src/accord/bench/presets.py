"""Benchmark matrices: algorithms x tasks x worker counts x seeds (x hyperparameter variants).

Each run is a normal ``accord train`` run (same launcher, same ``metrics.jsonl``) in its
own directory ``OUT/<preset>/<task>/w<workers>/<label>/seed<k>`` (``custom`` for a matrix
given on the command line). A label is one directory name: letters, digits, ``.``, ``_``
and ``-``, not ``.`` or ``..``; any other label is refused (ConfigError) before any run
starts.

**Reuse.** A run directory is reused, not run again, when its ``metrics.jsonl`` ended with
status ``ok`` or ``diverged`` (a diverged run is a result: rerunning it would diverge
again) *and* its header's ``config`` equals the requested ``TrainConfig.to_json()`` in
every field (a field an older header lacks counts as changed, except those of
``TrainConfig.ADDED_DEFAULTS``, which take the value the older run had) except those in
``IGNORED_FIELDS``, which do not change what a run computes:
``out`` (the bench chooses the path), ``progress``, ``tensorboard``, ``timeout`` and
``idle_timeout``. So an interrupted bench resumes where it stopped, and a bench with
other ``--steps``, ``--set`` or presets reruns exactly the runs whose config changed,
saying why on one line each (``bench: rerunning LABEL TASK xN seed K: the config changed
(steps 10 -> 30)``). A run that failed, was interrupted or has no summary is rerun too.
A field missing from an older header counts as changed. Before a run starts, its
directory is removed, so no file of an earlier attempt is mixed in.

**Outcomes.** Each run's outcome is appended to ``OUT/bench.jsonl`` (``OUTCOME_SCHEMA``,
checked before each line is written: ``run``, ``label``, ``task``, ``workers``, ``seed``,
``seconds``, ``status``): ``ok``, ``diverged`` (with ``diverged_step``), ``failed`` (with
``error``) or ``interrupted``; the bench goes on after a failed or diverged run and stops
(resumably) when interrupted. What the bench reads back is the run directories'
``metrics.jsonl`` (:func:`previous`, through ``accord.metrics.scan_metrics`` and its schema)
and ``tuning.json`` (``accord.tuning``'s schema, checked when written and when read); a
``tuning.json`` that cannot be read is written anew. The summary
table (:func:`summary_table`) averages only the seeds that ended ok under the requested
config; a diverged seed is never averaged but named in the row's note ("seed 2 diverged
at step 40"), as are failed runs and runs not done; a missing value is shown as ``-``.

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
* ``failures-ft`` -- real deaths (needs ``accord[ft]``): ranks 2 and 5 of 8 SIGKILLed at a
  third of 240 steps of 40 ms emulated compute; easgd uniform, easgd dynamic and
  local_sgd, each without deaths (``-plain``: the normal launcher; ``-clean``:
  fault-tolerant), fault-tolerant with the deaths and one respawn (``-ft``) and
  restarted from checkpoints by the normal launcher
  (``-restart``), 3 seeds, digits.
* ``dynamic-weighting`` -- asynchronous easgd with uniform vs dynamic weighting under SGD
  and AdaHessian, 4 and 8 workers, periods 1, 4 and 16, one or two frozen ranks and one
  3x slow rank, 3 seeds, on digits.
* ``network`` -- allreduce (plain, bf16, PowerSGD), local_sgd and diloco at periods 8 and
  32, wagma, gossip and easgd on shakespeare with 8 workers on emulated 10 Gbit/s, 1 Gbit/s
  and 100 Mbit/s links (``OUT/network-<link>/``), 3 seeds.
* ``acga-ablation-tuned``, ``elastic-tuned`` -- those presets with each arm at its own
  learning rate (see ``--tune``: each grid point judged by its mean over the tuning seeds,
  ``TUNE_SEEDS`` by default); not part of ``all``.
* ``all`` -- every preset above.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from ..config import MAX_SEED, ConfigError, TrainConfig, apply_settings, validate
from ..launch import launch  # noqa: F401  (accord.bench.launch: see _bench)
from ..metrics import Outcome, run_outcome, scan_metrics
from ..rundir import holder
from ..schema import Int, Nullable, Number, Record, SchemaError, Text
from ..schema import validate as check_schema
from ..tuning import TUNING_FILE, Tuning, TuningArm, TuningPoint, TuningRun, best_point
from ..tuning import load as load_tuning
from ..tuning import parse as parse_tuning


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


def _quick() -> list[RunSpec]:
    arms = [("allreduce", "allreduce", {}, {}), ("normalized", "normalized", {}, {}),
            ("acga", "acga", {}, {}), ("local_sgd", "local_sgd", {"period": 4}, {}),
            ("easgd", "easgd", {"period": 4}, {}), ("wagma", "wagma", {}, {})]
    return _matrix(arms, [("digits", 300, {"optimizer": "adam", "lr": 3e-3})], [4], [0])


def _acga_ablation_arms() -> list[tuple[str, str, dict, dict]]:
    return [("allreduce", "allreduce", {}, {}), ("normalized", "normalized", {}, {}),
            ("acga-b0", "acga", {"momentum": 0.0}, {}),
            ("acga-b0.9", "acga", {"momentum": 0.9}, {}),
            ("acga-b0.99", "acga", {"momentum": 0.99}, {}),
            ("acga-layer", "acga", {"momentum": 0.99, "per_layer": True}, {}),
            ("adasum", "adasum", {}, {})]


def _acga_ablation() -> list[RunSpec]:
    arms = _acga_ablation_arms()
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


#: the failures-ft preset: a run is this many steps; these ranks are SIGKILLed at a third
FT_STEPS = 240
FT_KILLED = (2, 5)
#: every worker's step compute is emulated by a sleep of this many seconds (so that a
#: replacement has steps left to join)
FT_COMPUTE_S = 0.04


def _failures_ft() -> list[RunSpec]:
    """Real deaths: two of 8 workers SIGKILLed at a third of the run. EASGD with uniform
    and dynamic weighting and local SGD, each four ways: the normal launcher without a
    death (``-plain``, what fault tolerance costs), fault-tolerant without a death
    (``-clean``), fault-tolerant with the two deaths, the first respawned and the second
    not (``-ft``: ``--respawn 1``), and the normal launcher restarting every worker from
    the newest checkpoint (``-restart``: ``--checkpoint-every 20 --max-restarts 2``; the
    second death may come after the first restart). Needs ``accord[ft]``."""
    compute = [f"delay:rank=all,seconds={FT_COMPUTE_S:g}"]
    kills = compute + [f"kill:rank={r},step={FT_STEPS // 3}" for r in FT_KILLED]
    ft = {"fault_tolerant": True, "min_workers": 4}
    arms = []
    for label, algo, hp in (("easgd-uniform", "easgd", {"period": 4}),
                            ("easgd-dynamic", "easgd", {"period": 4, "weighting": "dynamic"}),
                            ("local_sgd", "local_sgd", {"period": 4})):
        arms += [(f"{label}-plain", algo, hp, {"faults": compute}),
                 (f"{label}-clean", algo, hp, {**ft, "faults": compute}),
                 (f"{label}-ft", algo, hp, {**ft, "respawn": 1, "faults": kills}),
                 (f"{label}-restart", algo, hp, {"faults": kills, "checkpoint_every": 20,
                                                 "max_restarts": 2})]
    return _matrix(arms, [("digits", FT_STEPS, {"lr": 0.05, "batch_size": 16,
                                               "log_every": FT_STEPS // 12})], [8], [0, 1, 2])


#: the dynamic-weighting preset: every worker's step compute is emulated by a sleep of this
#: many seconds; the slow worker sleeps 2 more of them (3x); a run is this many steps, the
#: middle third of them frozen on the frozen ranks
DW_COMPUTE_S = 0.02
DW_STEPS = 240
#: workers -> (frozen ranks, slow rank)
DW_FAILURES = {4: ((2,), 3), 8: ((2, 5), 7)}
#: local optimizers: label prefix -> training settings (AdaHessian diverges at lr 0.05 on
#: digits, trains at 0.01)
DW_OPTIMIZERS = {"sgd": {"lr": 0.05}, "adahessian": {"optimizer": "adahessian", "lr": 0.01}}


def dw_faults(workers: int) -> list[str]:
    """The failure pattern of the dynamic-weighting preset at ``workers`` workers."""
    frozen, slow = DW_FAILURES[workers]
    third = DW_STEPS // 3
    return [f"delay:rank=all,seconds={DW_COMPUTE_S:g}",
            f"delay:rank={slow},seconds={2 * DW_COMPUTE_S:g}",
            *(f"freeze:rank={r},start={third},end={2 * third}" for r in frozen)]


def _dynamic_weighting() -> list[RunSpec]:
    """Asynchronous EASGD with uniform vs dynamic weighting under SGD and AdaHessian, 4 and
    8 workers, periods 1, 4 and 16, one or two frozen ranks and one 3x slow rank."""
    specs = []
    for n in DW_FAILURES:
        arms = [(f"{opt}-p{p}-{w}", "easgd",
                 {"period": p, "weighting": w, "asynchronous": True},
                 {"faults": dw_faults(n), "log_every": DW_STEPS // 6, **settings})
                for opt, settings in DW_OPTIMIZERS.items() for p in (1, 4, 16)
                for w in ("uniform", "dynamic")]
        specs += _matrix(arms, [("digits", DW_STEPS, {"batch_size": 16})], [n], [0, 1, 2])
    return specs


#: the network preset's emulated links: name -> --network (bandwidth of the issue's
#: three classes; latencies typical of a data-centre rack, a LAN and a slow WAN)
NETWORK_LINKS = {"10gbit": "10gbit,50us", "1gbit": "1gbit,500us", "100mbit": "100mbit,5ms"}
NETWORK_STEPS = 300


def _network() -> list[RunSpec]:
    """Communication-efficient algorithms on emulated links: 8 workers on shakespeare
    (Adam 3e-3), one group (directory) per link so that each link is a report section of
    its own with the same labels."""
    arms = [("allreduce", "allreduce", {}, {}),
            ("allreduce-bf16", "allreduce", {}, {"compress": "bf16"}),
            ("allreduce-powersgd", "allreduce", {}, {"compress": "powersgd"})]
    for p in (8, 32):
        arms += [(f"local_sgd-p{p}", "local_sgd", {"period": p}, {}),
                 (f"diloco-p{p}", "diloco", {"period": p}, {})]
    arms += [("wagma", "wagma", {}, {}), ("gossip", "gossip", {}, {}),
             ("easgd-p8", "easgd", {"period": 8}, {})]
    specs = []
    for name, link in NETWORK_LINKS.items():
        linked = [(label, algo, hp, {**train, "network": link}) for label, algo, hp, train
                  in arms]
        task = ("shakespeare", NETWORK_STEPS, {"optimizer": "adam", "lr": 3e-3,
                                               "batch_size": 16,
                                               "log_every": NETWORK_STEPS // 10})
        specs += [replace(s, group=f"network-{name}")
                  for s in _matrix(linked, [task], [8], [0, 1, 2])]
    return specs


PRESETS: dict[str, Callable[[], list[RunSpec]]] = {
    "quick": _quick,
    "acga-ablation": _acga_ablation,
    "elastic": _elastic,
    "stragglers": _stragglers,
    "scaling": _scaling,
    "failures": _failures,
    "failures-ft": _failures_ft,
    "dynamic-weighting": _dynamic_weighting,
    "network": _network,
}


def _acga_ablation_tuned() -> list[RunSpec]:
    """The acga-ablation arms on digits and Fashion-MNIST at 8 workers (Adam, 4 samples per
    worker), each arm at its own learning rate (the toy is left out: its step size is the
    oracle's)."""
    arms = _acga_ablation_arms()
    tasks = [("digits", 400, {"optimizer": "adam", "lr": 1e-3, "batch_size": 4}),
             ("fashion", 400, {"optimizer": "adam", "lr": 1e-3, "batch_size": 4})]
    return _matrix(arms, tasks, [8], [0, 1, 2])


#: presets tuned by default: name -> (runs, grid); ``--tune`` replaces the grid
TUNED_PRESETS: dict[str, tuple[Callable[[], list[RunSpec]], dict[str, list[str]]]] = {
    # (1e-2 was the best of 3e-4..1e-2 for five of the seven arms on digits: 3e-2 added)
    "acga-ablation-tuned": (_acga_ablation_tuned,
                            {"lr": ["3e-4", "1e-3", "3e-3", "1e-2", "3e-2"]}),
    "elastic-tuned": (_elastic, {"lr": ["0.01", "0.03", "0.1", "0.3"]}),
}


def preset_names() -> list[str]:
    return [*PRESETS, *TUNED_PRESETS, "all"]


def preset(name: str) -> list[RunSpec]:
    """The runs of a preset; each preset's runs live under ``OUT/<preset>/``. ``all`` is
    every untuned preset (the tuned ones run many times more)."""
    if name in TUNED_PRESETS:
        return [replace(s, group=name) for s in TUNED_PRESETS[name][0]()]
    names = list(PRESETS) if name == "all" else [name]
    if any(n not in PRESETS for n in names):
        raise ConfigError(f"preset: unknown {name!r}; allowed: {', '.join(preset_names())}")
    # a preset may split its runs into several directories (network: one per link)
    return [s if s.group != "custom" else replace(s, group=n)
            for n in names for s in PRESETS[n]()]


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
    from .. import faults as fault_specs

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


# -- tuning -----------------------------------------------------------------------------------

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


#: what a tuning run's state counts as in tuning.json (see accord.tuning)
_TUNING_STATUS = {"absent": "not run", "stale": "not run", "unreadable": "failed",
                  "incomplete": "failed", "interrupted": "not run"}


def choose(specs: list[RunSpec], grid: dict[str, list[str]],
           seeds: int | list[int] | tuple[int, ...], out: Path) -> TuningChoice:
    """Read every tuning run's final metric on the validation split, judge each grid point
    by its mean over the tuning seeds (accord.tuning: a point with a seed that did not end
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
        record = Tuning({k: [_number(v) for v in vs] for k, vs in grid.items()}, seeds, "val",
                        arm_rows)
        # a bench over part of the group (--tasks fashion after --tasks digits) keeps the
        # other arms' tuning when it was the same grid and seeds
        try:
            before = load_tuning(path)
        except (OSError, SchemaError):  # unreadable or not of the schema: written anew
            before = None
        if before is not None and (before.grid, before.seeds) == (record.grid, record.seeds):
            mine = {(a.task, a.workers, a.label) for a in arm_rows}
            record.arms = [a for a in before.arms
                           if (a.task, a.workers, a.label) not in mine] + arm_rows
        data = record.to_json()
        parse_tuning(data)  # what every reader will demand (accord.tuning.SCHEMAS)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)
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


# -- reuse ------------------------------------------------------------------------------------

#: TrainConfig fields that do not change a run's results, ignored when deciding reuse: where
#: the run is written (bench puts it at its own path anyway), the progress bar, TensorBoard
#: files, and the timeouts (they decide whether a run fails, not what a finished run computed)
IGNORED_FIELDS = ("out", "progress", "tensorboard", "timeout", "idle_timeout")
_ABSENT = object()


def _short(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 40 else text[:37] + "..."


def _resolved(config: dict[str, Any]) -> dict[str, Any]:
    """``device`` and ``backend`` as the run uses them (``auto`` resolved on this machine; a
    record from before they existed ran on the CPU with gloo)."""
    out = {**TrainConfig.ADDED_DEFAULTS, **config}
    probe = TrainConfig(device=out.get("device", "cpu"), backend=out.get("backend", "gloo"))
    out["device"], out["backend"] = probe.resolved_device(), probe.resolved_backend()
    return out


def config_changes(requested: dict[str, Any], recorded: dict[str, Any]) -> list[str]:
    """The fields (``hyperparameters.key`` inside dicts) whose recorded value differs from
    the requested one, as "field old -> new", fields of IGNORED_FIELDS left out. A field
    the record lacks (written by an older accord) counts as changed."""
    requested = _resolved(json.loads(json.dumps(requested)))  # tuples -> lists, as in the file
    recorded = _resolved(recorded)
    changes = []
    for key in sorted(set(requested) | set(recorded)):
        if key in IGNORED_FIELDS:
            continue
        new, old = requested.get(key, _ABSENT), recorded.get(key, _ABSENT)
        if isinstance(new, dict) and isinstance(old, dict):
            changes += [f"{key}.{k} {_short(old.get(k, _ABSENT))} -> "
                        f"{_short(new.get(k, _ABSENT))}"
                        for k in sorted(set(new) | set(old))
                        if old.get(k, _ABSENT) != new.get(k, _ABSENT)]
        elif new != old:
            changes.append(f"{key} {_short(old)} -> {_short(new)}")
    return changes


@dataclass(frozen=True)
class Previous:
    """What a run directory holds for a requested config, and what bench does with it.

    ``action``: ``reuse`` (a run that ended ok or diverged under the same config), ``run``
    (nothing there yet) or ``rerun`` (``reason`` says why). ``state``: ``absent``,
    ``unreadable`` (no metrics.jsonl or no header in it), ``stale`` (another config), or the
    run's outcome status (ok, diverged, failed, interrupted, incomplete)."""

    action: str
    state: str
    reason: str = ""
    outcome: Outcome | None = None
    summary: dict[str, Any] | None = None


def previous(cfg: TrainConfig) -> Previous:
    """See :class:`Previous`; never raises on a damaged file (that run is rerun)."""
    run_dir = Path(cfg.out)
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        if run_dir.is_dir() and any(run_dir.iterdir()):
            return Previous("rerun", "unreadable", "the last attempt left no metrics.jsonl")
        return Previous("run", "absent")
    try:
        scan = scan_metrics(path)
    except OSError as e:
        return Previous("rerun", "unreadable",
                        f"its metrics.jsonl cannot be read ({e.strerror or e})")
    header = next((r for r in scan.records if r.get("type") == "header"), None)
    recorded = header.get("config") if header is not None else None
    if not isinstance(recorded, dict):
        return Previous("rerun", "unreadable", "its metrics.jsonl has no header record")
    changes = config_changes(cfg.to_json(), recorded)
    if changes:
        more = f", +{len(changes) - 3} more" if len(changes) > 3 else ""
        return Previous("rerun", "stale", f"the config changed ({', '.join(changes[:3])}{more})")
    outcome = run_outcome(scan.records)
    summary = next((r for r in reversed(scan.records) if r.get("type") == "summary"), None)
    if outcome.status in ("ok", "diverged"):
        return Previous("reuse", outcome.status, "", outcome, summary)
    return Previous("rerun", outcome.status, f"the last attempt {_past(outcome)}", outcome,
                    summary)


def _past(outcome: Outcome) -> str:
    if outcome.status == "failed":
        cause = outcome.cause()
        return "failed" + (f" ({cause})" if cause else "")
    if outcome.status == "interrupted":
        return "was interrupted"
    return "is incomplete" + (f" ({outcome.error})" if outcome.error else
                              " (no summary record)")


def finished(cfg: TrainConfig) -> bool:
    """True when the run directory holds a run that ended ok under this very config (its
    numbers can be used); a diverged run is reused by the bench but is not ``finished``."""
    prev = previous(cfg)
    return prev.action == "reuse" and prev.outcome is not None and prev.outcome.status == "ok"


def _clear(run_dir: Path, out: Path) -> None:
    """Remove a previous attempt before rerunning, so no old file is mixed in; only ever a
    directory strictly inside the bench's output folder, and never one a live run holds
    (the launcher then refuses the run, and the bench records that as a failure)."""
    try:
        inside = run_dir.resolve().is_relative_to(out.resolve()) and \
            run_dir.resolve() != out.resolve()
    except OSError:
        inside = False
    if inside and run_dir.exists() and holder(run_dir) is None:
        shutil.rmtree(run_dir)


# -- running ----------------------------------------------------------------------------------

#: a line of ``OUT/bench.jsonl``, one per run the bench started (accord never reads it back:
#: the run directories are the bench's state; this is its log, for people and scripts)
OUTCOME_SCHEMA = Record({
    "run": Text(), "label": Text(), "task": Text(), "workers": Int(1), "seed": Int(),
    "seconds": Number(),  # a wall-clock difference: negative if the clock was set back
    "status": Text(choices=("ok", "diverged", "failed", "interrupted")),
    "diverged_step": Nullable(Int(0)), "error": Text(),
}, required=("run", "label", "task", "workers", "seed", "seconds", "status"))

@dataclass
class BenchResult:
    ran: int = 0  # runs that ended (ok or diverged) in this bench
    skipped: int = 0  # reused from an earlier bench
    failed: list[tuple[str, str]] = field(default_factory=list)
    diverged: list[tuple[str, int | None]] = field(default_factory=list)
    rerun: list[tuple[str, str]] = field(default_factory=list)  # (run, why not reused)


def _bench() -> ModuleType:
    """The package :mod:`accord.bench`. The launcher (``launch``) and :func:`run_bench` are
    looked up on it when a run starts, not bound here, so that replacing
    ``accord.bench.launch`` or ``accord.bench.run_bench`` (as the tests do, to start no
    worker) reaches every run started from here, as when the bench was one module."""
    return sys.modules[__package__]


def _name(cfg: TrainConfig) -> str:
    return f"{cfg.label} {cfg.task} x{cfg.workers} seed {cfg.seed}"


def run_bench(configs: list[TrainConfig], out: Path, *, progress: bool = True,
              echo: Callable[[str], None] = print) -> BenchResult:
    """Run every config not reusable yet, one after another; outcomes go to bench.jsonl."""
    from tqdm import tqdm

    result = BenchResult()
    todo = []
    for cfg in configs:
        prev = previous(cfg)
        if prev.action == "reuse":
            result.skipped += 1
            continue
        if prev.action == "rerun":
            result.rerun.append((_name(cfg), prev.reason))
        todo.append(cfg)
    if result.skipped:
        echo(f"bench: {result.skipped} of {len(configs)} runs already finished under the same "
             "config, reusing them")
    for name, reason in result.rerun:
        echo(f"bench: rerunning {name}: {reason}")
    # weight runs by steps x workers so the time estimate follows the work, not the count
    weights = [c.steps * c.workers for c in todo]
    bar = tqdm(total=sum(weights), disable=not progress, unit="work", dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")
    log = (out / "bench.jsonl").open("a", encoding="utf-8")
    try:
        for i, (cfg, weight) in enumerate(zip(todo, weights, strict=True)):
            name = _name(cfg)
            bar.set_description(f"[{i + 1}/{len(todo)}] {name}")
            _clear(Path(cfg.out), out)
            start = time.time()
            if cfg.fault_tolerant:  # its own launcher (a Lighthouse, replica groups)
                from ..ft_run import ft_launch

                launched = ft_launch(cfg)
            else:
                launched = _bench().launch(cfg, quiet=True)
            record = {"run": cfg.out, "label": cfg.label, "task": cfg.task,
                      "workers": cfg.workers, "seed": cfg.seed,
                      "seconds": time.time() - start}
            record.update(_launch_outcome(cfg, launched.returncode, launched.message))
            if record["status"] == "diverged":
                result.ran += 1
                result.diverged.append((name, record.get("diverged_step")))
                step = record.get("diverged_step")
                bar.write(f"bench: {name} diverged "
                          f"{'(step unknown)' if step is None else f'at step {step}'}")
            elif record["status"] == "ok":
                result.ran += 1
            elif record["status"] == "failed":
                result.failed.append((name, record["error"]))
                bar.write(f"bench: {name} failed: {record['error']}")
            log.write(json.dumps(check_schema(OUTCOME_SCHEMA, record, "bench.jsonl")) + "\n")
            log.flush()
            bar.update(weight)
            if launched.returncode == 130:
                raise KeyboardInterrupt
    finally:
        bar.close()
        log.close()
    return result


def tuned_groups(specs: list[RunSpec]) -> list[RunSpec]:
    """Runs tuned from the command line go to ``<group>-tuned`` (so the untuned runs of the
    same preset stay as they are); a tuned preset's group already is one."""
    return [s if s.group.endswith("-tuned") else replace(s, group=f"{s.group}-tuned")
            for s in specs]


def run_tuned(specs: list[RunSpec], grid: dict[str, list[str]],
              seeds: int | list[int] | tuple[int, ...], out: Path, *, progress: bool = True,
              echo: Callable[[str], None] = print
              ) -> tuple[list[TrainConfig], BenchResult, TuningChoice]:
    """Tune, then evaluate: every arm's grid on each tuning seed (one seed: a list of one)
    on the validation split, each arm's best point by its mean final metric over the tuning
    seeds (:func:`choose`), then the evaluation seeds on the test split at that point. Every
    run of both phases is validated before the first starts (the evaluation runs at the
    grid's points, which the tuning runs check); both phases reuse finished runs, one per
    (point, seed), so an interrupted tuning resumes."""
    seeds = _seed_list(seeds)
    tune_configs = plan(tuning_specs(specs, grid, seeds), out)
    plan(specs, out)
    on = (f"on seed {seeds[0]}" if len(seeds) == 1 else
          f"on seeds {', '.join(map(str, seeds))}, each point judged by its mean over them")
    echo(f"bench: tuning {' x '.join(grid)} ({len(grid_points(grid))} points) {on}, "
         f"on the validation split: {len(tune_configs)} runs")
    first = _bench().run_bench(tune_configs, out, progress=progress, echo=echo)
    tuning = choose(specs, grid, seeds, out)
    for line in tuning_table(specs, grid, tuning).splitlines():
        echo(line)
    configs = plan(apply_choice(specs, tuning), out)
    echo(f"bench: evaluating {len(configs)} runs on the test split at the chosen values")
    second = _bench().run_bench(configs, out, progress=progress, echo=echo)
    merged = BenchResult(first.ran + second.ran, first.skipped + second.skipped,
                         first.failed + second.failed, first.diverged + second.diverged,
                         first.rerun + second.rerun)
    return configs, merged, tuning


def _launch_outcome(cfg: TrainConfig, returncode: int, message: str) -> dict[str, Any]:
    """status (ok, diverged, failed, interrupted) and its details for bench.jsonl: the run's
    own summary record when it has one, else the launcher's exit status and message."""
    try:
        outcome = run_outcome(scan_metrics(Path(cfg.out) / "metrics.jsonl").records)
    except OSError:
        outcome = Outcome("incomplete")
    if returncode == 130 or outcome.status == "interrupted":
        return {"status": "interrupted"}
    if outcome.status == "diverged":
        return {"status": "diverged", "diverged_step": outcome.diverged_step}
    if returncode == 0 and outcome.status == "ok":
        return {"status": "ok"}
    error = message or outcome.cause() or (
        f"exit status {returncode}, {outcome.describe()}")
    return {"status": "failed", "error": error}


# -- the table --------------------------------------------------------------------------------

def _cell(value: float | None, spec: str, width: int) -> str:
    return f"{'-' if value is None else format(value, spec):>{width}}"


def summary_table(configs: list[TrainConfig]) -> str:
    """Final metrics per (task, workers, label), the mean over the seeds that ended ok under
    the requested config; diverged seeds are never averaged but named in the last column
    ("seed 2 diverged at step 40"), as are the runs that failed or did not end."""
    groups: dict[tuple, dict[str, list]] = {}
    for cfg in configs:
        g = groups.setdefault((cfg.task, cfg.workers, cfg.label),
                              {"ok": [], "diverged": [], "other": []})
        prev = previous(cfg)
        if prev.action == "reuse" and prev.state == "ok":
            g["ok"].append(prev.summary or {})
        elif prev.action == "reuse":  # diverged
            g["diverged"].append((cfg.seed, prev.outcome.diverged_step))
        else:
            g["other"].append({"absent": "not run", "stale": "run with another config",
                               "unreadable": "failed"}.get(prev.state, prev.state))
    lines = [f"{'task':<12} {'workers':>7} {'label':<16} {'seeds':>5} {'eval_loss':>10} "
             f"{'eval_acc':>8} {'time_s':>7} {'MB/worker':>9}  note"]
    for (task, workers, label), g in groups.items():
        runs = g["ok"]
        mb = _mean(runs, "comm_bytes_mean")
        if mb is None:
            mb = _mean(runs, "comm_bytes")
        notes = [f"seed {seed} diverged " + ("(step unknown)" if step is None
                                            else f"at step {step}")
                 for seed, step in g["diverged"]]
        notes += [f"{n} {what}" for what, n in Counter(g["other"]).items()]
        lines.append(f"{task:<12} {workers:>7} {label:<16} {len(runs):>5} "
                     f"{_cell(_mean(runs, 'eval_loss'), '.4g', 10)} "
                     f"{_cell(_mean(runs, 'eval_acc'), '.4f', 8)} "
                     f"{_cell(_mean(runs, 'time_s'), '.1f', 7)} "
                     f"{_cell(None if mb is None else mb / 1e6, '.2f', 9)}  "
                     f"{'; '.join(notes)}".rstrip())
    return "\n".join(lines)


def _mean(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records
              if isinstance(r.get(key), int | float) and not isinstance(r.get(key), bool)
              and math.isfinite(r[key])]
    return sum(values) / len(values) if values else None
