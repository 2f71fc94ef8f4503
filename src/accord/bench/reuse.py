"""Reuse: what a run directory holds for a requested config (:func:`previous`), whether the
bench reuses it or reruns it and why (see docs/guides/benchmarking.md, Reuse and outcomes),
and clearing an earlier attempt before a rerun."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._imports import file_sha256
from ..run.config import TrainConfig
from ..run.metrics import Outcome, run_outcome, scan_metrics
from ..run.rundir import holder

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
    ``unreadable`` (no metrics.jsonl or no header in it), ``stale`` (another config, or a
    user task or plugin file edited since), or the
    run's outcome status (ok, diverged, failed, interrupted, incomplete)."""

    action: str
    state: str
    reason: str = ""
    outcome: Outcome | None = None
    summary: dict[str, Any] | None = None


def code_changes(header: dict[str, Any]) -> list[str]:
    """The user files a run recorded (its task, its plugins, its network profile) that are
    no longer what ran: edited since (another SHA-256) or gone; each as ``the task file
    PATH``."""
    sources = [("task", header.get("task_source")),
               ("network profile", header.get("network_profile_source"))]
    plugins = header.get("plugin_sources")
    sources += [("plugin", p) for p in (plugins if isinstance(plugins, list) else [])]
    changed = []
    for what, source in sources:
        if not isinstance(source, dict) or not isinstance(source.get("file"), str) \
                or not isinstance(source.get("sha256"), str):
            continue  # a built-in, or a record without a hash: nothing to compare
        if file_sha256(source["file"]) != source["sha256"]:
            changed.append(f"the {what} file {source['file']}")
    return changed


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
    edited = code_changes(header)
    if edited:
        return Previous("rerun", "stale", f"{edited[0]} changed since it ran")
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
