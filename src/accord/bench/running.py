"""Running a bench: every run not reusable yet, one after another, its outcome appended to
``OUT/bench.jsonl`` (``OUTCOME_SCHEMA``); tuning then evaluating (:func:`run_tuned`); and the
summary table of the finished seeds."""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from ..run.config import TrainConfig
from ..run.metrics import Outcome, run_outcome, scan_metrics
from ..schema import Int, Nullable, Number, Record, Text
from ..schema import validate as check_schema
from .reuse import _clear, previous
from .specs import RunSpec, plan
from .tune import (
    TuningChoice,
    _seed_list,
    apply_choice,
    choose,
    grid_points,
    tuning_specs,
    tuning_table,
)


def _bench() -> ModuleType:
    """The package :mod:`accord.bench`. The launcher (``launch``) and :func:`run_bench` are
    looked up on it when a run starts, not bound here, so that replacing
    ``accord.bench.launch`` or ``accord.bench.run_bench`` (as the tests do, to start no
    worker) reaches every run started from here, as when the bench was one module."""
    return sys.modules[__package__]


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
                from ..ft.launcher import ft_launch

                launched = ft_launch(cfg)
            elif cfg.links == "real":  # torchrun across network namespaces
                from ..run.real_links import launch_real

                launched = launch_real(cfg, quiet=True)
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
