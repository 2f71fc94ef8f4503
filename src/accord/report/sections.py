"""The numbers of the report: a run's final values and the step it reaches a target at,
groups (task, workers, network, label) of seeds, sections (task, workers, network) with
their test metric and target, and a group's final metric against the baseline's (see
docs/reference/report.md: Sections and groups, Test metric and target, Final metrics,
Verdict)."""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fmt import _fmt
from .networks import NetworkInfo, NetworkKey, _network_info, _network_key, _network_slug
from .runs import Run, Warn, _is_eval_key, _num

BASELINE = "allreduce"
ACC_FACTOR = 0.95  # default accuracy target: 0.95 x reference
LOSS_FACTOR = 1.05  # default loss target: 1.05 x reference
#: finished seeds each of two groups needs before their final values can be called apart
SEPARABLE_SEEDS = 3
#: the parts of a run's wall time (:func:`time_breakdown`), in stacking order
TIME_PARTS = ("compute", "communication", "waiting")


SAME_IN_GROUP = ("algorithm", "hyperparameters", "steps", "optimizer", "lr", "batch_size",
                 "accum_steps", "momentum", "weight_decay", "oracle_lr")


def final_values(run: Run) -> dict[str, float | None]:
    """The run's final metrics (see docs/reference/report.md, Final metrics)."""
    last = run.steps[-1] if run.steps else {}
    summary = run.summary or {}
    values: dict[str, float | None] = {}
    for key in [*last, *summary]:
        if _is_eval_key(key) and key not in values:
            if key.startswith("eval_") and key in summary:
                values[key] = _num(summary[key])
            else:
                values[key] = _num(last.get(key))
    steps = _num(summary.get("steps")) or _num(last.get("step"))
    time_s = _num(summary.get("time_s"))
    if time_s is None:
        time_s = _num(last.get("time_s"))
    speed = _num(summary.get("steps_per_s"))
    if speed is None and steps and time_s:
        speed = steps / time_s
    comm = _num(summary.get("comm_bytes"))
    if comm is None:
        comm = _num(last.get("comm_bytes"))
    comm_mean = _num(summary.get("comm_bytes_mean"))
    values.update({
        "time_s": time_s, "steps_per_s": speed, "steps": steps,
        "mb_sent": comm / 1e6 if comm is not None else None,
        "bytes_per_step": comm / steps if comm is not None and steps else None,
        "bytes_per_step_mean_workers":
            comm_mean / steps if comm_mean is not None and steps else None,
    })
    return values


def time_breakdown(run: Run) -> dict[str, float] | None:
    """The run's wall time (the summary's ``time_s``) in :data:`TIME_PARTS`, as rank 0 saw
    it; None without a summary ``time_s`` and ``comm_s``. *communication*: the seconds rank
    0's communicator counted (``comm_s``; a blocking collective's wait for the other ranks is
    in it); *compute*: the rest of rank 0's training loop (``worker_time_s[0]``, else
    ``train_s``, else ``time_s``; forward, backward, optimizer; not the records' own time);
    *waiting*: ``time_s`` minus that loop (start-up, restarts, and waiting at the end for
    slower workers). Communication counted beyond the loop's time (a background thread's,
    overlapping the compute) is capped at it. The parts sum to ``time_s``."""
    summary = run.summary or {}
    total, comm = _num(summary.get("time_s")), _num(summary.get("comm_s"))
    if total is None or comm is None:
        return None
    times = summary.get("worker_time_s")
    loop = _num(times[0]) if isinstance(times, list) and times else None
    if loop is None:
        loop = _num(summary.get("train_s"))
    loop = min(total, loop) if loop is not None else total
    comm = min(max(comm, 0.0), max(loop, 0.0))
    return {"compute": max(loop, 0.0) - comm, "communication": comm,
            "waiting": total - max(loop, 0.0)}


