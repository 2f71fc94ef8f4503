"""How the report's figures look: a colour per algorithm, a line style per variant, a marker
per label that shares both, smoothing, and the figure options of ``accord report``
(``--log-y``, ``--smooth``, ``--formats``; see docs/reference/report.md, Figures).

* **Colour: the algorithm's.** The baseline (``allreduce``) is black; the other built-in
  algorithms, sorted by registry name, take :data:`PALETTE` in turn; an algorithm from
  elsewhere (a plugin) takes one of the colours left over, chosen by a CRC-32 of its name.
  A colour depends on the algorithm's name only, never on what else a report holds, so an
  algorithm has one colour in every section and every report of a version of accord.
* **Line style: the variant's** (:func:`variant_kinds`): plain ``-``; a straggler (a
  ``delay`` or ``slow`` fault of some ranks; a delay of every rank is emulated compute, not
  a straggler) ``--``; another fault (``crash``, ``kill``, ``hang``, ``freeze``, ``nan``)
  dash-dot-dot; compression ``:``; an emulated link ``-.``; several of these, their dashes
  one after another.
* **Marker: the label's,** when labels share a colour and a line style (``acga-b0`` and
  ``acga-b0.9``): in label order, the first without a marker, the others with
  :data:`MARKERS` in turn.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, NamedTuple

from .runs import ReportError, Run
from .sections import BASELINE

#: dark, distinct colours on white. The first 14 go to the built-in algorithms other than
#: the baseline in name order (acga, adasum, diloco, dpsgd, easgd, elastic_gossip, gossip,
#: grawa, hierarchical, local_sgd, lsgd, normalized, streaming_diloco, wagma), ordered so
#: that the algorithms of one preset get colours far apart; the rest go to other names.
PALETTE = ("#1f77b4", "#e7298a", "#2ca02c", "#808000", "#9467bd", "#469990", "#e377c2",
           "#800000", "#000075", "#d62728", "#d4a017", "#17becf", "#8c564b", "#ff7f0e",
           "#7f7f7f", "#bcbd22", "#393b79", "#637939", "#7b4173", "#66a61e")
BASELINE_COLOUR = "#000000"
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
#: line style of a variant kind; several kinds chain their dashes
VARIANT_DASHES: dict[str, tuple[float, ...]] = {
    "straggler": (6.0, 2.5), "fault": (5.0, 1.5, 1.0, 1.5, 1.0, 1.5),
    "compression": (1.0, 1.5), "link": (6.0, 2.0, 1.0, 2.0)}
VARIANT_STYLE = {"": "-", "straggler": "--", "compression": ":", "link": "-."}
STRAGGLER_FAULTS = ("delay", "slow")

LOG_Y = ("auto", "on", "off")
FORMATS = ("png", "svg", "pdf")


class Style(NamedTuple):
    colour: str
    linestyle: Any  # a matplotlib line style: a name or (offset, dashes)
    marker: str | None = None


def _builtins() -> list[str]:
    from .. import algorithms

    return sorted(n for n, cls in algorithms.REGISTRY.items()
                  if cls.__module__.startswith(algorithms.__name__ + "."))


def algorithm_colour(algorithm: str) -> str:
    """The colour of an algorithm: fixed by its name (module docstring)."""
    if algorithm == BASELINE:
        return BASELINE_COLOUR
    known = [n for n in _builtins() if n != BASELINE]
    if algorithm in known and known.index(algorithm) < len(PALETTE):
        return PALETTE[known.index(algorithm)]
    spare = PALETTE[len(known):] or PALETTE
    return spare[zlib.crc32(algorithm.encode()) % len(spare)]


def variant_kinds(config: dict[str, Any]) -> tuple[str, ...]:
    """What makes a run a variant, for its line style: straggler, fault, compression,
    link (in that order; empty for a plain run)."""
    kinds = []
    faults = [str(f) for f in config.get("faults") or []]
    stragglers = [f for f in faults if f.split(":", 1)[0] in STRAGGLER_FAULTS
                  and "rank=all" not in f]
    if stragglers:
        kinds.append("straggler")
    if any(f.split(":", 1)[0] not in STRAGGLER_FAULTS for f in faults):
        kinds.append("fault")
    if str(config.get("compress") or "none") != "none":
        kinds.append("compression")
    if config.get("network") or config.get("network_profile"):
        kinds.append("link")
    return tuple(kinds)


def variant_style(kinds: tuple[str, ...]) -> Any:
    if len(kinds) <= 1 and (kinds[0] if kinds else "") in VARIANT_STYLE:
        return VARIANT_STYLE[kinds[0] if kinds else ""]
    return (0, tuple(d for k in kinds for d in VARIANT_DASHES[k]))


def label_styles(runs: list[Run], labels: list[str] | None = None) -> dict[str, Style]:
    """A style per label of ``runs`` (and of ``labels``, e.g. tuning arms without a run):
    the colour of its algorithm, the style of its variant, a marker where needed."""
    first: dict[str, Run] = {}
    for r in sorted(runs, key=lambda r: (r.label, r.seed, r.name)):
        first.setdefault(r.label, r)
    names = sorted(set(first) | set(labels or []))
    base: dict[str, tuple[str, Any]] = {}
    for label in names:
        run = first.get(label)
        algorithm = run.algorithm if run is not None else label
        kinds = variant_kinds(run.config) if run is not None else ()
        base[label] = (algorithm_colour(algorithm), variant_style(kinds))
    styles: dict[str, Style] = {}
    shared: dict[tuple[str, str], int] = {}
    for label in names:
        colour, linestyle = base[label]
        n = shared.get((colour, repr(linestyle)), 0)
        shared[colour, repr(linestyle)] = n + 1
        styles[label] = Style(colour, linestyle, None if n == 0 else
                              MARKERS[(n - 1) % len(MARKERS)])
    return styles


@dataclass(frozen=True)
class FigureOptions:
    """``--log-y``, ``--smooth`` and ``--formats`` (see :func:`figure_options`)."""
    log_y: str = "auto"
    smooth: float = 0.0
    formats: tuple[str, ...] = ("png",)

    @property
    def extra_formats(self) -> tuple[str, ...]:
        return tuple(f for f in self.formats if f != "png")


def figure_options(log_y: str = "auto", smooth: float | str = 0.0,
                   formats: str | tuple[str, ...] | list[str] = ("png",)) -> FigureOptions:
    """The options checked; ReportError (one line naming the option and what is allowed)."""
    if log_y not in LOG_Y:
        raise ReportError(f"--log-y: got {log_y!r}, allowed: {', '.join(LOG_Y)}")
    try:
        weight = float(smooth)
    except (TypeError, ValueError):
        weight = math.nan
    if not 0 <= weight < 1:
        raise ReportError(f"--smooth: got {smooth!r}, allowed: a number from 0 (no "
                          "smoothing) up to but not including 1")
    names = formats.split(",") if isinstance(formats, str) else list(formats)
    names = [str(n).strip().lower() for n in names]
    bad = [n for n in names if n not in FORMATS]
    if bad or not names:
        raise ReportError(f"--formats: got {','.join(names) if names else 'nothing'!r}, "
                          f"allowed: a comma-separated list of {', '.join(FORMATS)} (PNG is "
                          "always written)")
    return FigureOptions(log_y, weight, tuple(dict.fromkeys(["png", *names])))


def smooth(values: list[float], weight: float) -> list[float]:
    """An exponential moving average with ``weight`` on the past, debiased at the start
    (as TensorBoard's smoothing); NaN points stay NaN and are skipped."""
    if weight <= 0:
        return list(values)
    out, last, n = [], 0.0, 0
    for v in values:
        if math.isnan(v):
            out.append(v)
            continue
        last, n = last * weight + (1 - weight) * v, n + 1
        out.append(last / (1 - weight ** n))
    return out
