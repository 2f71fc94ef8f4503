"""``write_report``: read the runs and tuning files under RUNS_DIR, draw the figures (in the
formats and with the axes and smoothing of :class:`accord.report.style.FigureOptions`), and
write ``report.md``, ``points.csv`` and ``summary.csv`` (see
docs/reference/report.md)."""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path

from .figures import X_AXES, draw_links, draw_membership, draw_section, draw_tuning
from .files import _replace, _write_points, _write_summary, _writing
from .fmt import FIGURE_DIR, _fmt, _md
from .links import _links_section, link_comparisons
from .panels import (
    MAX_OBSERVABLES,
    constants,
    draw_breakdown,
    draw_consensus,
    draw_observables,
    observables,
)
from .runs import ReportError, Warn, find_runs, load_run
from .sections import _membership_runs, _slug, build_sections
from .style import FigureOptions, figure_options, label_styles
from .tables import (
    _breakdown_table,
    _diverged_table,
    _environment,
    _final_table,
    _left_out,
    _membership,
    _network_note,
    _problems_table,
    _settings_table,
    _target_table,
    _verdict,
)
from .tuned import _arms_of, _set_aside, _tuned_note, _tuning_section, load_tunings

# the logger of the package (``accord.report``), as when the report was one module
log = logging.getLogger(__package__)


