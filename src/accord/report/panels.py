"""A section's figures beyond the metric curves (docs/reference/report.md, Figures):

* ``<slug>_consensus.png`` -- against step: the consensus distance (mean over replicas of
  the squared distance to their mean) and the gap of rank 0's own replica to the consensus
  model in the test metric (``rank0_<metric> - <metric>``; 0 where rank 0 holds the
  consensus);
* ``<slug>_observables.png`` -- against step, one panel per number an algorithm reports in
  the step records' ``algo`` object (ACGA's coefficients, DiLoCo's outer norms, staleness,
  weights, ...) that changes during a run, each with the groups that report it (at most
  :data:`MAX_OBSERVABLES` panels; the report names the others, and gives the numbers that
  never change, such as EASGD's ``alpha``, as text);
* ``<slug>_breakdown.png`` -- per group, a bar of its mean wall time stacked as compute,
  communication and waiting (:func:`accord.report.sections.time_breakdown`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .figures import DEFAULT_OPTIONS, Styles, _savefig, curve, plot_curves, side_legend, y_scale
from .fmt import _fmt
from .runs import _num
from .sections import TIME_PARTS, Section
from .style import FigureOptions

MAX_OBSERVABLES = 24
#: colours of the time parts (greys and a blue: apart from the algorithms' own colours,
#: which the bars' labels carry)
PART_COLOURS = {"compute": "#9ecae1", "communication": "#3182bd", "waiting": "#d9d9d9"}
PART_HATCH = {"compute": "", "communication": "", "waiting": "//"}


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def gap(metric: str):
    """A record's ``rank0_<metric> - <metric>`` (None when either is missing)."""
    def get(rec: dict[str, Any]) -> float | None:
        mine, consensus = _num(rec.get(f"rank0_{metric}")), _num(rec.get(metric))
        return None if mine is None or consensus is None else mine - consensus
    return get


def draw_consensus(section: Section, styles: Styles, path: Path,
                   options: FigureOptions = DEFAULT_OPTIONS) -> bool:
    """The consensus distance and rank 0's gap to the consensus model against step; False
    (nothing written) when no record holds either."""
    panels = [("consensus_distance", "consensus distance\n(mean ||x_i - mean||^2)", True),
              (gap(section.metric), f"rank 0 minus consensus model\n(test {section.metric})",
               False)]
    curves = [[(g, curve(g, key)) for g in section.groups] for key, _, _ in panels]
    if not any(not math.isnan(v) for items in curves for _, c in items for v in c.mean):
        return False
    width = 12.0
    fig = _figure(width, 4.3)
    fig.subplots_adjust(left=0.08, right=1 - 2.5 / width, bottom=0.13, top=0.86, wspace=0.32)
    for i, ((_, ylabel, loglike), items) in enumerate(zip(panels, curves, strict=True)):
        ax = fig.add_subplot(1, 2, i + 1)
        plot_curves(ax, items, "step", styles, options)
        y_scale(ax, [c for _, c in items], options, loglike=loglike)
        if not loglike:
            ax.axhline(0.0, color="#444444", linewidth=0.7, zorder=0)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(True, alpha=0.3)
        if i == 1:
            side_legend(fig, ax, 1 - 2.4 / width)
    fig.suptitle(f"{section.title}: consensus")
    _savefig(fig, path, options)
    return True


def _values(section: Section) -> dict[str, dict[str, set[float]]]:
    """key of the step records' ``algo`` objects: label: the values it took."""
    found: dict[str, dict[str, set[float]]] = {}
    for g in section.groups:
        for r in g.runs:
            for rec in r.steps:
                algo = rec.get("algo")
                for k, v in (algo.items() if isinstance(algo, dict) else ()):
                    if (x := _num(v)) is not None:
                        found.setdefault(k, {}).setdefault(g.label, set()).add(x)
    return found


def observables(section: Section) -> list[str]:
    """The keys of the step records' ``algo`` objects in the section that change over a
    run, by the first group that reports them, then by name (an algorithm's panels side by
    side); a number that never changes is a setting, said by :func:`constants`."""
    labels = [g.label for g in section.groups]
    changing = {k: by for k, by in _values(section).items()
                if any(len(v) > 1 for v in by.values())}
    return sorted(changing, key=lambda k: (min(labels.index(lb) for lb in changing[k]), k))


def constants(section: Section) -> list[str]:
    """``key (label value, ...)`` of each ``algo`` number that keeps one value per group."""
    out = []
    for k, by in sorted(_values(section).items()):
        if all(len(v) == 1 for v in by.values()):
            out.append(f"{k} (" + ", ".join(f"{label} {_fmt(next(iter(v)))}"
                                             for label, v in by.items()) + ")")
    return out


