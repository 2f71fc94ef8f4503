"""The report's figures (matplotlib, imported only when drawing; PNG, and SVG or PDF beside
it with ``--formats``): a section's curves against step, wall time and megabytes, the
participants of fault-tolerant runs, time to target by link and the tuning curves, and
the helpers the figures of :mod:`accord.report.panels` share: :func:`curve` (mean and range
over seeds), :func:`plot_curves` (lines that stay visible when they coincide) and
:func:`y_scale` (``--log-y``). Styles: :mod:`accord.report.style` (see
docs/reference/report.md, Figures)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bench.tuning import Tuning, TuningArm, TuningPoint, scalar_key
from .files import _replace
from .fmt import _fmt, _fmt_seeds, _fmt_value
from .links import LinkComparison
from .runs import _num
from .sections import Group, Section, _membership_runs
from .style import LINESTYLES, PALETTE, FigureOptions, Style, smooth

LOG_SPAN = 100.0  # log y axis (auto) for a panel whose values span more than two decades
DEFAULT_OPTIONS = FigureOptions()
Styles = dict[str, Style]


X_AXES = (("step", "step"), ("time", "wall time (s)"), ("mb", "MB sent by rank 0"))


def _savefig(fig: Any, path: Path, options: FigureOptions = DEFAULT_OPTIONS) -> None:
    """``fig.savefig(path)`` through a temporary file (an earlier figure stays whole, and a
    refused write names the figure's file); the same figure in each extra format beside
    it (``name.svg``, ``name.pdf``)."""
    for target in [path, *(path.with_suffix(f".{f}") for f in options.extra_formats)]:
        _replace(target, lambda p, t=target: fig.savefig(p, format=t.suffix.lstrip(".")))


@dataclass
class Curve:
    step: list[float]
    time_s: list[float]
    mb: list[float]
    mean: list[float]
    lo: list[float]
    hi: list[float]
    n: int  # seeds


def curve(group: Group, key: str | Callable[[dict[str, Any]], Any]) -> Curve:
    """Mean / min / max over seeds of ``key`` (a field of the step records, or a function
    of a record) at the steps every seed logged (docs/reference/report.md, Curves)."""
    get = key if callable(key) else (lambda rec: rec.get(key))
    tables = [{rec["step"]: rec for rec in r.steps} for r in group.runs]
    common = set.intersection(*(set(t) for t in tables)) if tables else set()
    if len(common) < 2:
        common = set().union(*(set(t) for t in tables))
    nan = math.nan
    c = Curve([], [], [], [], [], [], len(group.runs))
    for step in sorted(common):
        recs = [t[step] for t in tables if step in t]
        vals = [v for v in (_num(get(rec)) for rec in recs) if v is not None]
        times = [v for v in (_num(rec.get("time_s")) for rec in recs) if v is not None]
        comms = [v for v in (_num(rec.get("comm_bytes")) for rec in recs) if v is not None]
        c.step.append(float(step))
        c.time_s.append(statistics.fmean(times) if times else nan)
        c.mb.append(statistics.fmean(comms) / 1e6 if comms else nan)
        c.mean.append(statistics.fmean(vals) if vals else nan)
        c.lo.append(min(vals) if vals else nan)
        c.hi.append(max(vals) if vals else nan)
    return c


def _log_scale(curves: list[Curve]) -> bool:
    values = [v for c in curves for v in (*c.lo, *c.hi) if not math.isnan(v)]
    return bool(values) and min(values) > 0 and max(values) / min(values) > LOG_SPAN


def y_scale(ax: Any, curves: list[Curve], options: FigureOptions, loglike: bool) -> str:
    """Set the panel's y scale by ``--log-y`` and return it: ``off`` linear; ``auto`` a
    logarithmic axis for a panel whose positive values span more than :data:`LOG_SPAN`
    (symmetric-log, linear near 0, for a ``loglike`` panel, a loss or a distance, that
    also holds zeros); ``on`` also every ``loglike`` panel whatever its span."""
    values = [v for c in curves for v in (*c.lo, *c.hi, *c.mean) if not math.isnan(v)]
    if options.log_y == "off" or not values:
        return "linear"
    positive = [v for v in values if v > 0]
    spread = bool(positive) and max(positive) / min(positive) > LOG_SPAN
    if min(values) > 0 and (spread or options.log_y == "on" and loglike):
        ax.set_yscale("log")
        return "log"
    if loglike and positive and min(values) >= 0 and (spread or options.log_y == "on"):
        # zeros (a synchronous algorithm's distance): linear below the smallest value
        # that matters, logarithmic above it
        small = max(min(positive), max(positive) / 1e4)
        ax.set_yscale("symlog", linthresh=10.0 ** math.floor(math.log10(small)))
        return "symlog"
    return "linear"


def plot_curves(ax: Any, items: list[tuple[Group, Curve]], axis: str, styles: Styles,
                options: FigureOptions = DEFAULT_OPTIONS) -> None:
    """One line per group (mean over seeds, smoothed by ``--smooth`` with the raw mean
    faint behind it) and its min-max band. Equal curves stay visible: the first group's
    line is the widest and each next one is thinner and drawn on top, and a line equal to
    an earlier one, like labels that share a colour and style, carries markers at points
    of its own."""
    n = len(items)
    for i, (group, c) in enumerate(items):
        x = {"step": c.step, "time": c.time_s, "mb": c.mb}[axis]
        st = styles.get(group.label, Style(PALETTE[0], LINESTYLES[0]))
        width = 3.6 - 2.4 * i / (n - 1) if n > 1 else 1.8
        seeds = f"{c.n} seed{'s' * (c.n != 1)}"
        mean = smooth(c.mean, options.smooth)
        points = sum(not math.isnan(v) for v in c.mean)
        hidden = any(_same(c.mean, other.mean) for _, other in items[:i])
        marker = st.marker or ("o" if hidden or points <= 12 else None)
        every = max(1, points // 8)
        ax.plot(x, mean, color=st.colour, linestyle=st.linestyle, linewidth=width,
                marker=marker, markersize=5 if st.marker or hidden else 3,
                markevery=(i % every, every), zorder=2 + i, label=f"{group.label} ({seeds})")
        if options.smooth > 0:
            ax.plot(x, c.mean, color=st.colour, linewidth=0.8, alpha=0.3, zorder=1)
        if c.n > 1:
            ax.fill_between(x, smooth(c.lo, options.smooth), smooth(c.hi, options.smooth),
                            color=st.colour, alpha=0.12, linewidth=0, zorder=1)


def _same(a: list[float], b: list[float]) -> bool:
    """Two curves that would be drawn on top of each other."""
    pairs = [(u, v) for u, v in zip(a, b, strict=False) if not (math.isnan(u) or math.isnan(v))]
    return len(a) == len(b) and bool(pairs) and all(
        abs(u - v) <= 1e-9 * max(1.0, abs(u), abs(v)) for u, v in pairs)


def side_legend(fig: Any, ax: Any, left: float) -> None:
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(left, 0.5), fontsize=8,
               frameon=False, handlelength=3.5)


def draw_section(section: Section, styles: Styles, folder: Path,
                 options: FigureOptions = DEFAULT_OPTIONS) -> list[str]:
    """Three figures (against step, time, MB), each with the training loss, the test loss
    and the test metric (the loss once when it is the metric); returns their names."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [("loss", "training loss (mean over workers)")]
    if section.metric != "eval_loss":
        panels.append(("eval_loss", "test eval_loss (consensus model)"))
    panels.append((section.metric, f"test {section.metric} (consensus model)"))
    curves = {key: [(g, curve(g, key)) for g in section.groups] for key, _ in panels}
    names = []
    width = 4.6 * len(panels) + 2.6
    for axis, xlabel in X_AXES:
        fig = Figure(figsize=(width, 4.3), dpi=100)  # fixed margins: constrained layout is slow
        fig.subplots_adjust(left=0.55 / width * 1.5, right=1 - 2.5 / width, bottom=0.13,
                            top=0.86, wspace=0.28)
        FigureCanvasAgg(fig)
        for i, (key, ylabel) in enumerate(panels):
            ax = fig.add_subplot(1, len(panels), i + 1)
            plot_curves(ax, curves[key], axis, styles, options)
            if key == section.metric and section.target is not None:
                ax.axhline(section.target, color="#444444", linestyle=(0, (4, 3)),
                           linewidth=0.9, label=f"target {_fmt(section.target)}")
            y_scale(ax, [c for _, c in curves[key]], options, loglike="loss" in key)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel, fontsize=9)
            ax.grid(True, alpha=0.3)
            if i == len(panels) - 1:
                side_legend(fig, ax, 1 - 2.4 / width)
        fig.suptitle(f"{section.title}: against {xlabel}")
        name = f"{section.slug}_{axis}.png"
        _savefig(fig, folder / name, options)
        names.append(name)
    return names