def reach(run: Run, metric: str, target: float, higher: bool) -> dict[str, float] | None:
    """The first step record whose metric reaches the target: step, time_s, mb."""
    for rec in run.steps:
        value = _num(rec.get(metric))
        if value is not None and (value >= target if higher else value <= target):
            comm = _num(rec.get("comm_bytes"))
            return {"step": float(rec["step"]), "time_s": _num(rec.get("time_s")),
                    "mb": comm / 1e6 if comm is not None else None}
    return None


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def _std(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.stdev(vals) if len(vals) >= 2 else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


@dataclass
class Group:
    task: str
    workers: int
    label: str
    runs: list[Run]
    finals: list[dict[str, float | None]] = field(default_factory=list)
    reached: list[dict[str, float] | None] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    def mean(self, key: str) -> float | None:
        return _mean(f.get(key) for f in self.finals)

    def std(self, key: str) -> float | None:
        return _std(f.get(key) for f in self.finals)

    def count(self, key: str) -> int:
        return sum(f.get(key) is not None for f in self.finals)

    def breakdown(self) -> dict[str, float] | None:
        """The mean over seeds of :func:`time_breakdown` (of the seeds that have one)."""
        parts = [b for b in (time_breakdown(r) for r in self.runs) if b is not None]
        if not parts:
            return None
        return {k: statistics.fmean(b[k] for b in parts) for k in TIME_PARTS} | {
            "seeds": float(len(parts))}

    def to_target(self, key: str) -> float | None:
        return _mean(r[key] for r in self.reached if r is not None)

    @property
    def n_reached(self) -> int:
        return sum(r is not None for r in self.reached)


def _slug(task: str, workers: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '-', task)}_w{workers}"


@dataclass
class Section:
    task: str
    workers: int
    groups: list[Group]  # baseline first, then by label
    metric: str = "eval_loss"
    higher: bool = False
    target: float | None = None
    target_rule: str = ""
    network: NetworkInfo = field(default_factory=NetworkInfo)
    network_key: NetworkKey = ()
    slug: str = ""  # figure file names: <task>_w<workers>[_net-<link>]

    def __post_init__(self) -> None:
        if not self.slug:
            self.slug = _slug(self.task, self.workers)
            if self.network.text is not None:
                self.slug += f"_net-{_network_slug(self.network.text)}"

    @property
    def baseline(self) -> Group | None:
        return next((g for g in self.groups if g.label == BASELINE), None)

    @property
    def title(self) -> str:
        title = f"{self.task}, {self.workers} worker{'s' if self.workers != 1 else ''}"
        if self.network.text is not None:
            real = any(r.real_links for g in self.groups for r in g.runs)
            title += f", network {self.network.text} ({'real links' if real else 'emulated'})"
        return title


def _setting(run: Run, key: str) -> Any:
    if key == "algorithm":
        return run.algorithm
    if key == "hyperparameters":
        return (run.header or {}).get("hyperparameters", run.config.get(key))
    return run.config.get(key)


def build_sections(runs: list[Run], target_acc: float | None, target_loss: float | None,
                   warn: Warn, root: Path | None = None) -> list[Section]:
    """The sections (task, workers, network) with their groups, targets and seeds reached;
    ``root`` is where relative network profile paths are also looked for."""
    infos: dict[NetworkKey, NetworkInfo] = {}
    by_group: dict[tuple[str, int, NetworkKey, str], list[Run]] = {}
    for run in runs:
        # the same network shaped for real (``links: real``) is a section of its own
        key = _network_key(run.network) + (("real",) if run.real_links else ())
        if key not in infos:
            infos[key] = _network_info(run, root)
        by_group.setdefault((run.task, run.workers, key, run.label), []).append(run)
    by_section: dict[tuple[str, int, NetworkKey], list[Group]] = {}
    for (task, workers, key, label), members in sorted(by_group.items()):
        members.sort(key=lambda r: (r.seed, r.name))
        text = infos[key].text
        where = f"{task} x{workers}" + (f" (network {text})" if text is not None else "") \
            + f" {label}"
        for seed, n in Counter(r.seed for r in members).items():
            if n > 1:
                warn(f"{where}: {n} finished runs with seed {seed}; all are counted as "
                     "repetitions")
        for setting in SAME_IN_GROUP:
            values = sorted({json.dumps(_setting(r, setting), sort_keys=True)
                             for r in members})
            if len(values) > 1:
                warn(f"{where}: the runs differ in {setting} "
                     f"({', '.join(values)}); use --label to tell variants apart")
        group = Group(task, workers, label, members, [final_values(r) for r in members])
        by_section.setdefault((task, workers, key), []).append(group)
    sections = []
    slugs: set[str] = set()
    for (task, workers, key), groups in sorted(
            by_section.items(), key=lambda kv: (kv[0][0], kv[0][1], infos[kv[0][2]].order)):
        groups.sort(key=lambda g: (g.label != BASELINE, g.label))
        section = Section(task, workers, groups, network=infos[key], network_key=key)
        slug, n = section.slug, 1
        while section.slug in slugs:  # two networks with the same safe form
            n += 1
            section.slug = f"{slug}-{n}"
        slugs.add(section.slug)
        has_acc = any(_num(rec.get("eval_acc")) is not None
                      for g in groups for r in g.runs for rec in r.steps)
        section.metric, section.higher = ("eval_acc", True) if has_acc else ("eval_loss", False)
        _choose_target(section, target_acc if has_acc else target_loss)
        for group in groups:
            group.reached = ([reach(r, section.metric, section.target, section.higher)
                              for r in group.runs] if section.target is not None
                             else [None] * len(group.runs))
        sections.append(section)
    return sections


