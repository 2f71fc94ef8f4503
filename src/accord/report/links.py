"""The section "Links": one (task, workers) on two or more networks, compared against one
target (see docs/reference/report.md, Links); its figure is :func:`.figures.draw_links`."""

from __future__ import annotations

from dataclasses import dataclass

from .fmt import FIGURE_DIR, _fmt, _md, _table
from .networks import NETWORK_FORMULA
from .sections import BASELINE, Section, _mean, _slug, reach
from .tables import _mean_std


@dataclass
class LinkComparison:
    """The sections of one (task, workers) on 2 or more networks, against one target."""
    task: str
    workers: int
    sections: list[Section]  # fastest first (NetworkInfo.order)
    source: Section | None  # the section whose target is used: the fastest with one
    metric: str
    higher: bool
    target: float | None
    labels: list[str]  # baseline first, then sorted
    #: (label, index in sections) -> (seeds reached, seeds, mean time_s of those reached)
    cells: dict[tuple[str, int], tuple[int, int, float | None]]

    @property
    def title(self) -> str:
        return f"{self.task}, {self.workers} worker{'s' if self.workers != 1 else ''}"

    @property
    def figure(self) -> str:
        return f"{_slug(self.task, self.workers)}_links.png"

    def time(self, label: str, i: int) -> float | None:
        """The mean time to the target on section i, None when not reached or not run."""
        cell = self.cells.get((label, i))
        return cell[2] if cell is not None and cell[0] > 0 else None


def link_comparisons(sections: list[Section]) -> list[LinkComparison]:
    """One comparison per (task, workers) with sections on 2 or more networks."""
    by: dict[tuple[str, int], list[Section]] = {}
    for s in sections:
        by.setdefault((s.task, s.workers), []).append(s)
    comparisons = []
    for (task, workers), mine in sorted(by.items()):
        if len(mine) < 2:
            continue
        mine = sorted(mine, key=lambda s: s.network.order)
        source = next((s for s in mine if s.target is not None), None)
        ref = source or mine[0]
        target = source.target if source is not None else None
        labels = sorted({g.label for s in mine for g in s.groups},
                        key=lambda label: (label != BASELINE, label))
        cells = {}
        for i, s in enumerate(mine):
            for g in s.groups:
                hits = [reach(r, ref.metric, target, ref.higher) for r in g.runs] \
                    if target is not None else []
                cells[g.label, i] = (sum(h is not None for h in hits), len(g.runs),
                                     _mean(h["time_s"] for h in hits if h is not None))
        comparisons.append(LinkComparison(task, workers, mine, source, ref.metric, ref.higher,
                                          target, labels, cells))
    return comparisons


def _link_cell(c: LinkComparison, label: str, i: int) -> str:
    cell = c.cells.get((label, i))
    if cell is None or c.target is None:
        return "-"
    n, m, t = cell
    return f"not reached (0/{m})" if n == 0 else f"{_fmt(t)} ({n}/{m})"


def _links_tables(c: LinkComparison) -> list[str]:
    head = ["label", *[_md(s.network.name) for s in c.sections]]
    times = [[_md(label), *[_link_cell(c, label, i) for i in range(len(c.sections))]]
             for label in c.labels]
    finals = []
    for label in c.labels:
        row = [_md(label)]
        for s in c.sections:
            group = next((g for g in s.groups if g.label == label), None)
            row.append(_mean_std(group, c.metric) if group is not None else "-")
        finals.append(row)
    return [f"#### {_md(c.title)}: time to target by link (s)", "",
            "Mean time to the target over the seeds that reached it, with seeds reached / "
            "seeds.", "", *_table(head, times), "",
            f"#### {_md(c.title)}: final {c.metric} by link (mean ± std over seeds)", "",
            *_table(head, finals), ""]


def _links_section(comparisons: list[LinkComparison], drawn: dict[str, str]) -> list[str]:
    lines = ["## Links", "",
             "The same task and workers on several networks (`accord train --network` or "
             "`--network-profile`): one column per network, fastest first (the real "
             "network, nothing emulated, then by bandwidth). On an emulated link "
             f"{NETWORK_FORMULA}; the final metric should not depend on the link, the "
             "time to target does.", ""]
    for c in comparisons:
        lines += [f"### {_md(c.title)}", ""]
        if c.source is None:
            lines += [f"Target: none (no section of {_md(c.title)} has one).", ""]
        else:
            direction = ">=" if c.higher else "<="
            fastest = c.sections[0]
            whose = f"the section of the fastest network ({_md(fastest.network.name)})"
            if c.source is not fastest:
                whose = (f"the section of the fastest network with a target "
                         f"({_md(c.source.network.name)}; {_md(fastest.network.name)} has "
                         "none)")
            lines += [f"Target: `{c.metric} {direction} {_fmt(c.target)}`, for every network "
                      f"the one {whose} chose ({_md(c.source.target_rule)}), so that the "
                      "columns compare; a section's own target may differ.", ""]
        for s in c.sections:
            if s.network.note:
                lines += [f"`{_md(s.network.text)}`: {_md(s.network.note)}.", ""]
        lines += _links_tables(c)
        name = drawn.get(c.figure)
        if name:
            left = [s.network.name for s in c.sections if s.network.link is None]
            caption = ("Time to target against the link's bandwidth, one line per label; a "
                       "label that did not reach the target on a link has no point there.")
            if left:
                caption += f" Not in the figure (no bandwidth): {_md(', '.join(left))}."
            lines += [caption, "", f"![{_md(c.title)}: time to target by link]"
                                   f"({FIGURE_DIR}/{name})", ""]
    return lines