def draw_membership(section: Section, styles: Styles, path: Path,
                    options: FigureOptions = DEFAULT_OPTIONS) -> None:
    """Participants against step, a step line per fault-tolerant run (its label's
    colour; seeds nudged apart vertically so that equal timelines stay visible)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = _membership_runs(section)
    fig = Figure(figsize=(9, 3.8), dpi=100)
    fig.subplots_adjust(left=0.08, right=0.72, bottom=0.14, top=0.88)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    seeds = sorted({r.seed for _, r in runs})
    seen: set[str] = set()
    for g, r in runs:
        last = max([r.membership[-1][0], *(rec["step"] for rec in r.steps),
                    _num((r.summary or {}).get("steps")) or 0])
        xs = [step for step, _ in r.membership] + [last]
        nudge = 0.04 * (seeds.index(r.seed) - (len(seeds) - 1) / 2)
        ys = [n + nudge for _, n in r.membership]
        ys.append(ys[-1])
        st = styles[g.label]
        ax.step(xs, ys, where="post", color=st.colour, linestyle=st.linestyle, linewidth=1.4,
                label=None if g.label in seen else g.label)
        seen.add(g.label)
    ax.set_xlabel("step")
    ax.set_ylabel("participants")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="center left",
               bbox_to_anchor=(0.73, 0.5), fontsize=8, frameon=False)
    fig.suptitle(f"{section.title}: participants per step")
    _savefig(fig, path, options)


def draw_links(c: LinkComparison, styles: Styles, path: Path,
               options: FigureOptions = DEFAULT_OPTIONS) -> bool:
    """Time to target against link bandwidth, one line per label (see
    docs/reference/report.md, Links); False (nothing written) when no network has a known
    bandwidth."""
    placed = [(i, s.network.link.bandwidth * 8 / 1e9) for i, s in enumerate(c.sections)
              if s.network.link is not None]
    if not placed:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(8, 4.5), dpi=100)
    fig.subplots_adjust(left=0.1, right=0.72, bottom=0.13, top=0.88)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    shown: list[float] = []
    for label in c.labels:
        points = sorted((gbit, t) for i, gbit in placed
                        if (t := c.time(label, i)) is not None)
        st = styles.get(label, Style(PALETTE[0], LINESTYLES[0]))
        ax.plot([x for x, _ in points], [y for _, y in points], color=st.colour,
                linestyle=st.linestyle, marker=st.marker or "o", markersize=5, linewidth=1.6,
                label=label if points else f"{label} (not reached)")
        shown += [y for _, y in points]
    ax.set_xscale("log")
    ticks = sorted({gbit for _, gbit in placed})
    ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(ticks[0] / 2, ticks[-1] * 2)
    if shown and min(shown) > 0 and max(shown) / min(shown) > 10:
        ax.set_yscale("log")
    ax.set_xlabel("link bandwidth (Gbit/s)")
    ax.set_ylabel("time to target (s)")
    ax.grid(True, alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="center left",
               bbox_to_anchor=(0.73, 0.5), fontsize=8, frameon=False)
    direction = ">=" if c.higher else "<="
    target = f"{c.metric} {direction} {_fmt(c.target)}" if c.target is not None else "none"
    fig.suptitle(f"{c.title}: time to target ({target}) by link")
    _savefig(fig, path, options)
    return True


def _tuning_lines(t: Tuning, arm: TuningArm, key: str
                  ) -> tuple[list[tuple[Any, float]], list[Any], Any]:
    """An arm's points on the axis of ``key``: (x, value) of the points with a value, the x
    of those without, and the chosen x (None when none or not on this line). With several
    keys, only the points whose other keys are at the arm's chosen values."""
    on_line = _on_line(t, arm, key)
    good = [(p.setting[key], p.value) for p in on_line if p.value is not None]
    missing = [p.setting[key] for p in on_line if p.value is None]
    pick = (arm.chosen or {}).get(key)
    return good, missing, pick


