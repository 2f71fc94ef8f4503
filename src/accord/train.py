"""TrainConfig, its validation, and the training loop every worker runs.

The loop is the same for every algorithm (no branching on algorithm type)::

    for step in range(steps):
        faults: crash / kill; freeze snapshot
        zero grads; accum_steps x (forward, backward of loss / accum_steps)
        faults: delay / slow sleep, nan gradients, frozen rank's gradients zeroed
        non-finite guard (``nonfinite``)
        agg.after_backward(ctx); optimizer.step()
        faults: frozen rank back to its snapshot (the aggregator sees the frozen model)
        agg.after_step(ctx)
        faults: frozen rank back to its snapshot
        every log_every steps: metrics record, fault events gathered to rank 0, then a
        barrier bounded by ``idle_timeout`` (rank 0's evaluation is idle time for others)

Gradients of the ``accum_steps`` micro-batches are averaged locally without
communication before the aggregator sees them.

The non-finite guard (``TrainConfig.nonfinite``, ``--nonfinite``) checks the local
gradient after backward and before the aggregator's first hook:

* ``exclude`` (default): a rank whose gradient holds a NaN or Inf zeroes it for this step
  and takes part as usual (its model is finite, its gradient contributes zero, so an
  allreduce average is scaled by (n-1)/n that step; the optimizer still applies momentum
  and weight decay). The step is passed to the aggregator as ``StepContext(healthy=False)``
  (dynamic weighting does not count it as progress). Purely local: no extra
  communication, fine for asynchronous algorithms.
* ``skip``: one 1-number MAX allreduce on the loop's own communicator (not counted as the
  algorithm's traffic) per step; if any rank's gradient is non-finite, every rank skips
  the whole step (no aggregator hook, no optimizer step).
* ``off``: no check; a NaN spreads through the aggregation.

:func:`nonfinite_grads` is the same check for Python API users.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import algorithms, faults
from .comm import Communicator, FlatBuffer
from .core import Aggregator, StepContext
from .metrics import MetricsWriter, run_environment, tensorboard_available
from .tasks import get_task

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw")
BACKENDS = ("gloo", "nccl")
NONFINITE = ("exclude", "skip", "off")


class ConfigError(ValueError):
    """A bad setting, reported as one line before any worker starts."""


@dataclass
class TrainConfig:
    algo: str = "allreduce"
    task: str = "digits"
    workers: int = 2
    steps: int = 100
    seed: int = 0
    out: str = "runs/run"
    lr: float | None = None  # None: the task's default
    batch_size: int | None = None  # per worker and micro-step; None: the task's default
    accum_steps: int = 1
    optimizer: str = "sgd"
    momentum: float | None = None  # optimizer momentum; None: 0 for sgd, 0.9 for nesterov
    weight_decay: float = 0.0
    oracle_lr: bool = False
    log_every: int = 10
    timeout: float = 60.0  # process-group timeout in seconds: a started collective
    idle_timeout: float = 1800.0  # seconds a worker may wait for another's compute
    backend: str = "gloo"
    data_dir: str | None = None  # where a task looks for its data files (task default if None)
    progress: bool = True
    label: str | None = None  # name of this variant in reports (default: the algorithm)
    tensorboard: bool = False  # also write TensorBoard event files to OUT/tensorboard
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)
    nonfinite: str = "exclude"  # a rank's non-finite gradient: exclude it, skip the step, off

    # -- settings reachable with --set key=value when the algorithm has no such key --------
    SETTABLE = ("lr", "batch_size", "accum_steps", "optimizer", "momentum", "weight_decay",
                "oracle_lr", "log_every", "timeout", "idle_timeout", "nonfinite")

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else get_task(self.task).default_lr

    def resolved_batch_size(self) -> int:
        return self.batch_size if self.batch_size is not None else \
            get_task(self.task).default_batch_size

    def resolved_momentum(self) -> float:
        if self.momentum is not None:
            return self.momentum
        return 0.9 if self.optimizer == "nesterov" else 0.0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_argv(self) -> list[str]:
        """Arguments of ``accord train`` that rebuild this config (for worker processes)."""
        argv = ["--algo", self.algo, "--task", self.task, "--workers", str(self.workers),
                "--steps", str(self.steps), "--seed", str(self.seed), "--out", self.out,
                "--accum-steps", str(self.accum_steps), "--optimizer", self.optimizer,
                "--weight-decay", repr(self.weight_decay), "--log-every", str(self.log_every),
                "--timeout", repr(self.timeout), "--idle-timeout", repr(self.idle_timeout),
                "--backend", self.backend,
                "--nonfinite", self.nonfinite]
        if self.lr is not None:
            argv += ["--lr", repr(self.lr)]
        if self.batch_size is not None:
            argv += ["--batch-size", str(self.batch_size)]
        if self.momentum is not None:
            argv += ["--momentum", repr(self.momentum)]
        if self.data_dir is not None:
            argv += ["--data-dir", self.data_dir]
        if self.label is not None:
            argv += ["--label", self.label]
        if self.tensorboard:
            argv.append("--tensorboard")
        if self.oracle_lr:
            argv.append("--oracle-lr")
        if not self.progress:
            argv.append("--no-progress")
        for key, value in self.hyperparameters.items():
            if value is None:  # an unset optional hyperparameter
                continue
            text = json.dumps(value) if isinstance(value, bool) else str(value)
            argv += ["--set", f"algo.{key}={text}"]
        for spec in self.faults:
            argv += ["--fault", spec]
        return argv


def apply_settings(cfg: TrainConfig, settings: list[str]) -> None:
    """Apply ``--set key=value`` items: an algorithm hyperparameter if the algorithm has
    that key, else a training setting. ``algo.key`` / ``train.key`` force the target."""
    spec = algorithms.get(cfg.algo).hyperparameters
    for item in settings:
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
            setattr(cfg, key, _parse_setting(key, value))
        else:
            allowed = sorted(set(spec) | set(TrainConfig.SETTABLE))
            raise ConfigError(
                f"--set: unknown key {key!r}; allowed for {cfg.algo!r}: {', '.join(allowed)}")


def _parse_setting(key: str, value: str) -> Any:
    kind = {f.name: f.type for f in dataclasses.fields(TrainConfig)}[key]
    text = value.strip()
    try:
        if "bool" in kind:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError
            return text.lower() in ("true", "1", "yes", "on")
        if "int" in kind:
            number = float(text)
            if number != int(number):
                raise ValueError
            return int(number)
        if "float" in kind:
            return float(text)
    except ValueError:
        raise ConfigError(f"--set {key}: cannot read {value!r} as {kind}") from None
    return text


def validate(cfg: TrainConfig, *, check_out: bool = True) -> None:
    """Raise ConfigError naming the first bad field and what is allowed."""
    try:
        task = get_task(cfg.task)
        workers = cfg.workers if isinstance(cfg.workers, int) and cfg.workers >= 1 else None
        cfg.hyperparameters = algorithms.validate(cfg.algo, cfg.hyperparameters, workers)
    except ValueError as e:
        raise ConfigError(str(e)) from None

    def need(ok: bool, name: str, allowed: str, value: Any) -> None:
        if not ok:
            raise ConfigError(f"{name}: got {value!r}, allowed: {allowed}")

    need(isinstance(cfg.workers, int) and cfg.workers >= 1, "workers", "an integer >= 1",
         cfg.workers)
    need(isinstance(cfg.steps, int) and cfg.steps >= 1, "steps", "an integer >= 1", cfg.steps)
    need(cfg.lr is None or cfg.lr > 0, "lr", "a number > 0", cfg.lr)
    max_bs = task.max_batch_size
    need(cfg.batch_size is None or 1 <= cfg.batch_size <= (max_bs or float("inf")),
         "batch_size", f"an integer >= 1{f' and <= {max_bs}' if max_bs else ''}",
         cfg.batch_size)
    need(cfg.accum_steps >= 1, "accum_steps", "an integer >= 1", cfg.accum_steps)
    need(cfg.optimizer in OPTIMIZERS, "optimizer", ", ".join(OPTIMIZERS), cfg.optimizer)
    need(cfg.momentum is None or 0.0 <= cfg.momentum < 1.0, "momentum",
         "a number >= 0 and < 1", cfg.momentum)
    need(cfg.weight_decay >= 0.0, "weight_decay", "a number >= 0", cfg.weight_decay)
    need(cfg.log_every >= 1, "log_every", "an integer >= 1", cfg.log_every)
    need(cfg.timeout > 0, "timeout", "seconds > 0", cfg.timeout)
    need(cfg.idle_timeout >= cfg.timeout, "idle_timeout",
         f"seconds >= timeout ({cfg.timeout:g})", cfg.idle_timeout)
    need(cfg.backend in BACKENDS, "backend", ", ".join(BACKENDS), cfg.backend)
    need(cfg.nonfinite in NONFINITE, "nonfinite", ", ".join(NONFINITE), cfg.nonfinite)
    need(not cfg.tensorboard or tensorboard_available(), "tensorboard",
         "only with the tensorboard package installed (pip install tensorboard)",
         cfg.tensorboard)
    try:
        task.check_data(cfg.data_dir)
    except ValueError as e:
        raise ConfigError(f"task {cfg.task!r}: {e}") from None
    if cfg.oracle_lr:
        need(task.has_oracle_lr, "oracle_lr",
             "only with a task that has an oracle step size (linreg)", cfg.oracle_lr)
        need(cfg.optimizer == "sgd" and cfg.resolved_momentum() == 0.0, "oracle_lr",
             "only with --optimizer sgd and momentum 0", cfg.oracle_lr)
    try:
        cfg.faults = [faults.parse(spec, cfg.workers, cfg.steps).spec for spec in cfg.faults]
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if check_out:
        _check_writable(cfg.out)


def _check_writable(out: str) -> None:
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


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    lr, wd, mom = cfg.resolved_lr(), cfg.weight_decay, cfg.resolved_momentum()
    if cfg.optimizer in ("sgd", "nesterov"):
        return torch.optim.SGD(params, lr=lr, momentum=mom, weight_decay=wd,
                               nesterov=cfg.optimizer == "nesterov" and mom > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


def nonfinite_grads(params) -> bool:
    """True if any gradient of ``params`` holds a NaN or an Inf (parameters without a
    gradient are ignored). Local and exact: huge finite values are not flagged, and the
    result is read with a single synchronisation."""
    flags = [torch.isfinite(p.grad.detach()).all() for p in params if p.grad is not None]
    return bool(flags) and not bool(torch.stack(flags).all())


def _finite(x: float) -> float | None:
    return x if x == x and abs(x) != float("inf") else None


class ConsensusProbe:
    """The consensus model (mean of the replicas, or the algorithm's centre such as EASGD's)
    and ``consensus_distance`` = mean over replicas of ||x_i - mean||^2 (parameters and float
    buffers), measured on a copy: training state and the algorithm's counters are untouched.
    Collective: every rank calls ``measure``; rank 0 gets the model to evaluate."""

    def __init__(self, model: torch.nn.Module, comm: Communicator) -> None:
        self.comm = comm
        self.flat = FlatBuffer(_state_tensors(model))
        self.mean = self.flat.new_buffer()
        self.model = copy.deepcopy(model) if comm.rank == 0 else None
        self.target = FlatBuffer(_state_tensors(self.model)) if self.model is not None else None

    @torch.no_grad()
    def measure(self, agg: Aggregator) -> tuple[torch.nn.Module | None, float]:
        x = self.flat.load_values()
        self.mean.copy_(x)
        self.comm.all_reduce_(self.mean, op="avg")
        sq = (x - self.mean).double().pow(2).sum().reshape(1)
        distance = float(self.comm.all_reduce_(sq, op="avg"))
        if self.target is None:
            return None, distance
        self.target.store_values(self.mean)
        centre = agg.consensus_params()
        if centre is not None:
            if len(centre) != len(self.target.tensors):
                raise RuntimeError(f"{agg.name}: consensus_params gave {len(centre)} tensors "
                                   f"for a model state of {len(self.target.tensors)}")
            for t, c in zip(self.target.tensors, centre, strict=True):
                t.copy_(c)
        return self.model, distance


def _state_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]


def run_worker(cfg: TrainConfig) -> dict[str, Any] | None:
    """The per-process entry: join the process group from the torchrun environment, train,
    and (on rank 0) write ``metrics.jsonl``. Returns the summary record on rank 0."""
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    if world != cfg.workers:
        raise ConfigError(f"workers: got {cfg.workers}, but WORLD_SIZE is {world}; allowed: "
                          "the launcher's world size")
    out = Path(cfg.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    writer = None
    owns_group = False
    try:
        # a caller that already joined a process group (a test world) keeps it
        owns_group = not dist.is_initialized()
        if owns_group:
            dist.init_process_group(cfg.backend, timeout=timedelta(seconds=cfg.timeout))
        if rank == 0:
            writer = MetricsWriter(out / "metrics.jsonl",
                                   out / "tensorboard" if cfg.tensorboard else None)
            writer.write({"type": "header", "config": cfg.to_json(), "algorithm": cfg.algo,
                          "hyperparameters": cfg.hyperparameters, "world_size": world,
                          **run_environment()})
        summary = _train(cfg, rank, world, writer)
        return summary
    except BaseException as exc:
        message = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else \
            type(exc).__name__
        (logs / f"rank{rank}.error").write_text(
            json.dumps({"rank": rank, "time": time.time(), "error": message}) + "\n")
        if writer is not None:
            writer.write({"type": "summary", "status": "failed", "error": message,
                          "failed_rank": rank, **writer.last_eval})
        raise
    finally:
        if writer is not None:
            writer.close()
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, rank: int, world: int, writer: MetricsWriter | None):
    task = get_task(cfg.task)(cfg.seed, cfg.data_dir)
    model = task.build_model()
    optimizer = make_optimizer(cfg, model.parameters())
    hp = dict(cfg.hyperparameters)
    spec = algorithms.get(cfg.algo).hyperparameters
    for key in ("timeout", "idle_timeout"):  # background rounds follow the run's timeouts
        if key in spec and key not in hp:
            hp[key] = getattr(cfg, key)
    agg = algorithms.build(cfg.algo, model.parameters(), buffers=model.buffers(), **hp)
    injector = faults.Injector([faults.parse(s, world, cfg.steps) for s in cfg.faults], rank,
                               world, cfg.seed)
    state = _state_tensors(model)
    params = list(model.parameters())
    events: dict[str, int] = {}
    pending = 0
    stream = task.train_stream(rank, cfg.resolved_batch_size())
    loop_comm = Communicator()  # for logging only; not counted as the algorithm's traffic
    # waits for another rank's compute (rank 0 evaluating, a straggler finishing its last
    # steps) are idle, not failures: they get a barrier bounded by idle_timeout first
    idle = dist.new_group(list(range(world)), timeout=timedelta(seconds=cfg.idle_timeout),
                          backend="gloo") if world > 1 else None
    probe = ConsensusProbe(model, loop_comm)
    bar = None
    if rank == 0 and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, desc=f"{cfg.algo}/{cfg.task} x{world}", unit="step",
                   dynamic_ncols=True)
    start = time.perf_counter()
    running = None
    try:
        for step in range(cfg.steps):
            injector.before_step(step)
            frozen = injector.freeze_active(step)
            if frozen:
                injector.freeze_snapshot(step, state)
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros(())
            compute_start = time.perf_counter()
            for _ in range(cfg.accum_steps):
                loss = task.loss(model, next(stream))
                (loss / cfg.accum_steps).backward()
                loss_sum += loss.detach()
            injector.after_compute(step, time.perf_counter() - compute_start)
            injector.corrupt_grads(step, params)
            if frozen:
                injector.freeze_grads(step, state, params)
            proceed, healthy = _guard(cfg.nonfinite, params, loop_comm, injector, step, rank)
            ctx = StepContext(step=step, loss=loss_sum / cfg.accum_steps, healthy=healthy)
            if proceed:
                agg.after_backward(ctx)
                if cfg.oracle_lr:
                    for group in optimizer.param_groups:
                        group["lr"] = task.oracle_lr(model)
                optimizer.step()
                if frozen:  # the aggregator sees the frozen model, whatever the optimizer did
                    injector.hold(state)
                agg.after_step(ctx)
            if frozen:
                injector.restore(step, state)
            train_end = time.perf_counter()  # before the record's collectives wait for others

            value = float(ctx.loss)
            running = value if running is None else 0.9 * running + 0.1 * value
            if bar is not None:
                bar.update(1)
            last = step == cfg.steps - 1
            if (step + 1) % cfg.log_every == 0 or last:
                mean_loss = loop_comm.all_reduce_(ctx.loss.reshape(1).clone(), op="avg")
                consensus_model, distance = probe.measure(agg)
                new_events = _gather_events(injector.drain(), world)
                if writer is not None:
                    for event in new_events:
                        writer.write({"type": "event", **event})
                        events[event["kind"]] = events.get(event["kind"], 0) + 1
                    pending = len(new_events)
                    evaluation = task.evaluate(consensus_model)
                    replica = task.evaluate(model)
                    stats = agg.comm.stats
                    writer.write({"type": "step", "step": step + 1,
                                  "loss": _finite(float(mean_loss)),
                                  **{k: _finite(v) for k, v in evaluation.items()},
                                  **{f"rank0_{k}": _finite(v) for k, v in replica.items()},
                                  "consensus_distance": _finite(distance),
                                  "time_s": time.perf_counter() - start,
                                  "comm_bytes": stats.bytes, "comm_calls": stats.calls,
                                  "comm_s": stats.seconds, "events": pending,
                                  "algo": {k: _finite(v) for k, v in agg.metrics().items()}})
                    writer.last_eval = {k: _finite(v) for k, v in evaluation.items()}
                if idle is not None:  # nobody enters a timed collective while rank 0 evaluates
                    dist.barrier(group=idle)
                if bar is not None:
                    bar.set_postfix(loss=f"{running:.4g}", refresh=False)
        elapsed = time.perf_counter() - start
        if idle is not None:  # fast workers of an asynchronous run wait for the slow ones
            dist.barrier(group=idle)
        # rank 0's bytes are not every worker's (a broadcast counts on the sender only)
        stats = agg.comm.stats
        mean_bytes = loop_comm.all_reduce_(torch.tensor([float(stats.bytes)],
                                                        dtype=torch.float64), op="avg")
        # each worker's own wall time: asynchronous algorithms let fast workers finish first
        worker_times = loop_comm.all_gather(torch.tensor([train_end - start],
                                                         dtype=torch.float64))
        summary = None
        if writer is not None:
            summary = {"type": "summary", "status": "ok", "steps": cfg.steps,
                       "time_s": elapsed, "steps_per_s": cfg.steps / elapsed,
                       "comm_bytes": stats.bytes, "comm_bytes_mean": float(mean_bytes),
                       "comm_calls": stats.calls,
                       "comm_s": stats.seconds, "comm": stats.as_dict(),
                       "worker_time_s": [float(t) for t in worker_times.reshape(-1)],
                       "events": events, **writer.last_eval}
            writer.write(summary)
        return summary
    finally:
        if bar is not None:
            bar.close()
        agg.close()


def _guard(mode: str, params, comm: Communicator, injector: faults.Injector, step: int,
           rank: int) -> tuple[bool, bool]:
    """The non-finite gradient guard: (proceed, healthy). ``proceed`` is False when this
    step must be skipped (every rank then skips it); ``healthy`` is False when this rank's
    gradient was excluded. exclude: a rank with a non-finite gradient zeroes it (local);
    skip: one 1-number MAX allreduce, and all ranks skip if any had one; off: nothing."""
    if mode == "off":
        return True, True
    bad = nonfinite_grads(params)
    if mode == "exclude":
        if bad:
            for p in params:
                if p.grad is not None:
                    p.grad.zero_()
            injector.events.append({"step": step, "rank": rank, "kind": "nonfinite_grad",
                                    "action": "excluded"})
        return True, not bad
    flag = comm.all_reduce_(torch.tensor([float(bad)]), op="max")
    if bool(flag[0] > 0):
        if bad:
            injector.events.append({"step": step, "rank": rank, "kind": "nonfinite_grad",
                                    "action": "skipped step"})
        return False, not bad
    return True, True


def _gather_events(mine: list[dict[str, Any]], world: int) -> list[dict[str, Any]]:
    """Every rank's events since the last record, on rank 0 (collective), ordered by
    (step, rank)."""
    if world == 1:
        return mine
    gathered: list[list[dict[str, Any]] | None] = [None] * world
    dist.all_gather_object(gathered, mine)
    out = [e for part in gathered for e in (part or [])]
    return sorted(out, key=lambda e: (e["step"], e["rank"]))
