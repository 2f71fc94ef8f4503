"""TrainConfig (the settings of one training run), its validation, and ``--set`` parsing.

Everything here runs before any worker process starts: :func:`validate` raises
:class:`ConfigError` naming the first bad field and what is allowed, so the CLI can
print one line and exit with status 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import algorithms, faults, settings
from .errors import ConfigError, ConfigTypeError
from .metrics import tensorboard_available
from .process import launched_here, under_torchrun
from .settings import setting
from .tasks import EVAL_SPLITS, get_task

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
# idle timeout (see accord.train), so a slow start does not need a long timeout.
MIN_TIMEOUT_S = 1.0
MAX_TIMEOUT_S = 7 * 24 * 3600.0  # one week



@dataclass
class TrainConfig:
    """The settings of one training run. Each field is declared once (:func:`setting`):
    the ``accord train`` option, the worker hand-over, the words of its error, ``--set``,
    resume and older records all come from its declaration (:mod:`accord.settings`)."""

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
                                     "take start=A,end=B (see accord.faults)")
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
    # fault-tolerant mode on torchft (accord.ft, accord.ft_run); left out of to_json and
    # to_argv when fault_tolerant is False, so a normal run's records are unchanged
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
    what is allowed (the range itself is checked by :func:`validate`)."""
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


def _algorithms_with(capability: str) -> str:
    """The registry names whose class declares ``capability`` true, comma-separated."""
    from .algorithms import REGISTRY

    return ", ".join(n for n, c in sorted(REGISTRY.items()) if getattr(c, capability))


def payload_compression(cfg: TrainConfig) -> Any:
    """The run's :class:`accord.compress.Compressor`, or None for ``compress="none"``;
    ConfigError (one line) for an unknown scheme or an algorithm that cannot use it."""
    from .compress import Compressor

    if cfg.compress == "none":
        return None
    try:
        if not isinstance(cfg.compress, str):
            raise ValueError(f"compress: got {cfg.compress!r}")
        if cfg.compress.endswith(":"):  # "powersgd:" would quietly take the default rank
            raise ValueError(f"compress: got {cfg.compress!r}")
        compressor = Compressor.from_spec(cfg.compress)
    except ValueError:
        raise ConfigError(f"compress: got {cfg.compress!r}, allowed: none, bf16, fp16, "
                          "powersgd, powersgd:RANK (RANK an integer >= 1), int8, int4, topk, "
                          "topk:FRACTION (FRACTION in (0, 1])") from None
    from .algorithms import get

    cls = get(cfg.algo)  # each class declares what --compress may touch
    if not cls.compressible:
        raise ConfigError(f"compress: {cfg.algo!r} sends its payload point to point or by "
                          "broadcast, which --compress does not compress; allowed with: "
                          f"{_algorithms_with('compressible')}")
    # the lossy schemes with error feedback need a gradient payload (accord.compress says why)
    what = {"powersgd": "approximates a sum of gradients by a low-rank matrix",
            "int8": "quantises gradients with error feedback",
            "int4": "quantises gradients with error feedback",
            "topk": "sends the largest entries of gradients with error feedback"}
    if compressor.scheme in what and not cls.low_rank:
        raise ConfigError(f"compress: {cfg.compress!r} {what[compressor.scheme]}, not the "
                          f"parameters {cfg.algo!r} averages; allowed with it: "
                          f"{_algorithms_with('low_rank')} (else bf16 or fp16)")
    return compressor


def emulated_network(cfg: TrainConfig) -> Any:
    """The run's emulated network (an :class:`accord.network.Link` or ``Network``), or None;
    ConfigError (one line) for a malformed ``--network`` or profile, or both given."""
    from . import network

    if cfg.network is not None and cfg.network_profile is not None:
        raise ConfigError("network: got both --network and --network-profile; allowed: one "
                          "of them (a profile has its own default link)")
    try:
        if cfg.network is not None:
            if not isinstance(cfg.network, str):
                raise ValueError(f"--network: got {cfg.network!r}; allowed: text such as "
                                 "1gbit,5ms")
            return network.parse_network(cfg.network)
        if cfg.network_profile is not None:
            profile = network.load_network_profile(cfg.network_profile)
            profile.check_ranks(cfg.workers)
            return profile
    except ValueError as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    return None


