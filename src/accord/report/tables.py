"""The markdown of a section and of the run lists: environment, settings, the network note,
final metrics, communication and time to target, the verdict, the time breakdown, the
membership of fault-tolerant runs, and the tables of diverged and of failed runs."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from .fmt import FIGURE_DIR, _fmt, _fmt_bytes, _md, _table
from .networks import NETWORK_FORMULA, _network_key
from .runs import Run
from .sections import (
    BASELINE,
    SEPARABLE_SEEDS,
    TIME_PARTS,
    Group,
    Section,
    _membership_runs,
    _ratio,
    _section_metrics,
    compare,
)

ENV_KEYS = (("accord", "accord_version"), ("torch", "torch_version"),
            ("python", "python_version"), ("platform", "platform"), ("host", "hostname"),
            ("cpu count", "cpu_count"), ("git revision", "git_revision"))


def _mean_std(group: Group, key: str) -> str:
    mean, std, n = group.mean(key), group.std(key), group.count(key)
    if mean is None:
        return "-"
    text = _fmt(mean) + (f" ± {_fmt(std, 2)}" if std is not None else "")
    return text + (f" (n={n})" if n < len(group.runs) else "")


def _to_target_cell(group: Group, key: str, section: Section) -> str:
    if section.target is None:
        return "-"
    if group.n_reached == 0:
        return "not reached"
    return _fmt(group.to_target(key))


def _vs_baseline(group: Group, key: str, section: Section) -> tuple[str, float | None]:
    base = section.baseline
    if base is None or section.target is None:
        return "-", None
    if group.n_reached == 0:
        return "not reached", None
    if base.n_reached == 0:
        return f"n/a ({BASELINE} not reached)", None
    ratio = _ratio(group.to_target(key), base.to_target(key))
    return (f"{ratio:.3g}x" if ratio is not None else "-"), ratio


def _environment(runs: list[Run]) -> list[str]:
    headers = [r.header for r in runs if r.header is not None]
    rows = []
    for name, key in ENV_KEYS:
        counts = Counter(str(h.get(key)) for h in headers if h.get(key) is not None)
        if not counts:
            rows.append([name, "-"])
        elif len(counts) == 1:
            rows.append([name, _md(next(iter(counts)))])
        else:
            rows.append([name, ", ".join(f"{_md(v)} ({n} run{'s' * (n != 1)})"
                                         for v, n in sorted(counts.items()))])
    started = sorted(str(h["started"]) for h in headers if h.get("started"))
    if started:
        rows.append(["runs started", started[0] if started[0] == started[-1]
                     else f"{started[0]} to {started[-1]}"])
    rows.append(["report date", time.strftime("%Y-%m-%dT%H:%M:%S%z")])
    return ["| | |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]


def _settings_table(section: Section) -> list[str]:
    rows = []
    for g in section.groups:
        def distinct(get: Callable[[Run], Any], g: Group = g) -> str:
            values = []
            for r in g.runs:
                text = get(r)
                if text not in values:
                    values.append(text)
            return "; ".join(values)

        rows.append([
            _md(g.label), _md(distinct(lambda r: r.algorithm)),
            _md(distinct(lambda r: json.dumps((r.header or {}).get("hyperparameters", {}),
                                              sort_keys=True))),
            _md(distinct(lambda r: str(r.config.get("optimizer", "-")))),
            _md(distinct(lambda r: "task default" if r.config.get("lr") is None
                         else str(r.config.get("lr")))),
            _md(distinct(lambda r: str(r.config.get("steps", "-")))),
            ", ".join(str(s) for s in g.seeds)])
    return _table(["label", "algorithm", "hyperparameters", "optimizer", "lr", "steps",
                   "seeds"], rows, numeric=False)


def _network_note(section: Section) -> list[str]:
    """A line saying the network was emulated (wall times include the emulated waits),
    with the link of each group and the formula; nothing for runs on the real network."""
    links = []
    for g in section.groups:
        for r in g.runs:
            link = r.config.get("network") or (
                f"profile {r.config['network_profile']}" if r.config.get("network_profile")
                else None)
            if link and (g.label, link) not in links:
                links.append((g.label, link))
    if not links:
        return []
    where = "; ".join(f"{_md(label)}: {_md(link)}" for label, link in links)
    return [f"**Emulated network** ({where}): wall times and time to target include the "
            f"emulated waits; {NETWORK_FORMULA}.", ""]


def _final_table(section: Section) -> list[str]:
    keys = _section_metrics(section) + ["time_s", "steps_per_s"]
    rows = [[_md(g.label), str(len(g.runs))] + [_mean_std(g, k) for k in keys]
            for g in section.groups]
    return _table(["label", "seeds"] + keys, rows)


def _target_table(section: Section) -> list[str]:
    rows = []
    for g in section.groups:
        rows.append([
            _md(g.label), _fmt_bytes(g.mean("bytes_per_step")),
            _fmt_bytes(g.mean("bytes_per_step_mean_workers")), _fmt(g.mean("mb_sent")),
            _to_target_cell(g, "step", section), _to_target_cell(g, "time_s", section),
            _to_target_cell(g, "mb", section),
            f"{g.n_reached}/{len(g.runs)}" if section.target is not None else "-",
            _vs_baseline(g, "step", section)[0], _vs_baseline(g, "time_s", section)[0]])
    return _table(["label", "bytes/step (rank 0)", "bytes/step (mean over workers)",
                   "MB sent (rank 0)", "steps to target", "time to target (s)",
                   "MB to target", "seeds reached", f"steps vs {BASELINE}",
                   f"time vs {BASELINE}"], rows)


BREAKDOWN_NOTE = (
    "Each run's wall time (its summary's `time_s`) as rank 0 measured it, in three parts "
    "that sum to it: *communication* is the seconds rank 0's communicator counted "
    "(`comm_s`: transfers, and in a blocking collective the wait for the other ranks to "
    "arrive); *compute* is the rest of rank 0's training loop (`worker_time_s[0]`, else "
    "`train_s`: forward, backward, optimizer); *waiting* is the wall time outside that loop "
    "(start-up, restarts, and waiting at the end for slower workers). The time the records "
    "take (evaluations, the consensus probe: the summary's `record_s`) is in none of them, "
    "nor in the wall time (runs recorded before `record_s` existed count it as compute). A "
    "background thread's communication that overlaps the compute is capped at the loop's "
    "time. Mean over seeds.")


def _breakdown_table(section: Section) -> list[str]:
    """The mean time breakdown of each group (nothing when no run has one)."""
    rows = []
    for g in section.groups:
        b = g.breakdown()
        if b is None:
            continue
        total = sum(b[p] for p in TIME_PARTS)
        rows.append([_md(g.label), *[_fmt(b[p], 3) for p in TIME_PARTS], _fmt(total, 4),
                     f"{b['communication'] / total:.0%}" if total > 0 else "-",
                     f"{int(b['seeds'])}/{len(g.runs)}"])
    if not rows:
        return []
    return ["### Time breakdown", "", BREAKDOWN_NOTE, "",
            *_table(["label", *[f"{p} (s)" for p in TIME_PARTS], "wall time (s)",
                     "communication share", "seeds"], rows), ""]


def _who(r: Run) -> list[str]:
    return [_md(r.label) if r.header else "-", _md(r.task) if r.header else "-",
            str(r.workers) if r.header else "-", str(r.seed) if r.header else "-"]


def _problems_table(problems: list[Run]) -> list[str]:
    rows = []
    for r in problems:
        last = r.steps[-1]["step"] if r.steps else "-"
        error = r.error if len(r.error) <= 300 else r.error[:297] + "..."
        rows.append([f"`{_md(r.name)}`", r.status, *_who(r), str(last), _md(error)])
    return _table(["run", "status", "label", "task", "workers", "seed", "last step",
                   "cause"], rows, numeric=False)


def _left_out(section: Section, diverged: list[Run]) -> list[str]:
    """A line naming the section's diverged runs, which its numbers leave out."""
    mine = [r for r in diverged if (r.task, r.workers, _network_key(r.network))
            == (section.task, section.workers, section.network_key)]
    if not mine:
        return []
    names = ", ".join(f"{_md(r.label)} seed {r.seed} (diverged at step {_diverged_step(r)})"
                      for r in mine)
    return [f"Not in these numbers: {names}; see Diverged runs.", ""]


