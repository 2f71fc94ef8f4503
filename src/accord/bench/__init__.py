"""Benchmark matrices: algorithms x tasks x worker counts x seeds (x hyperparameter variants).

Each run is a normal ``accord train`` run (same launcher, same ``metrics.jsonl``) in its
own directory ``OUT/<preset>/<task>/w<workers>/<label>/seed<k>`` (``custom`` for a matrix
given on the command line). A label is one directory name: letters, digits, ``.``, ``_``
and ``-``, not ``.`` or ``..``; any other label is refused (ConfigError) before any run
starts.

**Reuse.** A run directory is reused, not run again, when its ``metrics.jsonl`` ended with
status ``ok`` or ``diverged`` (a diverged run is a result: rerunning it would diverge
again) *and* its header's ``config`` equals the requested ``TrainConfig.to_json()`` in
every field (a field an older header lacks counts as changed, except those of
``TrainConfig.ADDED_DEFAULTS``, which take the value the older run had) except those in
``IGNORED_FIELDS``, which do not change what a run computes:
``out`` (the bench chooses the path), ``progress``, ``tensorboard``, ``timeout`` and
``idle_timeout``. So an interrupted bench resumes where it stopped, and a bench with
other ``--steps``, ``--set`` or presets reruns exactly the runs whose config changed,
saying why on one line each (``bench: rerunning LABEL TASK xN seed K: the config changed
(steps 10 -> 30)``). A run that failed, was interrupted or has no summary is rerun too.
A field missing from an older header counts as changed. Before a run starts, its
directory is removed, so no file of an earlier attempt is mixed in.

**Outcomes.** Each run's outcome is appended to ``OUT/bench.jsonl`` (``OUTCOME_SCHEMA``,
checked before each line is written: ``run``, ``label``, ``task``, ``workers``, ``seed``,
``seconds``, ``status``): ``ok``, ``diverged`` (with ``diverged_step``), ``failed`` (with
``error``) or ``interrupted``; the bench goes on after a failed or diverged run and stops
(resumably) when interrupted. What the bench reads back is the run directories'
``metrics.jsonl`` (:func:`previous`, through ``accord.run.metrics.scan_metrics`` and its schema)
and ``tuning.json`` (``accord.bench.tuning``'s schema, checked when written and when read); a
``tuning.json`` that cannot be read is written anew. The summary
table (:func:`summary_table`) averages only the seeds that ended ok under the requested
config; a diverged seed is never averaged but named in the row's note ("seed 2 diverged
at step 40"), as are failed runs and runs not done; a missing value is shown as ``-``.

Presets are named lists of :class:`RunSpec` built in code (``PRESETS``):

* ``quick`` -- digits, 4 workers, one seed: allreduce, normalized, acga, local_sgd, easgd
  and wagma. The ``make demo`` default.
* ``acga-ablation`` -- the AdaCons toy (oracle step size) and digits with small per-worker
  batches (worker gradients disagree): averaging, normalised averaging, ACGA beta 0 / 0.9 /
  0.99, per-layer ACGA and AdaSum, at 4 and 8 workers, 3 seeds.
* ``elastic`` -- allreduce, local_sgd, easgd, EAMSGD, lsgd and grawa on digits with 8
  workers at periods 1, 4 and 16, 3 seeds.
* ``stragglers`` -- allreduce, wagma (wait-avoiding and synchronous), gossip,
  elastic_gossip, dpsgd, local_sgd and asynchronous easgd on digits with 8 workers, each
  worker's compute emulated as a 40 ms sleep, under a transient 4x straggler (one random
  rank per step) and a persistent one (rank 3); and allreduce against wagma
  (wait-avoiding, synchronous, and wait-avoiding with no global average) with two 4x slow
  ranks in one group (ranks 2 and 3).
* ``scaling`` -- the same algorithms at 2, 4 and 8 workers, short runs, for bytes per
  worker per step.
* ``failures`` -- easgd with uniform and with dynamic weighting, 8 workers, ranks 2 and 5
  frozen for the middle third of 300 steps, 3 seeds, under SGD, Nesterov 0.9 and Adam.
* ``failures-ft`` -- real deaths (needs ``accord[ft]``): ranks 2 and 5 of 8 SIGKILLed at a
  third of 240 steps of 40 ms emulated compute; easgd uniform, easgd dynamic and
  local_sgd, each without deaths (``-plain``: the normal launcher; ``-clean``:
  fault-tolerant), fault-tolerant with the deaths and one respawn (``-ft``) and
  restarted from checkpoints by the normal launcher
  (``-restart``), 3 seeds, digits.
* ``dynamic-weighting`` -- asynchronous easgd with uniform vs dynamic weighting under SGD
  and AdaHessian, 4 and 8 workers, periods 1, 4 and 16, one or two frozen ranks and one
  3x slow rank, 3 seeds, on digits.
* ``network`` -- allreduce (plain, bf16, PowerSGD), local_sgd and diloco at periods 8 and
  32, wagma, gossip and easgd on shakespeare with 8 workers on emulated 10 Gbit/s, 1 Gbit/s
  and 100 Mbit/s links (``OUT/network-<link>/``), 3 seeds.
* ``frontier`` -- allreduce, diloco (period 32) and streaming_diloco (4 fragments, overlap
  of 1 and 5 steps, alpha 0.5), each in fp32 and with the int8, int4 and topk codecs, and
  hierarchical (two islands, diloco between them), on shakespeare with two emulated hosts
  of two workers, 10 Gbit/s inside a host and 100 or 10 Mbit/s between them
  (``OUT/frontier-<link>/``), 3 seeds.
* ``acga-ablation-tuned``, ``elastic-tuned`` -- those presets with each arm at its own
  learning rate (see ``--tune``: each grid point judged by its mean over the tuning seeds,
  ``TUNE_SEEDS`` by default); not part of ``all``.
* ``all`` -- every preset above.

**Modules.** ``specs`` (a run and a matrix, ``--set``, ``--fault``, labels, :func:`plan`),
``presets`` (the named presets), ``tune`` (``--tune``: grid, tuning seeds, the choice and
``tuning.json``), ``reuse`` (what a run directory holds, reuse or rerun) and ``running``
(running the runs, ``bench.jsonl``, the summary table); this module names what they
export.
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