def validate(cfg: TrainConfig, *, check_out: bool = True) -> None:
    """Raise ConfigError naming the first bad field and what is allowed (ConfigTypeError,
    also a TypeError, for a value of the wrong type). Normalises numbers to int / float."""

    def fail(name: str, value: Any, allowed: str | None = None, *, kind: type = ConfigError):
        raise kind(f"{name}: got {value!r}, allowed: {allowed or _allowed(name, cfg)}")

    def need(ok: bool, name: str, value: Any, allowed: str | None = None) -> None:
        if not ok:
            fail(name, value, allowed)

    def text(name: str, *, optional: bool = False, path: bool = False) -> None:
        value = getattr(cfg, name)
        if optional and value is None:
            return
        if path and isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or not value.strip() or "\n" in value:
            what = "a directory path" if path else "a non-empty name on one line"
            fail(name, value, what + (" or None" if optional else ""),
                 kind=ConfigTypeError if not isinstance(value, str) else ConfigError)
        setattr(cfg, name, value)

    def integer(name: str, low: int, high: float = math.inf, optional: bool = False) -> None:
        value = getattr(cfg, name)
        if optional and value is None:
            return
        if not _is_int(value):
            fail(name, value, kind=ConfigTypeError)
        value = int(value)
        need(low <= value <= high, name, value)
        setattr(cfg, name, value)

    def real(name: str, ok, optional: bool = False) -> None:
        value = getattr(cfg, name)
        if optional and value is None:
            return
        if not _is_real(value):
            fail(name, value, kind=ConfigTypeError)
        try:
            value = float(value)
        except OverflowError:  # an int beyond the float range
            fail(name, value)
        need(math.isfinite(value) and ok(value), name, value)
        setattr(cfg, name, value)

    def flag(name: str) -> None:
        value = getattr(cfg, name)
        if not isinstance(value, bool):
            fail(name, value, kind=ConfigTypeError)

    def choice(name: str, choices: tuple[str, ...]) -> None:
        value = getattr(cfg, name)
        need(isinstance(value, str) and value in choices, name, value)

    load_plugins(cfg)  # before the algorithm's name is looked up
    try:
        algorithms.get(cfg.algo)
        task = get_task(cfg.task)
    except TypeError as e:
        raise ConfigTypeError(str(e)) from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if under_torchrun():  # torchrun started the processes, on one or several machines
        integer("workers", 1)
    else:
        integer("workers", 1, max_workers())
    integer("steps", 1)
    integer("seed", 0, MAX_SEED)
    text("out", path=True)
    real("lr", lambda x: 0 < x <= MAX_LR, optional=True)
    choice("eval_split", EVAL_SPLITS)  # before batch_size, whose bound depends on it
    integer("batch_size", 1, task.batch_limit(cfg.eval_split)[0] or math.inf, optional=True)
    integer("accum_steps", 1, MAX_ACCUM_STEPS)
    choice("optimizer", OPTIMIZERS)
    real("momentum", lambda x: 0 <= x < 1, optional=True)
    real("weight_decay", lambda x: 0 <= x <= MAX_WEIGHT_DECAY)
    flag("oracle_lr")
    integer("log_every", 1)
    real("timeout", lambda x: MIN_TIMEOUT_S <= x <= MAX_TIMEOUT_S)
    real("idle_timeout", lambda x: cfg.timeout <= x <= MAX_TIMEOUT_S)
    choice("backend", BACKENDS)
    choice("device", DEVICES)
    text("data_dir", optional=True, path=True)
    flag("progress")
    text("label", optional=True)
    flag("tensorboard")
    choice("nonfinite", NONFINITE)
    integer("checkpoint_every", 0)
    integer("keep", 1, MAX_KEEP)
    text("resume", optional=True, path=True)
    if cfg.resume not in (None, "auto") and not os.path.exists(cfg.resume):
        # (AUTO, Auto: not the keyword, and not a checkpoint either)
        fail("resume", cfg.resume, f"{_allowed('resume')}; {cfg.resume!r} does not exist")
    integer("max_restarts", 0, MAX_RESTARTS)
    emulated_network(cfg)
    payload_compression(cfg)
    if cfg.max_restarts and under_torchrun() and not launched_here():
        fail("max_restarts", cfg.max_restarts, "0 under torchrun (use torchrun's own "
             "--max-restarts with accord train --resume auto)")
    hp = cfg.hyperparameters
    if not isinstance(hp, Mapping) or not all(isinstance(k, str) for k in hp):
        fail("hyperparameters", hp, "a dict of hyperparameter name -> value",
             kind=ConfigTypeError)
    if isinstance(cfg.faults, str) or not isinstance(cfg.faults, list | tuple) or \
            not all(isinstance(f, str) for f in cfg.faults):
        fail("faults", cfg.faults, "a list of fault spec strings, e.g. "
             "['crash:rank=1,step=5']", kind=ConfigTypeError)

    try:
        cfg.hyperparameters = algorithms.validate(cfg.algo, dict(hp), cfg.workers)
    except TypeError as e:
        raise ConfigTypeError(str(e)) from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for key in ("timeout", "idle_timeout"):  # an algorithm's own timeouts (wagma, easgd)
        value = cfg.hyperparameters.get(key)
        if value is not None and not MIN_TIMEOUT_S <= value <= MAX_TIMEOUT_S:
            raise ConfigError(f"hyperparameter {key!r}: got {value!r}, allowed: seconds >= "
                              f"{MIN_TIMEOUT_S:g} and <= {MAX_TIMEOUT_S:g}")
    _check_algorithm_timeouts(cfg, hp)
    need(not cfg.tensorboard or tensorboard_available(), "tensorboard", cfg.tensorboard,
         "only with the tensorboard package installed (pip install tensorboard)")
    if cfg.device == "cuda" or cfg.backend == "nccl":
        _check_gpus(cfg)
    need(not (cfg.resolved_backend() == "nccl" and cfg.resolved_device() == "cpu"),
         "backend", cfg.backend, "gloo or auto with --device cpu (nccl needs CUDA tensors)")
    if cfg.optimizer in SECOND_ORDER:
        _check_second_order(cfg)
    if cfg.oracle_lr:
        need(task.has_oracle_lr, "oracle_lr", cfg.oracle_lr,
             "only with a task that has an oracle step size (linreg)")
        need(cfg.optimizer == "sgd" and cfg.resolved_momentum() == 0.0, "oracle_lr",
             cfg.oracle_lr, "only with --optimizer sgd and momentum 0")
    try:
        task.check_data(cfg.data_dir)
    except ValueError as e:
        raise ConfigError(f"task {cfg.task!r}: {str(e).splitlines()[0]}") from None
    try:
        cfg.faults = [faults.parse(spec, cfg.workers, cfg.steps, max_seconds=cfg.idle_timeout)
                      .spec for spec in cfg.faults]
    except ValueError as e:
        raise ConfigError(str(e)) from None
    flag("fault_tolerant")
    if cfg.respawn is True or cfg.respawn is False:
        cfg.respawn = cfg.workers if cfg.respawn else 0
    integer("respawn", 0)
    if cfg.fault_tolerant:
        _check_fault_tolerant(cfg)
    else:
        need(cfg.min_workers == 1, "min_workers", cfg.min_workers, "only with --fault-tolerant")
        need(not cfg.respawn, "respawn", cfg.respawn, "only with --fault-tolerant")
        for name in ("lighthouse", "replicas", "ft_host"):
            need(getattr(cfg, name) is None, name, getattr(cfg, name),
                 "only with --fault-tolerant")
    if check_out:
        check_writable(cfg.out)