TO_TARGET = (("step", "in steps", " steps"), ("time_s", "in wall time", " s"),
             ("mb", "in MB", " MB"))


def _first_to_target(section: Section, key: str, unit: str) -> str:
    """The group(s) with the lowest mean to-target value, with their seeds reached."""
    if section.target is None:
        return "no target"
    reached = [g for g in section.groups if g.n_reached > 0]
    if not reached:
        return "none reached the target"
    values = [(g.to_target(key), g) for g in reached if g.to_target(key) is not None]
    if not values:
        return "not logged"
    best = min(v for v, _ in values)
    winners = [g for v, g in values if v == best]
    names = " and ".join(_md(g.label) for g in winners)
    seeds = ", ".join(f"{g.n_reached}/{len(g.runs)} seeds" for g in winners)
    return f"{names} ({_fmt(best)}{unit}, {seeds} reached it)"


def _membership(section: Section, figure: str | None) -> list[str]:
    """The membership of the section's fault-tolerant runs (nothing for fixed worlds)."""
    runs = _membership_runs(section)
    if not runs:
        return []
    rows = []
    for g, r in runs:
        changes = [f"{n} (step {step})" for step, n in r.membership]
        respawns = (r.summary or {}).get("respawns")
        rows.append([_md(g.label), str(r.seed), " → ".join(changes),
                     str(min(n for _, n in r.membership)), str(r.discarded),
                     "" if respawns is None else str(respawns)])
    lines = ["### Membership (fault-tolerant runs)", "",
             "Participants at the start and after every change (the step of the first "
             "quorum with the new membership); discarded: steps a worker rolled back "
             "(one per worker and step).", "",
             *_table(["label", "seed", "participants", "fewest", "discarded", "respawns"],
                     rows), ""]
    if figure:
        lines += [f"![{_md(section.title)}: participants against step]"
                  f"({FIGURE_DIR}/{figure})\n"]
    return lines


