"""The training loop every worker runs (its settings: :mod:`accord.config`).

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
import json
import logging
import os
import random
import signal
import sys
import threading
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import algorithms, checkpoint, faults
from .comm import Communicator, FlatBuffer, compress_payloads, emulate_network, payload_compressor
from .config import SECOND_ORDER, ConfigError, TrainConfig, emulated_network, payload_compression
from .core import Aggregator, StepContext
from .failures import (
    Failure,
    Heartbeat,
    StorageError,
    attribute,
    is_consequence,
    one_line,
    send_report,
    storage_error,
    wait_for_reports,
)
from .metrics import MetricsWriter, run_environment, scan_metrics
from .observe import AsyncObserver, ConsensusProbe, divergence, finite_or_none, state_tensors
from .tasks import get_task, stream_seed, task_source, to_device

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # under the run directory
#: key of the global generators' seed, beside (seed, rank): distinct from the data stream's
RNG_KEY = 0x5EED
#: the summary statuses of a run that ended by itself: a resume finds nothing to do
ENDED = ("ok", "diverged")

# names other modules (and older scripts) import from here
ConsensusProbe = ConsensusProbe
state_tensors = state_tensors
_finite = finite_or_none
_divergence = divergence


def ended_run(cfg: TrainConfig) -> dict[str, Any] | None:
    """The summary of the run in ``cfg.out`` if it ended by itself (status ``ok`` after at
    least ``cfg.steps`` steps, or ``diverged``): resuming it has nothing to do."""
    path = Path(cfg.out) / "metrics.jsonl"
    try:
        records = scan_metrics(path).records if path.is_file() else []
    except OSError:
        return None
    summary = records[-1] if records and records[-1].get("type") == "summary" else None
    if summary is None or summary.get("status") not in ENDED:
        return None
    steps = summary.get("steps")
    if summary["status"] == "ok" and not (isinstance(steps, int) and steps >= cfg.steps):
        return None  # a longer run of the same settings continues it
    return summary


def _header(out: Path) -> dict[str, Any] | None:
    """The header record of ``out``'s metrics.jsonl, or None (no file, or none readable)."""
    path = out / "metrics.jsonl"
    try:
        records = scan_metrics(path).records if path.is_file() else []
    except OSError:
        return None
    head = records[0] if records else None
    return head if head is not None and head.get("type") == "header" else None


def _differs(cfg: TrainConfig, header: dict[str, Any]) -> str | None:
    """The first setting a resumed run may not change that differs from the run recorded
    in ``header`` ("seed was 0, this run has 7"), or None."""
    recorded = {**TrainConfig.ADDED_DEFAULTS, **(header.get("config") or {})}
    for key, value in cfg.fingerprint().items():
        if recorded.get(key) != value:
            return f"{key} was {recorded.get(key)!r}, this run has {value!r}"
    return None


def same_run(cfg: TrainConfig) -> None:
    """CheckpointError (one line) when ``cfg.out``'s records are of a run with settings a
    resumed run may not change: resuming, or starting over, would mix or replace it."""
    header = _header(Path(cfg.out))
    differs = None if header is None else _differs(cfg, header)
    if differs is not None:
        raise checkpoint.CheckpointError(
            f"{Path(cfg.out) / 'metrics.jsonl'} records a run with other settings "
            f"({differs}); allowed: that run's settings (a resumed run may change: "
            f"{', '.join(TrainConfig.RESUME_MAY_CHANGE)}), or another --out")


def resolve_resume(cfg: TrainConfig, world: int) -> tuple[Path | None, list[str]]:
    """The checkpoint a ``--resume`` run continues from (None: ``auto`` found none, start
    from step 0) and one line per newer checkpoint skipped. A named checkpoint that cannot
    be used raises :class:`accord.checkpoint.CheckpointError`, and so does ``auto`` without
    a checkpoint when the directory's records are of a run with other settings (starting
    over would replace that run)."""
    root = Path(cfg.out) / CHECKPOINTS
    same_run(cfg)
    if cfg.resume == "auto":
        path, skipped = checkpoint.find(root, world, cfg.fingerprint(),
                                        defaults=TrainConfig.ADDED_DEFAULTS)
        if path is None:
            # intact checkpoints of this directory's run, none matching this config: the
            # config changed (starting over would discard the run), so name what differs
            for d in checkpoint.step_dirs(root):
                try:
                    checkpoint.verify(d)
                except checkpoint.CheckpointError:
                    continue
                checkpoint.verify(d, world, cfg.fingerprint(),
                                  defaults=TrainConfig.ADDED_DEFAULTS)
        return path, skipped
    path = Path(cfg.resume)
    checkpoint.verify(path, world, cfg.fingerprint(), defaults=TrainConfig.ADDED_DEFAULTS)
    return path, []