def _check_algorithm_timeouts(cfg: TrainConfig, given: Mapping[str, Any]) -> None:
    """The timeout hierarchy for an algorithm with timeouts of its own (wagma): its wait for
    a slow worker (``idle_timeout``) is at least what a started collective may take (its own
    ``timeout``, and the run's ``--timeout``); wagma would otherwise raise it silently. Only
    what the user set is checked (the defaults are the algorithm's, not the run's)."""
    hp = cfg.hyperparameters
    if "idle_timeout" not in hp:
        return
    idle, own = hp["idle_timeout"], hp.get("timeout") or 0.0
    if "idle_timeout" in given:
        floor, what = max((own, "the algorithm's timeout"), (cfg.timeout, "--timeout"))
        if idle < floor:
            raise ConfigError(f"hyperparameter 'idle_timeout': got {given['idle_timeout']!r}, "
                              f"allowed: seconds >= {floor:g} ({what}: a wait for a slow "
                              f"worker is at least a started collective's timeout) and <= "
                              f"{MAX_TIMEOUT_S:g}")
    elif "timeout" in given and own > idle:
        raise ConfigError(f"hyperparameter 'timeout': got {given['timeout']!r}, allowed: "
                          f"seconds >= {MIN_TIMEOUT_S:g} and <= {idle:g} (the algorithm's "
                          "idle_timeout: a started collective's timeout is at most the wait "
                          "for a slow worker)")