def _on_line(t: Tuning, arm: TuningArm, key: str) -> list[TuningPoint]:
    """An arm's points on the axis of ``key`` (see :func:`_tuning_lines`)."""
    others = [k for k in t.grid if k != key]
    if others and not arm.chosen:
        return []
    chosen = arm.chosen or {}
    return [p for p in arm.points if key in p.setting
            and all(k in p.setting and scalar_key(p.setting[k]) == scalar_key(chosen.get(k))
                    for k in others)]


def draw_tuning(t: Tuning, arms: list[TuningArm], styles: Styles, path: Path,
                options: FigureOptions = DEFAULT_OPTIONS) -> None:
    """The metric against each tuned key, one line per arm (docs/reference/report.md,
    Tuning)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = list(t.grid)
    fig = Figure(figsize=(4.6 * len(keys) + 2.4, 4.0), dpi=100)
    fig.subplots_adjust(left=0.5 / (4.6 * len(keys) + 2.4) * 1.6,
                        right=1 - 2.3 / (4.6 * len(keys) + 2.4), bottom=0.14, top=0.86,
                        wspace=0.3)
    FigureCanvasAgg(fig)
    metrics = sorted({a.metric for a in arms})
    handles: dict[str, Any] = {}
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        values = []
        for arm in arms:
            for p in arm.points:
                if key in p.setting and p.setting[key] not in values:
                    values.append(p.setting[key])
        values += [v for v in t.grid[key] if v not in values]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if numeric:
            def pos(v: Any) -> float:
                return float(v)
        else:
            order = [v for v in t.grid[key]] + [v for v in values if v not in t.grid[key]]

            def pos(v: Any, order: list[Any] = order) -> float:
                return float(order.index(v))

            ax.set_xticks(range(len(order)), [_fmt_value(v) for v in order])
        edge = ax.get_xaxis_transform()  # x in data, y in axes
        for arm in arms:
            colour, style, _ = styles.get(arm.label, Style(PALETTE[0], LINESTYLES[0]))
            good, missing, pick = _tuning_lines(t, arm, key)
            good.sort(key=lambda xv: pos(xv[0]))
            xs, ys = [pos(x) for x, _ in good], [v for _, v in good]
            line, = ax.plot(xs, ys, color=colour, linestyle=style, marker="o", markersize=4,
                            linewidth=1.5, label=arm.label)
            handles.setdefault(arm.label, line)
            spread = [(pos(p.setting[key]), p.value, p.std) for p in _on_line(t, arm, key)
                      if p.value is not None and p.std is not None]
            if spread:  # several tuning seeds: +- one sample std around the mean
                ax.errorbar([x for x, _, _ in spread], [v for _, v, _ in spread],
                            yerr=[e for _, _, e in spread], color=colour, linestyle="none",
                            capsize=3, linewidth=1)
            if pick is not None:
                y = next((v for x, v in good if scalar_key(x) == scalar_key(pick)), None)
                if y is not None:
                    ax.plot([pos(pick)], [y], marker="*", markersize=15, color=colour,
                            markeredgecolor="black", linestyle="none", zorder=5)
            if missing:
                ax.plot([pos(x) for x in missing], [0.03] * len(missing), marker="x",
                        markersize=7, color=colour, linestyle="none", transform=edge,
                        clip_on=False)
        positive = [float(v) for v in values if numeric and float(v) > 0]
        if numeric and values and len(positive) == len(values) \
                and max(positive) / min(positive) > 10:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(f"{', '.join(metrics)} ({t.split} split)")
        ax.grid(True, alpha=0.3)
        if len(keys) > 1:
            ax.set_title(f"{key} (other keys at each arm's chosen values)", fontsize=9)
    fig.legend(list(handles.values()), list(handles), loc="center left",
               bbox_to_anchor=(1 - 2.2 / (4.6 * len(keys) + 2.4), 0.5), fontsize=8,
               frameon=False)
    task, workers = arms[0].task, arms[0].workers
    seed = f", {_fmt_seeds(t.seeds)}" if t.seeds else ""
    fig.suptitle(f"{task}, {workers} worker{'s' if workers != 1 else ''}: tuning on the "
                 f"{t.split} split{seed}")
    _savefig(fig, path, options)