def write_report(runs_dir: str | Path, out_dir: str | Path | None = None, *,
                 target_acc: float | None = None, target_loss: float | None = None,
                 figures: bool = True, warn: Warn | None = None, log_y: str = "auto",
                 smooth: float | str = 0.0,
                 formats: str | tuple[str, ...] | list[str] = ("png",)) -> Path:
    """Write report.md, figures/, points.csv and summary.csv; return report.md's path.

    ``figures=False`` skips drawing (the tables and CSV files are the same); ``warn`` gets
    each warning (default: logged); ``log_y``, ``smooth`` and ``formats`` are
    ``--log-y``, ``--smooth`` and ``--formats`` (:func:`accord.report.style.figure_options`:
    a bad value is a :class:`ReportError` naming the option)."""
    collected: list[str] = []

    def note(message: str) -> None:
        collected.append(message)
        (warn or log.warning)(message)

    root = Path(runs_dir)
    if not root.is_dir():
        raise ReportError(f"runs directory {str(root)!r} does not exist")
    # an accuracy is a fraction and every task's loss is >= 0: a target outside that range
    # is never reached, and the report would say so of every run instead of refusing it
    for name, value, ok, allowed in (
            ("--target-acc", target_acc, lambda x: 0 <= x <= 1,
             "a number from 0 to 1 (accuracy as a fraction, e.g. 0.9)"),
            ("--target-loss", target_loss, lambda x: x >= 0, "a finite number >= 0")):
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise ReportError(f"{name}: got {value!r}, allowed: {allowed}")
    options = figure_options(log_y, smooth, formats)
    runs = [load_run(d, root, note) for d in find_runs(root)]
    if not runs:
        raise ReportError(f"no runs (no metrics.jsonl) under {str(root)!r}")
    if not any(r.readable for r in runs):
        raise ReportError(f"no readable run under {str(root)!r}: {len(runs)} run "
                          f"director{'ies' if len(runs) != 1 else 'y'} and none holds a "
                          f"metrics record (first: {runs[0].name}: "
                          f"{runs[0].error})")
    out = Path(out_dir) if out_dir is not None else root
    try:
        out.mkdir(parents=True, exist_ok=True)
        if figures:
            (out / FIGURE_DIR).mkdir(exist_ok=True)
    except OSError as e:
        raise ReportError(f"cannot write to {str(out)!r} ({e.strerror or e})") from None

    tunings = load_tunings(root, note)
    tuning_runs = [r for r in runs if r.tuning]
    evaluated = [r for r in runs if not r.tuning]
    finished = [r for r in evaluated if r.status == "ok"]
    diverged = [r for r in evaluated if r.status == "diverged"]
    problems = [r for r in evaluated if r.status not in ("ok", "diverged")]
    sections = build_sections(finished, target_acc, target_loss, note, root)
    comparisons = link_comparisons(sections)
    styles = label_styles([r for s in sections for g in s.groups for r in g.runs],
                          [a.label for t in tunings for a in t.arms])

    drawn: dict[str, list[str]] = {}
    extra: dict[str, list[tuple[str, str]]] = {}  # slug: (caption, file) of the other figures
    links_drawn: dict[str, str] = {}
    members_drawn: dict[str, str] = {}
    tuning_drawn: dict[tuple[int, str, int], str] = {}
    try:
        import matplotlib  # noqa: F401  (the plots extra)
    except ImportError:
        if figures:
            note("figures not drawn: matplotlib is not installed (pip install "
                 "'accord[plots]')")
    else:
        with _writing(out / FIGURE_DIR):  # a full disk, a file-size limit: one line
            for section in sections if figures else []:
                drawn[section.slug] = draw_section(section, styles, out / FIGURE_DIR, options)
                extra[section.slug] = _section_extras(section, styles, out / FIGURE_DIR,
                                                      options)
                if _membership_runs(section):
                    name = f"{section.slug}_participants.png"
                    draw_membership(section, styles, out / FIGURE_DIR / name, options)
                    members_drawn[section.slug] = name
            for c in comparisons if figures else []:
                if draw_links(c, styles, out / FIGURE_DIR / c.figure, options):
                    links_drawn[c.figure] = c.figure
            taken: set[str] = set()
            for i, t in enumerate(tunings if figures else []):
                for task, workers in t.sections():
                    slug = f"tuning_{_slug(task, workers)}"
                    name, n = f"{slug}.png", 1
                    while name in taken:
                        n += 1
                        name = f"{slug}-{n}.png"
                    taken.add(name)
                    draw_tuning(t, _arms_of(t, task, workers), styles,
                                out / FIGURE_DIR / name, options)
                    tuning_drawn[i, task, workers] = name

    _replace(out / "points.csv", lambda p: _write_points(p, sections))
    _replace(out / "summary.csv", lambda p: _write_summary(p, sections))

    counts = Counter(r.status for r in evaluated)
    lines = [f"# accord report: {_md(root.resolve().name or root)}", "",
             f"{len(evaluated)} runs under `{_md(root)}`: {counts['ok']} finished, "
             f"{counts['diverged']} diverged, {counts['failed']} failed, "
             f"{counts['interrupted']} interrupted, "
             f"{counts['incomplete'] + counts['unreadable']} incomplete or unreadable. "
             "Only finished runs (status ok) enter the numbers, tables and figures; "
             "diverged runs are listed apart with the step they diverged at. Groups are "
             "(task, workers, network, label) and their seeds are the repetitions. Final "
             "metrics are mean ± sample std over seeds. Files: `points.csv` (every plotted point), "
             "`summary.csv` (these tables at full precision).", "",
             *_figures_note(options, bool(drawn)),
             *_set_aside(tuning_runs, tunings), "## Environment", "",
             *_environment(runs), ""]
    for section in sections:
        direction = ">=" if section.higher else "<="
        target = (f"`{section.metric} {direction} {_fmt(section.target)}` "
                  f"({_md(section.target_rule)})" if section.target is not None
                  else f"none ({_md(section.target_rule)})")
        lines += [f"## {_md(section.title)}", "",
                  f"Test metric: `{section.metric}` ({'higher' if section.higher else 'lower'} "
                  f"is better). Target: {target}.", "",
                  *_left_out(section, diverged), "### Groups", "",
                  *_settings_table(section), "", *_network_note(section),
                  *_tuned_note(section, tunings),
                  "### Final metrics (mean ± std over seeds)", "", *_final_table(section), "",
                  "### Communication and time to target", "",
                  "Bytes are payloads handed to collectives, cumulative over the run. To-target "
                  "values are means over the seeds that reached the target.", "",
                  *_target_table(section), "", *_verdict(section),
                  *_breakdown_table(section),
                  *_membership(section, members_drawn.get(section.slug))]
        if drawn.get(section.slug):
            lines += ["### Figures", "",
                      "Mean over seeds, band from the lowest to the highest seed; the test "
                      "metrics are the consensus model's.", ""]
            lines += [f"![{_md(section.title)}, against {xlabel}]({FIGURE_DIR}/{name})\n"
                      for (_, xlabel), name in zip(X_AXES, drawn[section.slug], strict=True)]
            lines += [f"![{_md(section.title)}: {caption}]({FIGURE_DIR}/{name})\n"
                      for caption, name in extra.get(section.slug, [])]
            fixed = constants(section)
            if fixed:
                lines += [f"Observables that keep one value: {_md('; '.join(fixed))}.", ""]
            left = observables(section)[MAX_OBSERVABLES:]
            if left:
                lines += [f"Observables not drawn (more than {MAX_OBSERVABLES}): "
                          f"{', '.join(_md(k) for k in left)}; they are in `metrics.jsonl`.",
                          ""]
    if not sections:
        lines += ["No finished run.", ""]
    if comparisons:
        lines += _links_section(comparisons, links_drawn)
    if tunings:
        lines += _tuning_section(tunings, tuning_drawn)
    if diverged:
        lines += ["## Diverged runs", "",
                  "Non-finite parameters or evaluation metrics: not averaged into any "
                  "number, table or figure above.", "", *_diverged_table(diverged), ""]
    if problems:
        lines += ["## Failed, interrupted and incomplete runs", "",
                  *_problems_table(problems), ""]
    if collected:
        shown = collected[:50]
        lines += ["## Warnings", "", *[f"- {_md(w)}" for w in shown]]
        if len(collected) > len(shown):
            lines.append(f"- ... and {len(collected) - len(shown)} more")
        lines.append("")
    path = out / "report.md"
    _replace(path, lambda p: p.write_text("\n".join(lines), encoding="utf-8"))
    return path