def resume_plan(cfg: TrainConfig) -> tuple[str, bool]:
    """Check ``--resume`` before any worker starts: what the run will do, for the terminal,
    and whether there is anything to do (False: the run already ended). ConfigError (one
    line) for a checkpoint that cannot be used."""
    try:
        same_run(cfg)
        ended = ended_run(cfg)
        if ended is not None:
            how = "finished" if ended["status"] == "ok" else "ended (diverged)"
            return (f"nothing to do: run already {how} at step {ended.get('steps')} "
                    f"({Path(cfg.out) / 'metrics.jsonl'})"), False
        path, skipped = resolve_resume(cfg, cfg.workers)
    except checkpoint.CheckpointError as e:
        hint = ""
        if "allowed: the checkpointed run's value" in str(e):
            hint = f" (a resumed run may change: {', '.join(TrainConfig.RESUME_MAY_CHANGE)})"
        raise ConfigError(f"resume: {e}{hint}") from None
    lines = [f"skipped {line}" for line in skipped]
    if path is None:
        kept = " (the earlier attempts' records are kept)" if _header(Path(cfg.out)) else ""
        lines.append(f"no complete checkpoint under {Path(cfg.out) / CHECKPOINTS}; "
                     f"starting from step 0{kept}")
    else:
        lines.append(f"resuming from {path}")
    return "\n".join(lines), True


def _continue_metrics(path: Path, step: int, record: dict[str, Any]) -> list[dict[str, Any]]:
    """Keep the records of ``metrics.jsonl`` up to checkpoint step ``step`` (a crashed run
    wrote some past it; a torn last line is dropped), drop its summary, and add ``record``
    (the resume): the file then reads as one run. Returns the records kept."""
    kept = []
    for r in scan_metrics(path).records if path.exists() else []:
        kind = r.get("type")
        if kind == "summary":
            continue
        if kind == "step" and r.get("step", 0) > step:
            continue
        if kind == "event" and r.get("step", 0) >= step:
            continue
        kept.append(r)
    kept.append(record)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    except OSError as e:  # metrics.jsonl stays as it was
        tmp.unlink(missing_ok=True)
        raise StorageError(path, e) from None
    os.replace(tmp, path)
    return kept


def _task_source(cfg: TrainConfig) -> dict[str, Any]:
    """A user task's spec, file and SHA-256 for the header (nothing for a built-in one)."""
    source = task_source(cfg.task)
    return {} if source is None else {"task_source": source}