#: fault kinds a fault-tolerant run takes (freeze rewinds a rank's model, not wired)
FT_FAULTS = ("crash", "kill", "hang", "nan", "delay", "slow")
#: the Lighthouse's heartbeat timeout and the workers' quorum timeout (seconds) of a
#: fault-tolerant run; its process-group timeout is ``timeout``, its step deadline
#: ``idle_timeout``
FT_HEARTBEAT_S = 2.0
FT_QUORUM_S = 10.0


def parse_lighthouse(text: str) -> str:
    """``http://HOST:PORT`` or ``HOST:PORT`` -> ``http://HOST:PORT`` (ConfigError else)."""
    import re

    m = re.fullmatch(r"(?:http://)?(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})/?",
                     str(text).strip())
    if m is None or not 0 < int(m.group(2)) < 65536:
        raise ConfigError(f"--lighthouse: got {text!r}, allowed: http://HOST:PORT or "
                          "HOST:PORT (the address `accord ft-lighthouse` prints)")
    return f"http://{m.group(1)}:{int(m.group(2))}"


def parse_replicas(text: str, workers: int) -> list[int]:
    """``"0-3"``, ``"0,2,5"`` or ``"0-1,4"`` -> sorted worker indices in [0, workers)."""
    out: set[int] = set()
    try:
        for part in str(text).split(","):
            lo, _, hi = part.strip().partition("-")
            first, last = int(lo), int(hi) if hi else int(lo)
            if first > last:
                raise ValueError
            out.update(range(first, last + 1))
    except ValueError:
        out = set()
    if not out or min(out) < 0 or max(out) >= workers:
        raise ConfigError(f"--replicas: got {text!r}, allowed: worker indices in 0..{workers - 1} "
                          "as ranges and lists (e.g. 0-3 or 0,2,5)")
    return sorted(out)


def ft_timeouts(cfg: TrainConfig) -> Any:
    """The :class:`accord.ft.FTTimeouts` of a fault-tolerant run (checked)."""
    from .ft import FTTimeouts

    return FTTimeouts(heartbeat=FT_HEARTBEAT_S, quorum=FT_QUORUM_S,
                      process_group=float(cfg.timeout),
                      step_deadline=float(cfg.idle_timeout)).check()


def _check_fault_tolerant(cfg: TrainConfig) -> None:
    """One-line ConfigError unless this fault-tolerant run can start."""
    import importlib.util

    if importlib.util.find_spec("torchft") is None:
        raise ConfigError("--fault-tolerant needs torchft: pip install 'accord[ft]'")
    from . import ft

    if not _is_int(cfg.min_workers) or not 1 <= cfg.min_workers <= cfg.workers:
        raise ConfigError(f"min_workers: got {cfg.min_workers!r}, allowed: an integer >= 1 "
                          f"and <= workers ({cfg.workers})")
    try:
        ft.check_algorithm(cfg.algo, cfg.hyperparameters)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    refused = [("--compress", cfg.compress != "none"),
               ("--network", cfg.network is not None),
               ("--network-profile", cfg.network_profile is not None),
               ("--checkpoint-every", bool(cfg.checkpoint_every)),
               ("--resume", cfg.resume is not None),
               ("--max-restarts", bool(cfg.max_restarts)),
               ("--oracle-lr", bool(cfg.oracle_lr)),
               ("--tensorboard", bool(cfg.tensorboard))]
    for option, given in refused:
        if given:
            raise ConfigError(f"--fault-tolerant: {option} is not supported yet (not wired "
                              "to a changing set of workers)")
    if cfg.lighthouse is not None:
        cfg.lighthouse = parse_lighthouse(cfg.lighthouse)
    if cfg.replicas is not None:
        if cfg.lighthouse is None:
            raise ConfigError("--replicas: allowed only with --lighthouse (the workers of "
                              "one host of a run whose Lighthouse runs elsewhere)")
        parse_replicas(cfg.replicas, cfg.workers)
    if cfg.ft_host is not None and (not isinstance(cfg.ft_host, str) or not cfg.ft_host
                                    or any(c.isspace() or c in "/:" for c in cfg.ft_host)):
        raise ConfigError(f"--ft-host: got {cfg.ft_host!r}, allowed: a host name or IPv4 "
                          "address that every other host resolves to this one")
    if cfg.resolved_device() != "cpu" or cfg.resolved_backend() != "gloo":
        raise ConfigError("--fault-tolerant: allowed only on the CPU with gloo (torchft's "
                          "gloo process group)")
    if cfg.nonfinite == "skip":
        raise ConfigError("--fault-tolerant: --nonfinite skip is not supported yet; "
                          "allowed: exclude or off")
    if under_torchrun() and not launched_here():
        raise ConfigError("--fault-tolerant: not under torchrun; the local launcher starts "
                          "each worker as its own torchft replica group")
    for spec in cfg.faults:
        kind = spec.split(":", 1)[0].strip()
        if kind not in FT_FAULTS:
            raise ConfigError(f"--fault-tolerant: fault {kind!r} is not supported; allowed: "
                              f"{', '.join(FT_FAULTS)}")
    try:
        ft.check_timeouts(FT_HEARTBEAT_S, FT_QUORUM_S, float(cfg.timeout),
                          float(cfg.idle_timeout))
        ft_timeouts(cfg)
    except ValueError as e:
        raise ConfigError(f"{e} (--fault-tolerant: the heartbeat timeout is "
                          f"{FT_HEARTBEAT_S:g} s, the quorum timeout {FT_QUORUM_S:g} s, the "
                          "process-group timeout --timeout, the step deadline "
                          "--idle-timeout)") from None


