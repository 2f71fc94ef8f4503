"""TrainConfig (the settings of one training run, each declared once) and ``--set`` parsing.

Everything here runs before any worker process starts; :mod:`accord.run.validation` checks a
config and raises :class:`ConfigError` naming the first bad field and what is allowed (the
words come from :func:`_allowed` here), so the CLI can print one line and exit with status 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any

from .. import algorithms
from ..errors import ConfigError
from ..tasks import EVAL_SPLITS, get_task
from . import settings
from .settings import setting

OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw", "adahessian", "muon")
#: optimizers that need ``backward(create_graph=True)`` (a Hessian-vector product per step)
SECOND_ORDER = ("adahessian",)
BACKENDS = ("auto", "gloo", "nccl")
DEVICES = ("auto", "cpu", "cuda")
NONFINITE = ("exclude", "skip", "off")
# EVAL_SPLITS (from accord.tasks): what evaluation measures, "test" (the test split) or
# "val" (a held-out part of the training data, excluded from training; for tuning)


# Bounds users meet (each error message states the one that applies).
MAX_WORKERS_PER_CPU = 64  # the local launcher starts one process per worker
MAX_SEED = 2**63 - 1  # seeds go to torch.manual_seed / numpy SeedSequence as int64
MAX_LR = 1e6
MAX_WEIGHT_DECAY = 1e6
MAX_ACCUM_STEPS = 1024  # micro-batches per optimizer step
MAX_KEEP = 10**6  # checkpoints kept
MAX_RESTARTS = 1000
# A started collective's timeout; workers meet first in the job's store, bounded by the
# idle timeout (see accord.run.train), so a slow start does not need a long timeout.
MIN_TIMEOUT_S = 1.0
MAX_TIMEOUT_S = 7 * 24 * 3600.0  # one week



#: ``links``: emulated (sleep for the modelled time) or real (testbed hosts; run/real_links.py)
LINKS = ("emulated", "real")

@dataclass
class TrainConfig:
    """The settings of one training run. Each field is declared once (:func:`setting`):
    the ``accord train`` option, the worker hand-over, the words of its error, ``--set``,
    resume and older records all come from its declaration (:mod:`accord.run.settings`)."""

    algo: str = setting("allreduce", help="registry name (see `accord list`)")
    task: str = setting("digits", help="a built-in task (digits, fashion, linreg, "
                        "shakespeare), or your own accord.Task as module:Name or "
                        "path/to/file.py:Name")
    workers: int = setting(2, parse_default=None, allowed="computed",
                           help="worker processes (default 2; under torchrun: its world size)")
    steps: int = setting(100, allowed="an integer >= 1", resumable=True,
                         help="optimizer steps")
    seed: int = setting(0, allowed="an integer >= 0 and <= 2**63 - 1", help="random seed")
    out: str = setting("runs/run", resumable=True,
                       help="run directory (metrics.jsonl, logs/)")
    lr: float | None = setting(None, settable=True, allowed=f"a number > 0 and <= {MAX_LR:g}",
                               help="learning rate (default: the task's)")
    # per worker and micro-step; None: the task's default
    batch_size: int | None = setting(None, settable=True, allowed="computed",
                                     help="per-worker micro-batch size (default: the task's)")
    accum_steps: int = setting(1, settable=True,
                               allowed=f"an integer >= 1 and <= {MAX_ACCUM_STEPS}",
                               help="micro-batches accumulated locally per optimizer step")
    optimizer: str = setting("sgd", settable=True, allowed=", ".join(OPTIMIZERS),
                             help="sgd, nesterov, adam, adamw, adahessian (pytorch-"
                                  "optimizer's; model-phase algorithms only) or muon "
                                  "(torch's Muon on weight matrices, AdamW on the rest)")
    momentum: float | None = setting(None, settable=True, allowed="a number >= 0 and < 1",
                                     help="optimizer momentum (default 0 for sgd, 0.9 for "
                                          "nesterov)")
    weight_decay: float = setting(0.0, settable=True,
                                  allowed=f"a number >= 0 and <= {MAX_WEIGHT_DECAY:g}",
                                  help="optimizer weight decay")
    oracle_lr: bool = setting(False, settable=True, allowed="true or false",
                              help="exact line-search step size (linreg only, sgd without "
                                   "momentum)")
    log_every: int = setting(10, settable=True, resumable=True, allowed="an integer >= 1",
                             help="steps between metrics records (each evaluates on rank 0)")
    # process-group timeout in seconds: a started collective
    timeout: float = setting(60.0, settable=True, resumable=True,
                             allowed=(f"seconds >= {MIN_TIMEOUT_S:g} and <= "
                                      f"{MAX_TIMEOUT_S:g} ({MAX_TIMEOUT_S / 86400:g} days)"),
                             help="seconds a started collective may take (process-group "
                                  "timeout)")
    idle_timeout: float = setting(1800.0, settable=True, resumable=True, allowed="computed",
                                  help="seconds a worker may wait for another worker's "
                                       "compute (a slow rank, rank 0 evaluating); >= "
                                       "--timeout")
    backend: str = setting("auto", allowed=", ".join(BACKENDS),
                           help="auto (nccl on GPUs, gloo on the CPU), gloo or nccl")
    device: str = setting("auto", allowed=", ".join(DEVICES),
                          help="auto (cuda when available), cpu or cuda: one process per GPU")
    data_dir: str | None = setting(None, resumable=True,
                                   help="directory of the task's data files (default: the "
                                        "task's own)")
    eval_split: str = setting("test", settable=True, added="test",
                              allowed=", ".join(EVAL_SPLITS),
                              metavar="{" + ",".join(EVAL_SPLITS) + "}",
                              help="val evaluates on a held-out part of the training data "
                                   "(excluded from training), for tuning; test (default) on "
                                   "the test split")
    network: str | None = setting(None, resumable=True, added=None,
                                  metavar="BANDWIDTH[,LATENCY]",
                                  help="emulate a slower network, e.g. 1gbit,5ms or "
                                       "100mbit,50ms: every communication takes at least its "
                                       "alpha-beta time on that link")
    network_profile: str | None = setting(None, resumable=True, added=None, metavar="FILE",
                                          help='JSON {"default": "1gbit,5ms", "links": '
                                               '[{"ranks": [0, 3], "link": "100mbit,50ms"}]}: '
                                               "per-rank-pair links")
    links: str = setting(LINKS[0], settable=True, resumable=True, added="emulated",
                         allowed="emulated or real",
                         help="real: run across hosts made of network namespaces whose "
                              "links tc shapes to --network / --network-profile, instead "
                              "of emulating them (root, Linux; accord.run.real_links)")
    compress: str = setting("none", added="none",
                            metavar="none|bf16|fp16|powersgd[:R]|int8|int4|topk[:F]",
                            help="compress model-size sum/avg allreduces: bf16/fp16 (half the "
                                 "bytes); with error feedback, for gradients: rank-R PowerSGD "
                                 "(default rank 4), int8/int4 (per-128 scales) or the top "
                                 "fraction F of entries in int8 (default 1/64)")
    progress: bool = setting(True, flag="--no-progress", resumable=True,
                             allowed="true or false", help="no progress bar")
    label: str | None = setting(None, resumable=True,
                                help="name of this variant in reports (default: the "
                                     "algorithm)")
    tensorboard: bool = setting(False, resumable=True, allowed="true or false",
                                help="also write TensorBoard event files to OUT/tensorboard")
    hyperparameters: dict[str, Any] = setting(factory=dict, cli=False,
                                              help="the algorithm's (--set KEY=VALUE)")
    faults: list[str] = setting(factory=list, flag="--fault", metavar="SPEC", resumable=True,
                                help="inject a fault (repeatable): delay:rank=R|random|all,"
                                     "seconds=X or median=X,sigma=S; slow:rank=R|random,"
                                     "factor=F; freeze:rank=R,start=A,end=B; nan:rank=R,"
                                     "step=S[,value=inf]; crash/kill:rank=R,step=S; delay/slow "
                                     "take start=A,end=B (see accord.run.faults)")
    plugins: list[str] = setting(factory=list, flag="--plugin", metavar="MODULE|FILE.py",
                                 resumable=True, added=[],
                                 help="import a module that registers algorithms "
                                      "(repeatable): my_pkg.algos or path/to/algos.py "
                                      "(installed plugins load by themselves)")
    nonfinite: str = setting("exclude", settable=True, allowed=", ".join(NONFINITE),
                             help="a rank's NaN/Inf gradient: exclude (zero it, default), "
                                  "skip (every rank skips the step) or off")
    checkpoint_every: int = setting(0, resumable=True, metavar="K",
                                    allowed="an integer >= 0 (0: no checkpoints)",
                                    help="write a checkpoint to OUT/checkpoints/step-<S> every "
                                         "K steps (0: none)")
    keep: int = setting(3, resumable=True, allowed=f"an integer >= 1 and <= {MAX_KEEP}",
                        help="complete checkpoints to keep (older ones are deleted)")
    resume: str | None = setting(None, resumable=True, metavar="auto|PATH",
                                 allowed="auto or the path of a checkpoint directory "
                                         "(OUT/checkpoints/step-<S>)",
                                 help="continue from the newest complete checkpoint in "
                                      "OUT/checkpoints (auto: start from step 0 if there is "
                                      "none) or from PATH")
    max_restarts: int = setting(0, resumable=True, metavar="R",
                                allowed=f"an integer >= 0 and <= {MAX_RESTARTS}",
                                help="when a worker dies, stop the others and restart all of "
                                     "them from the newest checkpoint, up to R times (under "
                                     "torchrun: torchrun's own --max-restarts with --resume "
                                     "auto)")
    # fault-tolerant mode on torchft (accord.ft.membership, accord.ft.launcher); left out of
    # to_json and to_argv when fault_tolerant is False, so a normal run's records are unchanged
    fault_tolerant: bool = setting(False, ft=True,
                                   help="torchft: each worker is its own replica group; a "
                                        "dead worker's peers go on without it (needs "
                                        "accord[ft]; see docs/ft-design.md)")
    min_workers: int = setting(1, ft=True, metavar="M",
                               help="with --fault-tolerant: the fewest workers a step "
                                    "commits with (default 1)")
    # True (older configs, bare --respawn) means `workers`
    respawn: int = setting(0, ft=True, const=True, metavar="K",
                           help="with --fault-tolerant: replace a dead worker (same index), "
                                "at most K times over the run (bare --respawn: as many as "
                                "--workers); the replacement receives a live peer's state")
    lighthouse: str | None = setting(None, ft=True, metavar="http://HOST:PORT",
                                     help="with --fault-tolerant, several hosts: the "
                                          "Lighthouse `accord ft-lighthouse` serves (this "
                                          "launcher starts none)")
    replicas: str | None = setting(None, ft=True, metavar="LIST",
                                   help="with --lighthouse: the worker indices this host "
                                        "runs, e.g. 0-3 or 4,5 (default: all)")
    ft_host: str | None = setting(None, ft=True, metavar="HOST",
                                  help="with --fault-tolerant: the name other hosts reach "
                                       "this host's workers at (default: localhost, or this "
                                       "host's name with --lighthouse)")

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else get_task(self.task).default_lr

    def resolved_batch_size(self) -> int:
        return self.batch_size if self.batch_size is not None else \
            get_task(self.task).default_batch_size

    def resolved_device(self) -> str:
        """``cpu`` or ``cuda`` (auto: cuda when this machine has it)."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_backend(self) -> str:
        """The process group's backend: nccl for CUDA tensors, gloo for CPU ones."""
        if self.backend != "auto":
            return self.backend
        return "nccl" if self.resolved_device() == "cuda" else "gloo"

    def resolved_momentum(self) -> float:
        if self.momentum is not None:
            return self.momentum
        return {"nesterov": 0.9, "muon": 0.95}.get(self.optimizer, 0.0)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not self.fault_tolerant:
            for name in self.FT_FIELDS:
                out.pop(name, None)
        return out

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint of this run records and a resumed run must match."""
        out = {k: v for k, v in self.to_json().items() if k not in self.RESUME_MAY_CHANGE}
        return json.loads(json.dumps(out))  # the JSON form, as the manifest stores it

    def to_argv(self) -> list[str]:
        """Arguments of ``accord train`` that rebuild this config (for worker processes)."""
        return settings.to_argv(self)


#: settings reachable with --set key=value when the algorithm has no such key
TrainConfig.SETTABLE = settings.names(TrainConfig, "settable")
#: settings a resumed run may change; every other one must equal the checkpointed run's
TrainConfig.RESUME_MAY_CHANGE = settings.names(TrainConfig, "resumable")
#: fields added after runs and checkpoints were first recorded, with the value a record
#: that lacks them ran with (so an older run is reused and an older checkpoint resumed)
TrainConfig.ADDED_DEFAULTS = settings.added_defaults(TrainConfig)
#: the fault-tolerant fields, recorded only in a fault-tolerant run's config
TrainConfig.FT_FIELDS = settings.names(TrainConfig, "ft")


def load_plugins(cfg: TrainConfig) -> None:
    """Import the run's plugin algorithms (``--plugin``; installed entry points load by
    themselves); ConfigError (one line) for one that cannot be loaded."""
    if not isinstance(cfg.plugins, list) or not all(isinstance(s, str) for s in cfg.plugins):
        raise ConfigError(f"plugins: got {cfg.plugins!r}, allowed: a list of module paths or "
                          ".py files")
    cfg.plugins = [algorithms.absolute_spec(s) for s in cfg.plugins]
    try:
        algorithms.load_plugins(cfg.plugins)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def apply_settings(cfg: TrainConfig, given: list[str]) -> None:
    """Apply ``--set key=value`` items: an algorithm hyperparameter if the algorithm has
    that key, else a training setting. ``algo.key`` / ``train.key`` force the target."""
    spec = algorithms.get(cfg.algo).hyperparameters
    for item in given:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set: expected key=value, got {item!r}")
        target = None
        if key.startswith("algo."):
            target, key = "algo", key[5:]
        elif key.startswith("train."):
            target, key = "train", key[6:]
        if target == "algo" or (target is None and key in spec):
            if key not in spec:
                allowed = ", ".join(sorted(spec)) or "none"
                raise ConfigError(
                    f"--set: unknown hyperparameter {key!r} for algorithm {cfg.algo!r}; "
                    f"allowed: {allowed}")
            cfg.hyperparameters[key] = value
        elif key in TrainConfig.SETTABLE:
            setattr(cfg, key, _parse_setting(key, value, cfg))
        else:
            allowed = sorted(set(spec) | set(TrainConfig.SETTABLE))
            raise ConfigError(
                f"--set: unknown key {key!r}; allowed for {cfg.algo!r}: {', '.join(allowed)}")


def _parse_setting(key: str, value: str, cfg: TrainConfig | None = None) -> Any:
    """The text of ``--set key=value`` as the field's type; ConfigError naming the field and
    what is allowed (the range itself is checked by
    :func:`accord.run.validation.validate`)."""
    kind = {f.name: f.type for f in dataclasses.fields(TrainConfig)}[key]
    text = value.strip()
    bad = ConfigError(f"{key}: got {value!r}, allowed: {_allowed(key, cfg)}")
    if "bool" in kind:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            raise bad
        return text.lower() in ("true", "1", "yes", "on")
    if "int" in kind:
        try:
            return int(text)
        except ValueError:
            pass
        try:  # 1e3 is an integer too
            number = float(text)
        except ValueError:
            raise bad from None
        if not math.isfinite(number) or number != int(number):
            raise bad
        return int(number)
    if "float" in kind:
        try:
            return float(text)
        except ValueError:
            raise bad from None
    return text


def parse_field(name: str, text: str, cfg: TrainConfig | None = None) -> Any:
    """Command-line text for TrainConfig field ``name`` (``"1e3"`` is an int), or
    ConfigError in the one-line form "<field>: got <text>, allowed: <...>"."""
    return _parse_setting(name, text, cfg)


def max_workers() -> int:
    """The most workers the local launcher starts on this machine."""
    return MAX_WORKERS_PER_CPU * (os.cpu_count() or 1)


def _allowed(name: str, cfg: TrainConfig | None = None) -> str:
    """What field ``name`` allows, in words (for one-line errors)."""
    if name == "workers":
        return (f"an integer >= 1 and <= {max_workers()} ({MAX_WORKERS_PER_CPU} per CPU core, "
                f"os.cpu_count() = {os.cpu_count()})")
    if name == "batch_size":
        task = _task_or_none(cfg)
        limit, note = task.batch_limit(_split(cfg)) if task is not None else (None, "")
        if limit is not None:
            split = " with eval_split 'val'" if _split(cfg) == "val" else ""
            return f"an integer >= 1 and <= {limit} (task {task.name!r}{split}: {note})"
        return "an integer >= 1"
    if name == "idle_timeout":
        timeout = cfg.timeout if cfg is not None and _is_real(cfg.timeout) else MIN_TIMEOUT_S
        return (f"seconds >= timeout ({timeout:g}) and <= {MAX_TIMEOUT_S:g} "
                f"({MAX_TIMEOUT_S / 86400:g} days)")
    words = settings.allowed(TrainConfig, name)
    return words if words and words != "computed" else "a valid value"


def _split(cfg: TrainConfig | None) -> str:
    """The config's evaluation split if it is a valid one, else "test"."""
    split = getattr(cfg, "eval_split", "test")
    return split if isinstance(split, str) and split in EVAL_SPLITS else "test"


def _task_or_none(cfg: TrainConfig | None):
    try:
        return get_task(cfg.task) if cfg is not None and isinstance(cfg.task, str) else None
    except ValueError:
        return None


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)