def _choose_target(section: Section, given: float | None) -> None:
    metric = section.metric
    if given is not None:
        option = "--target-acc" if section.higher else "--target-loss"
        section.target, section.target_rule = given, f"given ({option})"
        return
    base = section.baseline
    reference = base.mean(metric) if base is not None else None
    if reference is not None:
        whose = f"the {BASELINE} group's mean final {metric}"
    else:
        means = [(g.mean(metric), g.label) for g in section.groups
                 if g.mean(metric) is not None]
        if not means:
            section.target, section.target_rule = None, f"no final {metric}"
            return
        reference, label = (min if section.higher else max)(means)
        worst = "lowest" if section.higher else "highest"
        whose = f"the {worst} mean final {metric} among groups ({label})"
    if section.higher:
        section.target = reference - (1 - ACC_FACTOR) * abs(reference)
        section.target_rule = f"default: {ACC_FACTOR:g} x {whose}, {_fmt(reference)}"
    else:
        section.target = reference + (LOSS_FACTOR - 1) * abs(reference)
        section.target_rule = f"default: {LOSS_FACTOR:g} x {whose}, {_fmt(reference)}"


def metric_columns(keys: Iterable[str]) -> list[str]:
    """Evaluation keys in report order: eval_loss, eval_acc, other eval_*, rank0_*, distance."""
    keys = set(keys)

    def order(k: str) -> tuple:
        fixed = {"eval_loss": 0, "eval_acc": 1, "consensus_distance": 4}
        return (fixed.get(k, 2 if k.startswith("eval_") else 3), k)

    return sorted(keys, key=order)


def _section_metrics(section: Section) -> list[str]:
    keys = {k for g in section.groups for f in g.finals for k, v in f.items()
            if _is_eval_key(k) and v is not None}
    return metric_columns(keys)


@dataclass
class Comparison:
    """A group's final test metric against the baseline's (docs/reference/report.md,
    Verdict)."""
    diff: float | None  # mean(group) - mean(baseline)
    separable: bool
    why: str  # the ranges, or what is missing


def compare(group: Group, base: Group, metric: str) -> Comparison:
    mine = [v for v in (f.get(metric) for f in group.finals) if v is not None]
    theirs = [v for v in (f.get(metric) for f in base.finals) if v is not None]
    if not mine or not theirs:
        who = group.label if not mine else base.label
        return Comparison(None, False, f"{who} has no final {metric}")
    diff = statistics.fmean(mine) - statistics.fmean(theirs)
    few = [(g.label, len(v)) for g, v in ((group, mine), (base, theirs))
           if len(v) < SEPARABLE_SEEDS]
    if few:
        label, n = few[0]
        return Comparison(diff, False, f"{label} has {n} finished seed{'s' * (n != 1)}; "
                                       f"{SEPARABLE_SEEDS} needed")
    ranges = f"seed ranges [{_fmt(min(mine))}, {_fmt(max(mine))}] and " \
             f"[{_fmt(min(theirs))}, {_fmt(max(theirs))}]"
    apart = max(mine) < min(theirs) or max(theirs) < min(mine)
    return Comparison(diff, apart, ranges + (" do not overlap" if apart else " overlap"))


def _membership_runs(section: Section) -> list[tuple[Group, Run]]:
    return [(g, r) for g in section.groups for r in sorted(g.runs, key=lambda r: r.seed)
            if r.membership]