def _algo(key: str):
    def get(rec: dict[str, Any]) -> Any:
        algo = rec.get("algo")
        return algo.get(key) if isinstance(algo, dict) else None
    return get


def draw_observables(section: Section, styles: Styles, path: Path,
                     options: FigureOptions = DEFAULT_OPTIONS) -> list[str]:
    """One panel per observable (the first :data:`MAX_OBSERVABLES`), the groups that report
    it; returns the keys drawn (empty: nothing written)."""
    keys = observables(section)[:MAX_OBSERVABLES]
    if not keys:
        return []
    cols = min(3 if len(keys) <= 9 else 4, len(keys))
    rows = math.ceil(len(keys) / cols)
    width = 4.0 * cols + 2.6
    height = 3.0 * rows + 1.3
    fig = _figure(width, height)
    fig.subplots_adjust(left=0.6 / width * 1.5, right=1 - 2.5 / width, bottom=0.6 / height,
                        top=1 - 1.0 / height, wspace=0.3, hspace=0.45)
    handles: dict[str, Any] = {}
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        items = [(g, c) for g, c in ((g, curve(g, _algo(key))) for g in section.groups)
                 if any(not math.isnan(v) for v in c.mean)]
        plot_curves(ax, items, "step", styles, options)
        y_scale(ax, [c for _, c in items], options, loglike=False)
        ax.set_title(f"{key} ({', '.join(g.label for g, _ in items)})"
                     if len(items) <= 3 else key, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
        if i >= len(keys) - cols:
            ax.set_xlabel("step", fontsize=8)
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    order = [f"{g.label} " for g in section.groups]
    shown = sorted(handles, key=lambda lb: next((i for i, o in enumerate(order)
                                                 if lb.startswith(o)), len(order)))
    fig.legend([handles[lb] for lb in shown], shown, loc="center left",
               bbox_to_anchor=(1 - 2.4 / width, 0.5), fontsize=8, frameon=False,
               handlelength=3.5)
    fig.suptitle(f"{section.title}: the algorithms' observables (step records' algo)")
    _savefig(fig, path, options)
    return keys


def draw_breakdown(section: Section, styles: Styles, path: Path,
                   options: FigureOptions = DEFAULT_OPTIONS) -> bool:
    """Stacked horizontal bars of compute / communication / waiting, one per group (mean
    over its seeds); False (nothing written) when no group has the numbers."""
    bars = [(g, b) for g in section.groups if (b := g.breakdown()) is not None]
    if not bars:
        return False
    width = 10.0
    height = 1.3 + 0.42 * len(bars)
    fig = _figure(width, height)
    fig.subplots_adjust(left=0.2, right=0.78, bottom=0.75 / height, top=1 - 0.5 / height)
    ax = fig.add_subplot(1, 1, 1)
    ys = list(range(len(bars)))[::-1]  # the first group on top
    longest = max(sum(b[p] for p in TIME_PARTS) for _, b in bars)
    for part in TIME_PARTS:
        left = [sum(b[p] for p in TIME_PARTS[:TIME_PARTS.index(part)]) for _, b in bars]
        ax.barh(ys, [b[part] for _, b in bars], left=left, height=0.62,
                color=PART_COLOURS[part], hatch=PART_HATCH[part], edgecolor="#555555",
                linewidth=0.5, label=part)
    for y, (_, b) in zip(ys, bars, strict=True):
        total = sum(b[p] for p in TIME_PARTS)
        share = b["communication"] / total if total > 0 else 0.0
        seeds = int(b["seeds"])
        ax.text(total + 0.01 * longest, y, f"{_fmt(total, 3)} s ({share:.0%} comm.; "
                f"{seeds} seed{'s' * (seeds != 1)})", va="center", fontsize=8)
    ax.set_yticks(ys, [g.label for g, _ in bars])
    for tick, (g, _) in zip(ax.get_yticklabels(), bars, strict=True):
        tick.set_color(styles[g.label].colour if g.label in styles else "black")
    ax.set_xlim(0, longest * 1.35 if longest > 0 else 1)
    ax.set_xlabel("wall time of the run (s), mean over seeds, as rank 0 measured it")
    ax.grid(True, axis="x", alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="center left", bbox_to_anchor=(0.79, 0.5),
               fontsize=8, frameon=False)
    fig.suptitle(f"{section.title}: where the time goes")
    _savefig(fig, path, options)
    return True