def _attempts(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The earlier attempts of a run (first step, wall-clock start of the training loop)
    from their ``start`` records."""
    return [{"from_step": int(r.get("step", 0)), "started": float(r["time"])}
            for r in records if r.get("type") == "start"
            and isinstance(r.get("time"), int | float) and isinstance(r.get("step"), int)]


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    lr, wd, mom = cfg.resolved_lr(), cfg.weight_decay, cfg.resolved_momentum()
    if cfg.optimizer in ("sgd", "nesterov"):
        return torch.optim.SGD(params, lr=lr, momentum=mom, weight_decay=wd,
                               nesterov=cfg.optimizer == "nesterov" and mom > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if cfg.optimizer == "adahessian":  # pytorch-optimizer's (extra: adahessian)
        from ._extras import require

        return require("pytorch_optimizer", "adahessian").AdaHessian(params, lr=lr,
                                                                       weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


def nonfinite_grads(params) -> bool:
    """True if any gradient of ``params`` holds a NaN or an Inf (parameters without a
    gradient are ignored). Local and exact: huge finite values are not flagged, and the
    result is read with a single synchronisation."""
    flags = [torch.isfinite(p.grad.detach()).all() for p in params if p.grad is not None]
    return bool(flags) and not bool(torch.stack(flags).all())


def seed_worker(seed: int, rank: int) -> None:
    """Seed every global generator a task, model, optimizer or user code may draw from
    (torch on the CPU and every GPU, numpy, ``random``) from (run seed, rank): dropout masks
    and AdaHessian's Hutchinson probes then repeat from run to run and differ between ranks,
    as the data streams do. (Initial models come from the task's own seeded generator and
    data streams from generators keyed (seed, rank), so neither depends on this.)"""
    value = stream_seed(seed, rank, RNG_KEY)
    torch.manual_seed(value)  # also seeds every CUDA device
    np.random.seed(value % 2**32)
    random.seed(value)


def run_worker(cfg: TrainConfig) -> dict[str, Any] | None:
    """The per-process entry: join the process group from the torchrun environment, train,
    and (on rank 0) write ``metrics.jsonl``. Returns the summary record on rank 0.

    The run's status (the summary's ``status``): ``ok``; ``diverged`` (the replicas'
    parameters or the consensus model's evaluation became non-finite: every rank stops at
    that record, ``diverged_step`` says where); ``failed`` (an exception; rank 0 names the
    rank that failed first, see :mod:`accord.failures`); ``interrupted`` (SIGINT or
    SIGTERM). On an exception every rank leaves ``logs/rank<r>.error`` (one line) and
    ``logs/rank<r>.traceback`` before re-raising."""
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
    heartbeat = None
    previous = _interrupt_on_sigterm()
    try:
        # a caller that already joined a process group (a test world) keeps it
        owns_group = not dist.is_initialized()
        device = torch.device(cfg.resolved_device())
        if device.type == "cuda":  # one process per GPU, as torchrun's LOCAL_RANK says
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
            torch.cuda.set_device(device)
        if owns_group:
            store = _arrive(cfg, world)
            if store is None:
                dist.init_process_group(cfg.resolved_backend(),
                                        timeout=timedelta(seconds=cfg.timeout))
            else:
                dist.init_process_group(cfg.resolved_backend(), store=store, rank=rank,
                                        world_size=world,
                                        timeout=timedelta(seconds=cfg.timeout))
        resume = None
        if cfg.resume is not None:  # rank 0 decides, every rank follows
            choice: list[Any] = [None]
            if rank == 0:
                same_run(cfg)
                ended = ended_run(cfg)
                if ended is not None:
                    choice = [("ended", ended)]
                else:
                    path, skipped = resolve_resume(cfg, world)
                    continued = path is None and _header(out) is not None
                    choice = [("start", continued) if path is None
                              else ("checkpoint", (str(path), skipped))]
            if world > 1:
                dist.broadcast_object_list(choice, src=0)
            kind, detail = choice[0]
            if kind == "ended":  # nothing to do; every record stays as it was
                return {**detail, "nothing_to_do": True} if rank == 0 else None
            resume = detail if kind == "checkpoint" else None
            continued = kind == "start" and detail
        else:
            continued = False
        heartbeat = Heartbeat(logs, rank)
        heartbeat.beat(0, "start")
        emulate_network(emulated_network(cfg))  # every Communicator of this process
        compress_payloads(payload_compression(cfg))
        if rank == 0:
            tb = out / "tensorboard" if cfg.tensorboard else None
            now = time.time()
            if resume is None and not continued:
                writer = MetricsWriter(out / "metrics.jsonl", tb)
                writer.write({"type": "header", "config": cfg.to_json(), "algorithm": cfg.algo,
                              "hyperparameters": cfg.hyperparameters, "world_size": world,
                              "time": now, **_task_source(cfg), **run_environment()})
            else:
                # a restart keeps the earlier attempts' records (from step 0 without a
                # checkpoint): the run's wall time and attempts are read from them
                step = 0 if resume is None else checkpoint.read_manifest(resume[0])["step"]
                kept = _continue_metrics(out / "metrics.jsonl", step, {
                    "type": "resume", "step": step,
                    "checkpoint": None if resume is None else resume[0],
                    "skipped": [] if resume is None else resume[1], "time": now,
                    "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))})
                writer = MetricsWriter(out / "metrics.jsonl", tb, append=True)
                writer.attempts = _attempts(kept)
        summary = _train(cfg, rank, world, writer, heartbeat, device,
                         None if resume is None else Path(resume[0]))
        heartbeat.beat(cfg.steps, "done")
        return summary
    except BaseException as exc:
        _report(exc, cfg, rank, world, logs, heartbeat, writer)
        raise
    finally:
        emulate_network(None)
        compress_payloads(None)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if heartbeat is not None:
            heartbeat.close()
        if writer is not None:
            writer.close()
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _arrive(cfg: TrainConfig, world: int) -> dist.Store | None:
    """Wait, bounded by ``idle_timeout``, until every worker has started, in the store of
    the local launcher or of torchrun's agent: workers that start seconds apart (a busy
    machine, a slow import) are idle, not failed, and the process group's setup that
    follows, bounded by ``timeout``, then finds every peer there. Returns the store for the
    process group, under a prefix of this attempt: torchrun keeps its store across
    restarts, and a restarted worker must not read a dead worker's address from it."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # rank 0 hosts the store inside init_process_group
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False, timeout=timedelta(seconds=cfg.idle_timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    key = f"accord/arrived/{attempt}"
    if store.add(key, 1) == world:
        store.set(f"{key}/all", "1")
    store.wait([f"{key}/all"])
    return dist.PrefixStore(f"accord/attempt{attempt}", store)


def _report(exc: BaseException, cfg: TrainConfig, rank: int, world: int, logs: Path,
            heartbeat: Heartbeat | None, writer: MetricsWriter | None) -> None:
    """What a failing worker leaves behind: its error and traceback files and, on rank 0,
    the summary naming the rank that failed first. An interruption (SIGINT, SIGTERM) is
    recorded as ``interrupted`` unless another rank's failure explains it (torchrun
    stops every worker when one dies)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish the report first
    interrupted = isinstance(exc, KeyboardInterrupt)
    step = heartbeat.step if heartbeat is not None else None
    if not interrupted:
        message = one_line(exc)
        if heartbeat is not None:
            heartbeat.beat(heartbeat.step, "failed")
        record = {"rank": rank, "time": time.time(), "error": message, "step": step}
        send_report(record)  # to the local launcher: logs/ may be on the disk that is full
        _evidence(logs / f"rank{rank}.traceback", traceback.format_exc())
        _evidence(logs / f"rank{rank}.error", json.dumps(record) + "\n")
    if writer is None:
        return
    # give the root cause time to leave its report (an interruption from the user: briefly)
    if interrupted or is_consequence(message):
        wait_for_reports(logs, world, rank, min(1.0 if interrupted else 5.0, cfg.timeout))
    failure = attribute(logs, world, ignore=rank)
    if not interrupted and failure.rank is None and not is_consequence(message):
        # no evidence file could be written (logs/ on a full disk): this rank's own error
        # is the best cause known here (the launcher, which got it on its pipe, agrees)
        failure = Failure(rank, message, step)
    if interrupted and (failure.rank is None or failure.rank == rank):
        summary = {"type": "summary", "status": "interrupted",
                   "error": "interrupted (SIGINT or SIGTERM)", "interrupted_step": step,
                   **writer.last_eval}
    else:
        summary = {"type": "summary", "status": "failed", **failure.record(),
                   **writer.last_eval}
    try:
        writer.write(summary)
    except OSError:
        pass  # metrics.jsonl is on the full disk: the launcher says so in its one line


def _evidence(path: Path, text: str) -> None:
    """Write a failing worker's evidence file, or none at all: on a full disk a partial
    file would be misread (an empty traceback, a torn error line)."""
    try:
        path.write_text(text)
    except OSError:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def _interrupt_on_sigterm():
    """SIGTERM (torchrun or the launcher stopping the run) ends the run like Ctrl-C, so
    rank 0 closes ``metrics.jsonl`` with an ``interrupted`` summary."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _train(cfg: TrainConfig, rank: int, world: int, writer: MetricsWriter | None,
           heartbeat: Heartbeat, device: torch.device, resume: Path | None = None):
    seed_worker(cfg.seed, rank)  # before the task builds anything (a resume restores it)
    task = get_task(cfg.task)(cfg.seed, cfg.data_dir, split=cfg.eval_split).to(device)
    model = task.build_model().to(device)
    optimizer = make_optimizer(cfg, model.parameters())
    saved = None
    if resume is not None:
        # the model and optimizer first: an aggregator snapshots the model when it is built
        # (EASGD's centre, the background engine's first deposit)
        saved = checkpoint.read(resume, map_location=device)
        checkpoint.restore(saved, model, optimizer, rng=False)
    hp = dict(cfg.hyperparameters)
    spec = algorithms.get(cfg.algo).hyperparameters
    for key in ("timeout", "idle_timeout"):  # background rounds follow the run's timeouts
        if key in spec and key not in hp:
            hp[key] = getattr(cfg, key)
    # every rank built the same model from the run seed: no initial broadcast, so the
    # algorithm's traffic counts only what it sends per step
    agg = algorithms.build(cfg.algo, model.parameters(), buffers=model.buffers(),
                           broadcast=False, **hp)
    injector = faults.Injector([faults.parse(s, world, cfg.steps) for s in cfg.faults], rank,
                               world, cfg.seed, fired_dir=Path(cfg.out) / "logs")
    first = 0
    extra: dict[str, Any] = {}
    if saved is not None:
        checkpoint.restore(saved, aggregator=agg, rng=True)
        first, extra = int(saved["step"]), saved.get("extra", {})
        del saved
        if payload_compressor() is not None and extra.get("compressor") is not None:
            payload_compressor().load_state_dict(extra["compressor"])
    state = state_tensors(model)
    params = list(model.parameters())
    events: dict[str, int] = dict(extra.get("events", {}))
    pending = 0
    stream = task.train_stream(rank, cfg.resolved_batch_size())
    for _ in range(first * cfg.accum_steps):  # the data stream continues where it stopped
        next(stream)
    # for logging only: not the algorithm's traffic, not counted, no emulated network
    loop_comm = Communicator(emulated=False)
    # waits for another rank's compute (rank 0 evaluating, a straggler finishing its last
    # steps) are idle, not failures: they get a barrier bounded by idle_timeout first
    idle = dist.new_group(list(range(world)), timeout=timedelta(seconds=cfg.idle_timeout),
                          backend="gloo") if world > 1 else None
    # an algorithm that avoids waits is observed without a global wait (accord.observe)
    observer = AsyncObserver(model, agg, world, rank, cfg.idle_timeout,
                             _async_writer(task, model, writer, events)) \
        if agg.avoids_waits and world > 1 else None
    probe = ConsensusProbe(model, loop_comm) if observer is None else None
    bar = None
    if rank == 0 and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=first, desc=f"{cfg.algo}/{cfg.task} x{world}",
                   unit="step", dynamic_ncols=True)
    # a resumed run's clock continues from the checkpoint's
    second_order = cfg.optimizer in SECOND_ORDER
    if second_order:  # torch warns of a .grad cycle that zero_grad(set_to_none) breaks
        warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph")
    start = time.perf_counter() - float(extra.get("elapsed", 0.0))
    running = extra.get("running")
    if running is not None:
        running = running.to(device)
    if writer is not None and extra.get("last_eval") is not None:
        writer.last_eval = dict(extra["last_eval"])
    diverged: dict[str, Any] | None = None
    steps_done = first
    train_end = time.perf_counter()  # a resume at the last step runs no step
    if writer is not None:  # the run's wall time counts from its first attempt's start
        writer.attempts.append({"from_step": first, "started": time.time()})
        writer.write({"type": "start", "step": first, "time": writer.attempts[-1]["started"]})
    try:
        for step in range(first, cfg.steps):
            heartbeat.beat(step, "compute")
            injector.before_step(step)
            frozen = injector.freeze_active(step)
            if frozen:
                injector.freeze_snapshot(step, state)
            # zeroed in place: gradient-phase aggregators bind .grad to their flat buffer,
            # so backward accumulates straight into it (no copy in or out)
            # (a second-order optimizer's gradients carry their graph: set to None, which
            # frees it, as torch advises for create_graph=True)
            optimizer.zero_grad(set_to_none=second_order)
            loss_sum = torch.zeros((), device=device)
            compute_start = time.perf_counter()
            for _ in range(cfg.accum_steps):
                loss = task.loss(model, to_device(next(stream), device))
                # a second-order optimizer differentiates the gradient again
                (loss / cfg.accum_steps).backward(create_graph=second_order)
                loss_sum += loss.detach()
            injector.after_compute(step, time.perf_counter() - compute_start)
            heartbeat.beat(step, "aggregate")
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
                if not (frozen and second_order):
                    # (a frozen rank's zeroed gradient has no graph for a Hessian-vector
                    # product: no second-order step, which hold() would undo anyway)
                    optimizer.step()
                if frozen:  # the aggregator sees the frozen model, whatever the optimizer did
                    injector.hold(state)
                agg.after_step(ctx)
            if frozen:
                injector.restore(step, state)
            train_end = time.perf_counter()  # before the record's collectives wait for others

            # the running loss stays on the device; it is read at records only
            running = ctx.loss.clone() if running is None else running.lerp_(ctx.loss, 0.1)
            if bar is not None:
                bar.update(1)
            steps_done = step + 1
            last = step == cfg.steps - 1
            if observer is not None:
                if (step + 1) % cfg.log_every == 0 or last:
                    heartbeat.beat(step, "record")
                    observer.submit(step + 1, ctx.loss, injector.drain(), None if writer is None
                                    else _record_fields(agg, start))
                    if bar is not None:
                        bar.set_postfix(loss=f"{float(running):.4g}", refresh=False)
                # stop only where every rank already waits for every other: the vote adds
                # no wait there (a diverged run without such a step ends at its last step)
                if agg.synchronised(step) and _agree(observer.diverged is not None, idle):
                    observer.flush()
                    diverged = observer.diverged or {"diverged_step": step + 1,
                                                     "diverged_reason": "non-finite"}
                    break
            elif (step + 1) % cfg.log_every == 0 or last:
                heartbeat.beat(step, "record")
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
                # diverged: non-finite parameters anywhere, or a non-finite evaluation; the
                # flag is agreed on by an allreduce that is also the barrier after rank 0's
                # evaluation (nobody enters a timed collective while rank 0 evaluates)
                reason = _divergence(distance, evaluation if writer is not None else {})
                if _agree(reason is not None, idle):
                    diverged = {"diverged_step": step + 1,
                                "diverged_reason": reason or "non-finite on another rank"}
                    break
                if bar is not None:
                    bar.set_postfix(loss=f"{float(running):.4g}", refresh=False)
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                heartbeat.beat(step, "checkpoint")
                if observer is not None:  # the records up to the checkpoint first
                    observer.flush()
                _checkpoint(cfg, step + 1, model, optimizer, agg, idle, writer, {
                    "events": events, "elapsed": time.perf_counter() - start,
                    "running": running,
                    "last_eval": writer.last_eval if writer is not None else None,
                    "compressor": (payload_compressor().state_dict()
                                   if payload_compressor() is not None else None)})
        elapsed = time.perf_counter() - start
        if observer is not None:
            observer.flush()
            if diverged is None and observer.diverged is not None:
                diverged = observer.diverged  # found after the last synchronised step
        if idle is not None:  # fast workers of an asynchronous run wait for the slow ones
            dist.barrier(group=idle)
        heartbeat.beat(steps_done, "summary")
        # rank 0's bytes are not every worker's (a broadcast counts on the sender only)
        stats = agg.comm.stats
        mean_bytes = loop_comm.all_reduce_(torch.tensor([float(stats.bytes)],
                                                        dtype=torch.float64, device=device),
                                           op="avg")
        # each worker's own wall time: asynchronous algorithms let fast workers finish first
        worker_times = loop_comm.all_gather(torch.tensor([train_end - start],
                                                         dtype=torch.float64, device=device))
        summary = None
        if writer is not None:
            # the run's wall time from its first attempt's start (restarts and lost work
            # included); train_s is the loop's clock, continued from checkpoints
            now = time.time()
            attempts = writer.attempts
            summary = {"type": "summary", "status": "ok" if diverged is None else "diverged",
                       **(diverged or {}), "steps": steps_done,
                       "time_s": now - attempts[0]["started"], "train_s": elapsed,
                       "attempts": [
                           {"from_step": a["from_step"],
                            "seconds": (b["started"] if b is not None else now) - a["started"]}
                           for a, b in zip(attempts, [*attempts[1:], None], strict=True)],
                       "steps_per_s": steps_done / elapsed,
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
        if observer is not None:
            observer.close(abort=sys.exc_info()[0] is not None)
        agg.close()


def _record_fields(agg: Aggregator, start: float) -> dict[str, Any]:
    """Rank 0's part of an asynchronous step record, taken at the step itself."""
    stats = agg.comm.stats
    return {"time_s": time.perf_counter() - start, "comm_bytes": stats.bytes,
            "comm_calls": stats.calls, "comm_s": stats.seconds,
            "algo": {k: finite_or_none(v) for k, v in agg.metrics().items()}}


def _async_writer(task, model: torch.nn.Module, writer: MetricsWriter | None,
                  events: dict[str, int]):
    """What rank 0's observer thread does with a record's gathered numbers: evaluate the
    consensus and rank 0's own snapshot on copies of the model, write the fault events and
    the step record (the same fields as the inline path's, plus how stale it is)."""
    if writer is None:
        return lambda obs, result: None
    consensus, replica = copy.deepcopy(model), copy.deepcopy(model)
    into_consensus = FlatBuffer(state_tensors(consensus))
    into_replica = FlatBuffer(state_tensors(replica))

    def write(obs, result: dict[str, Any]) -> dict[str, float]:
        for event in result["events"]:
            writer.write({"type": "event", **event})
            events[event["kind"]] = events.get(event["kind"], 0) + 1
        into_consensus.store_values(result["mean"] if result["centre"] is None
                                    else result["centre"])
        into_replica.store_values(result["own"])
        evaluation = task.evaluate(consensus)
        own = task.evaluate(replica)
        fields = dict(obs.record)
        algo = fields.pop("algo", {})
        writer.write({"type": "step", "step": obs.step, "loss": finite_or_none(result["loss"]),
                      **{k: finite_or_none(v) for k, v in evaluation.items()},
                      **{f"rank0_{k}": finite_or_none(v) for k, v in own.items()},
                      "consensus_distance": finite_or_none(result["distance"]), **fields,
                      "events": len(result["events"]),
                      "consensus_steps": result["consensus_steps"],
                      "record_lag_s": result["record_lag_s"], "algo": algo})
        writer.last_eval = {k: finite_or_none(v) for k, v in evaluation.items()}
        return evaluation

    return write


def _checkpoint(cfg: TrainConfig, step: int, model: torch.nn.Module,
                optimizer: torch.optim.Optimizer, agg: Aggregator, group,
                writer: MetricsWriter | None, extra: dict[str, Any]) -> None:
    """Write ``OUT/checkpoints/step-<step>`` (collective over ``group``, the idle-bounded
    group: a slow worker is waited for, not timed out), then on rank 0 delete all but the
    newest ``keep`` and record what it cost."""
    began = time.perf_counter()
    root = Path(cfg.out) / CHECKPOINTS
    target = root / f"step-{step}"
    try:
        path = checkpoint.save(target, model, optimizer, agg, step, extra=extra,
                               config=cfg.fingerprint(), group=group)
    except (OSError, RuntimeError) as exc:
        error = storage_error(exc, target)
        if error is None:
            raise
        # this rank's partial file goes: it holds space on a full disk and never counted
        # (the checkpoint has no manifest); the previous checkpoint is untouched
        rank = dist.get_rank() if dist.is_initialized() else 0
        for name in [f"rank{rank}.pt.tmp", *(["manifest.json.tmp"] if rank == 0 else [])]:
            try:
                (target / name).unlink(missing_ok=True)
            except OSError:
                pass
        raise error from None
    if writer is not None:
        checkpoint.prune(root, cfg.keep)
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        writer.write({"type": "checkpoint", "step": step, "path": str(path),
                      "seconds": time.perf_counter() - began, "bytes": size})


def _agree(flag: bool, group) -> bool:
    """Whether any rank raised ``flag`` (a MAX allreduce on ``group``, also a barrier)."""
    if group is None:
        return flag
    t = torch.tensor([float(flag)])  # host: the idle group is gloo, on the CPU
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t[0] > 0)


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
    flag = comm.all_reduce_(torch.tensor([float(bad)], device=params[0].device), op="max")
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
