"""The small shared pieces of ``report.md``'s text: numbers (:func:`_fmt`), markdown cells
and tables, grid values and settings of ``tuning.json``, and the folder figures are linked
from (``FIGURE_DIR``)."""

from __future__ import annotations

import json
from typing import Any

FIGURE_DIR = "figures"


def _fmt_value(value: Any) -> str:
    """A grid value: 0.001, 3e-05, 0.9, 128, sgd."""
    if isinstance(value, float) and not isinstance(value, bool):
        return f"{value:g}"
    return value if isinstance(value, str) else json.dumps(value)


def _fmt_setting(setting: dict[str, Any] | None) -> str:
    if not setting:
        return "none"
    return ", ".join(f"{k}={_fmt_value(v)}" for k, v in setting.items())


def _fmt_seeds(seeds: list[int]) -> str:
    """``seed 100`` or ``seeds 100, 101, 102`` (empty when the file names none)."""
    if not seeds:
        return ""
    return f"seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}"


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):d}" if abs(value) < 1e6 else f"{value:.{digits}g}"
    return f"{value:.{digits}g}"


def _fmt_bytes(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def _table(head: list[str], rows: list[list[str]], numeric: bool = True) -> list[str]:
    """A markdown table; numeric: every column after the first right-aligned."""
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---:" if i and numeric else "---" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines
