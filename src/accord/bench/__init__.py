"""Benchmark matrices: algorithms x tasks x worker counts x seeds (x hyperparameter variants).

Each run is a normal ``accord train`` run in ``OUT/<preset>/<task>/w<workers>/<label>/seed<k>``.
A finished run whose config is unchanged (but for ``IGNORED_FIELDS``) is reused, any other
rerun; each outcome is a line of ``OUT/bench.jsonl`` (``OUTCOME_SCHEMA``). The presets
(``PRESETS``, ``TUNED_PRESETS``), reuse, outcomes and ``--tune``:
docs/guides/benchmarking.md.

Entry points: :func:`plan` (a matrix's run configs), :func:`run_bench`, :func:`run_tuned`
and :func:`summary_table`.

Modules: ``specs`` (a run and a matrix, ``--set``, ``--fault``, labels, :func:`plan`),
``presets`` (the named presets), ``tune`` (``--tune``: grid, tuning seeds, the choice and
``tuning.json``), ``tuning`` (the ``tuning.json`` schema), ``reuse`` (what a run directory
holds, reuse or rerun) and ``running`` (running the runs, ``bench.jsonl``, the summary
table); this module names what they export.
"""

from __future__ import annotations

# the launcher is looked up here when a run starts (see running._bench): replacing
# accord.bench.launch replaces it for every run of the bench
from ..run.launch import launch
from .presets import (
    COMPUTE_S,
    DW_COMPUTE_S,
    DW_FAILURES,
    DW_OPTIMIZERS,
    DW_STEPS,
    FAILURE_OPTIMIZERS,
    FT_COMPUTE_S,
    FT_KILLED,
    FT_STEPS,
    NETWORK_LINKS,
    NETWORK_STEPS,
    PATTERNS,
    PRESETS,
    SLOW_RANKS,
    STRAGGLER_STEPS,
    TUNED_PRESETS,
    dw_faults,
    preset,
    preset_names,
)
from .presets import _decentralized_arms as _decentralized_arms  # benchmarks/stragglers.py
from .presets import _pair_arms as _pair_arms  # benchmarks/stragglers.py
from .reuse import IGNORED_FIELDS, Previous, config_changes, finished, previous
from .running import (
    OUTCOME_SCHEMA,
    BenchResult,
    run_bench,
    run_tuned,
    summary_table,
    tuned_groups,
)
from .specs import (
    SAFE_LABEL,
    RunSpec,
    apply_faults,
    apply_overrides,
    check_label,
    check_out,
    custom,
    plan,
    task_dir,
)
from .tune import (
    TUNE_SEEDS,
    TuningChoice,
    apply_choice,
    check_tune_seeds,
    choose,
    grid_points,
    parse_tune,
    parse_tune_seeds,
    point_dir,
    selection_metric,
    tuning_specs,
    tuning_table,
)
from .tuning import best_point

__all__ = [
    "COMPUTE_S", "DW_COMPUTE_S", "DW_FAILURES", "DW_OPTIMIZERS", "DW_STEPS",
    "FAILURE_OPTIMIZERS", "FT_COMPUTE_S", "FT_KILLED", "FT_STEPS", "IGNORED_FIELDS",
    "NETWORK_LINKS", "NETWORK_STEPS", "OUTCOME_SCHEMA", "PATTERNS", "PRESETS", "SAFE_LABEL",
    "SLOW_RANKS", "STRAGGLER_STEPS", "TUNED_PRESETS", "TUNE_SEEDS", "BenchResult", "Previous",
    "RunSpec", "TuningChoice", "apply_choice", "apply_faults", "apply_overrides", "best_point",
    "check_label", "check_out", "check_tune_seeds", "choose", "config_changes", "custom",
    "dw_faults", "finished", "grid_points", "launch", "parse_tune", "parse_tune_seeds", "plan",
    "point_dir", "preset", "preset_names", "previous", "run_bench", "run_tuned",
    "selection_metric", "summary_table", "task_dir", "tuned_groups", "tuning_specs",
    "tuning_table",
]