def _section_extras(section, styles, folder: Path, options: FigureOptions
                    ) -> list[tuple[str, str]]:
    """The consensus, observables and time-breakdown figures of a section that has their
    numbers: (caption, file name) of each drawn."""
    drawn = []
    name = f"{section.slug}_consensus.png"
    if draw_consensus(section, styles, folder / name, options):
        drawn.append(("consensus distance and rank 0 against the consensus model", name))
    name = f"{section.slug}_observables.png"
    if draw_observables(section, styles, folder / name, options):
        drawn.append(("the algorithms' observables", name))
    name = f"{section.slug}_breakdown.png"
    if draw_breakdown(section, styles, folder / name, options):
        drawn.append(("time breakdown", name))
    return drawn


def _figures_note(options: FigureOptions, drawn: bool) -> list[str]:
    """One paragraph on how the figures are drawn (nothing without figures)."""
    if not drawn:
        return []
    kinds = " and ".join(f.upper() for f in options.extra_formats)
    also = (f" Each figure is also written as {kinds} beside its PNG file (same name)."
            if options.extra_formats else "")
    smoothing = (f"curves smoothed by an exponential moving average of weight "
                 f"{options.smooth:g} (the raw mean faint behind; tables are never smoothed)"
                 if options.smooth > 0 else "curves not smoothed")
    return [f"Figures: colour by algorithm (the same in every report), line style by variant "
            f"(solid plain, dashed straggler, dotted compression, dash-dot emulated link), a "
            f"marker for labels that share both; where lines coincide the earlier one is the "
            f"wider; {smoothing}; y axis `--log-y {options.log_y}`.{also}", ""]
