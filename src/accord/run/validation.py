"""Validation of a :class:`~accord.run.config.TrainConfig`, before any worker starts.

:func:`validate` raises :class:`ConfigError` naming the first bad field and what is allowed,
so the CLI prints one line and exits with status 2; the run's payload compressor, emulated
network and fault-tolerant timeouts are built here from the checked settings.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import algorithms
from ..errors import ConfigError, ConfigTypeError
from ..tasks import EVAL_SPLITS, get_task
from . import faults
from .config import (
    BACKENDS,
    DEVICES,
    LINKS,
    MAX_ACCUM_STEPS,
    MAX_KEEP,
    MAX_LR,
    MAX_RESTARTS,
    MAX_SEED,
    MAX_TIMEOUT_S,
    MAX_WEIGHT_DECAY,
    MIN_TIMEOUT_S,
    NONFINITE,
    OPTIMIZERS,
    SECOND_ORDER,
    TrainConfig,
    _allowed,
    _is_int,
    _is_real,
    load_plugins,
    max_workers,
)
from .metrics import tensorboard_available
from .process import launched_here, under_torchrun


def _algorithms_with(capability: str) -> str:
    """The registry names whose class declares ``capability`` true, comma-separated."""
    from ..algorithms import REGISTRY

    return ", ".join(n for n, c in sorted(REGISTRY.items()) if getattr(c, capability))


def payload_compression(cfg: TrainConfig) -> Any:
    """The run's :class:`accord.comm.compress.Compressor`, or None for ``compress="none"``;
    ConfigError (one line) for an unknown scheme or an algorithm that cannot use it."""
    from ..comm.compress import Compressor

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
    from ..algorithms import get

    cls = get(cfg.algo)  # each class declares what --compress may touch
    if not cls.compressible:
        raise ConfigError(f"compress: {cfg.algo!r} sends its payload point to point or by "
                          "broadcast, which --compress does not compress; allowed with: "
                          f"{_algorithms_with('compressible')}")
    # the lossy schemes with error feedback need a gradient payload (accord.comm.compress says why)
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
    """The run's emulated network (an :class:`accord.comm.network.Link` or ``Network``), or None;
    ConfigError (one line) for a malformed ``--network`` or profile, or both given."""
    from ..comm import network

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
    choice("links", LINKS)
    if cfg.links == "real" and cfg.network is None and cfg.network_profile is None:
        fail("links", cfg.links, "real with --network or --network-profile (the links to "
             "shape), or emulated")
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
    from ..algorithms._sketch_native import mode as native_mode

    try:
        native_mode()  # the environment's ACCORD_NATIVE, checked before any worker starts
    except ValueError as e:
        raise ConfigError(str(e)) from None
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
    """The :class:`accord.ft.membership.FTTimeouts` of a fault-tolerant run (checked)."""
    from ..ft.membership import FTTimeouts

    return FTTimeouts(heartbeat=FT_HEARTBEAT_S, quorum=FT_QUORUM_S,
                      process_group=float(cfg.timeout),
                      step_deadline=float(cfg.idle_timeout)).check()


def _check_fault_tolerant(cfg: TrainConfig) -> None:
    """One-line ConfigError unless this fault-tolerant run can start."""
    import importlib.util

    if importlib.util.find_spec("torchft") is None:
        raise ConfigError("--fault-tolerant needs torchft: pip install 'accord[ft]'")
    from ..ft import membership as ft

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
    from .. import algorithms
    from ..core import resolve_hyperparameters

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