def _verdict(section: Section) -> list[str]:
    firsts = "; ".join(f"{where}, {_first_to_target(section, key, unit)}"
                       for key, where, unit in TO_TARGET)
    lines = ["**Verdict.**", "", f"- First to the target: {firsts}."]
    base = section.baseline
    if base is None:
        lines.append(f"- No {BASELINE} group in this section: no baseline to compare the "
                     "final metric with.")
        return lines + [""]
    metric = section.metric
    for g in section.groups:
        if g is base:
            continue
        c = compare(g, base, metric)
        if c.diff is None:
            lines.append(f"- {_md(g.label)} vs {BASELINE}: not separable at this scale "
                         f"({_md(c.why)}).")
            continue
        if c.diff == 0:
            better = "equal means"
        else:
            ahead = g.label if (c.diff > 0) == section.higher else BASELINE
            better = f"{_md(ahead)} better"
        judged = "separable" if c.separable else "not separable at this scale"
        lines.append(f"- {_md(g.label)} vs {BASELINE}: final {metric} {c.diff:+.4g} "
                     f"({better}); {judged} ({_md(c.why)}).")
    few = [g for g in section.groups if g.count(metric) < SEPARABLE_SEEDS]
    if few and len(section.groups) > 1:
        lines.append(f"- Separable is judged only from at least {SEPARABLE_SEEDS} finished "
                     f"seeds per group; too few here: "
                     f"{', '.join(f'{_md(g.label)} ({g.count(metric)})' for g in few)}.")
    return lines + [""]


def _diverged_step(r: Run) -> str:
    step = r.outcome.diverged_step
    return "unknown" if step is None else str(step)


def _diverged_table(diverged: list[Run]) -> list[str]:
    rows = [[f"`{_md(r.name)}`", *_who(r), _diverged_step(r),
             "inferred: null evaluation values in a file marked ok" if r.outcome.inferred
             else _md(r.outcome.reason or "-")] for r in diverged]
    return _table(["run", "label", "task", "workers", "seed", "diverged at step", "reason"],
                  rows, numeric=False)