def _check_second_order(cfg: TrainConfig) -> None:
    """AdaHessian estimates the Hessian diagonal from p.grad's graph (a Hessian-vector
    product after ``backward(create_graph=True)``): a gradient-phase algorithm replaces
    p.grad by a combination of every rank's gradients first, which has no local graph."""
    from . import algorithms
    from .core import resolve_hyperparameters

    cls = algorithms.get(cfg.algo)
    try:
        hp = resolve_hyperparameters(cfg.algo, cls.hyperparameters, cfg.hyperparameters)
    except (TypeError, ValueError):
        hp = None  # named by the hyperparameter check
    if hp is not None and cls.mixes_before_step(hp):
        raise ConfigError(
            f"optimizer: got {cfg.optimizer!r} with {cfg.algo!r}, allowed: an algorithm "
            "that does not mix the parameters before the optimizer step (this one changes "
            "them in place after backward, under AdaHessian's Hessian-vector product)")
    if hp is not None and cls.rewrites_gradients(hp):
        raise ConfigError(
            f"optimizer: got {cfg.optimizer!r} with {cfg.algo!r}, allowed: a model-phase "
            "algorithm (a gradient-phase one rewrites p.grad before AdaHessian's Hessian-"
            "vector product, which needs the local gradient's graph)")
    try:
        import pytorch_optimizer  # noqa: F401
    except ImportError:
        raise ConfigError(f"optimizer: got {cfg.optimizer!r}, allowed: only with the "
                          "pytorch-optimizer package installed (pip install "
                          "'accord[adahessian]')") from None


def _check_gpus(cfg: TrainConfig) -> None:
    """nccl needs one CUDA device per local worker; without this check a run fails only
    after every worker has started and waited on the others."""
    import torch

    field, value = ("device", cfg.device) if cfg.device == "cuda" else ("backend", "nccl")
    if not torch.cuda.is_available():
        other = "auto or cpu" if field == "device" else "auto or gloo"
        raise ConfigError(f"{field}: got {value!r}, allowed: {other} (no CUDA device: "
                          "torch.cuda.is_available() is False here)")
    gpus = torch.cuda.device_count()
    torchrun = under_torchrun()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", cfg.workers)) if torchrun else cfg.workers
    if local > gpus:
        raise ConfigError(f"{field}: got {value!r} for {local} local workers, allowed: at "
                          f"most one worker per GPU ({gpus} here), or the CPU")


def check_writable(out: str) -> None:
    """Create ``out`` if needed and write a probe file there; ConfigError (one line) if that
    fails."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".accord-write-test-{os.getpid()}"  # ranks probe concurrently
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ConfigError(f"out: cannot write to {out!r} ({reason}); allowed: a writable "
                          "directory") from None
