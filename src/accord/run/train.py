"""A worker of the local launcher or torchrun: :func:`run_worker` joins the process group,
decides what a ``--resume`` continues, opens rank 0's ``metrics.jsonl``, runs the one loop
(:mod:`accord.run.loop`, recorded by :mod:`accord.run.records`) and checkpoints it, and leaves
the evidence of a failure (:mod:`accord.run.failures`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .. import algorithms, checkpoint
from .._imports import code_source
from ..comm import Communicator, compress_payloads, emulate_network, payload_compressor
from ..core import Aggregator
from ..observe import ConsensusProbe, divergence, finite_or_none, state_tensors
from ..tasks import task_source
from .config import ConfigError, TrainConfig
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
from .loop import (
    RNG_KEY,
    Batches,
    Faults,
    Hook,
    Liveness,
    Step,
    Steps,
    Tally,
    Worker,
    build_worker,
    make_optimizer,
    nonfinite_grads,
    run_loop,
    seed_worker,
)
from .metrics import MetricsWriter, run_environment, scan_metrics
from .records import ObservedRecords, Records, idle_group
from .validation import emulated_network, payload_compression

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # under the run directory
#: the summary statuses of a run that ended by itself: a resume finds nothing to do
ENDED = ("ok", "diverged")

# names other modules (and older scripts) import from here
__all__ = ["RNG_KEY", "ConsensusProbe", "make_optimizer", "nonfinite_grads", "resume_plan",
           "run_worker", "seed_worker", "state_tensors"]
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


def _code_sources(cfg: TrainConfig) -> dict[str, Any]:
    """The user files the run read, for the header: a user task's spec, file and SHA-256
    (``task_source``; nothing for a built-in task), each ``--plugin``'s (``plugin_sources``;
    nothing without one) and the ``--network-profile`` file's (``network_profile_source``):
    bench reruns a run whose file was edited since."""
    out: dict[str, Any] = {}
    source = task_source(cfg.task)
    if source is not None:
        out["task_source"] = source
    if cfg.plugins:
        out["plugin_sources"] = [algorithms.plugin_source(spec) for spec in cfg.plugins]
    if cfg.network_profile is not None:
        out["network_profile_source"] = code_source(cfg.network_profile, cfg.network_profile)
    return out


def _attempts(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The earlier attempts of a run (first step, wall-clock start of the training loop)
    from their ``start`` records."""
    return [{"from_step": int(r.get("step", 0)), "started": float(r["time"])}
            for r in records if r.get("type") == "start"
            and isinstance(r.get("time"), int | float) and isinstance(r.get("step"), int)]


def run_worker(cfg: TrainConfig) -> dict[str, Any] | None:
    """The per-process entry: join the process group from the torchrun environment, train,
    and (on rank 0) write ``metrics.jsonl``. Returns the summary record on rank 0.

    The run's status (the summary's ``status``): ``ok``; ``diverged`` (the replicas'
    parameters or the consensus model's evaluation became non-finite: every rank stops at
    that record, ``diverged_step`` says where); ``failed`` (an exception; rank 0 names the
    rank that failed first, see :mod:`accord.run.failures`); ``interrupted`` (SIGINT or
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
        # every Communicator of this process; none on real links (the testbed shapes them)
        emulate_network(None if cfg.links == "real" else emulated_network(cfg))
        compress_payloads(payload_compression(cfg))
        if rank == 0:
            tb = out / "tensorboard" if cfg.tensorboard else None
            now = time.time()
            if resume is None and not continued:
                writer = MetricsWriter(out / "metrics.jsonl", tb)
                writer.write({"type": "header", "config": cfg.to_json(), "algorithm": cfg.algo,
                              "hyperparameters": cfg.hyperparameters, "world_size": world,
                              "time": now, **_code_sources(cfg), **run_environment()})
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
        # the failure is recorded whole: torchrun's SIGTERM to the survivors of a crashed
        # peer must not cut the summary (or the lock's release after it) short
        _ignore_sigterm(previous)
        _report(exc, cfg, rank, world, logs, heartbeat, writer)
        raise
    finally:
        _ignore_sigterm(previous)
        emulate_network(None)
        compress_payloads(None)
        if heartbeat is not None:
            heartbeat.close()
        if writer is not None:
            writer.close()
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


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


def _ignore_sigterm(previous) -> None:
    """While a run winds down, SIGTERM waits: the records are closed first."""
    if previous is not None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _train(cfg: TrainConfig, rank: int, world: int, writer: MetricsWriter | None,
           heartbeat: Heartbeat, device: torch.device, resume: Path | None = None):
    """Set up this rank's objects and run the one loop (:func:`accord.run.loop.run_loop`);
    returns the summary on rank 0."""
    w = build_worker(cfg, rank, world, device, Path(cfg.out) / "logs", resume)
    extra = w.extra or {}
    if payload_compressor() is not None and extra.get("compressor") is not None:
        payload_compressor().load_state_dict(extra["compressor"])
    batches = Batches(w.task.train_stream(rank, cfg.resolved_batch_size()), cfg.accum_steps)
    batches.skip_to(w.first)  # the data stream continues where it stopped
    # for logging only: not the algorithm's traffic, not counted, no emulated network
    loop_comm = Communicator(emulated=False)
    idle = idle_group(world, cfg.idle_timeout)
    bar = None
    if rank == 0 and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=w.first, desc=f"{cfg.algo}/{cfg.task} x{world}",
                   unit="step", dynamic_ncols=True)
    running = extra.get("running")
    tally = Tally(None if running is None else running.to(device), w.first,
                  extra.get("events", {}), bar, float(extra.get("recorded", 0.0)))
    # an algorithm that avoids waits is observed without a global wait (accord.observe)
    observed = w.agg.avoids_waits and world > 1
    recorder = None
    try:
        recorder = (ObservedRecords(cfg, w, tally, writer, heartbeat, loop_comm, idle, world,
                                    device, rank) if observed else
                    Records(cfg, w, tally, writer, heartbeat, loop_comm, idle, world, device))
        step = Step(cfg, w, batches, heartbeat, loop_comm, device, rank)
        tally.start_clock(float(extra.get("elapsed", 0.0)))  # a resumed run's continues
        if writer is not None and extra.get("last_eval") is not None:
            writer.last_eval = dict(extra["last_eval"])
        if writer is not None:  # the run's wall time counts from its first attempt's start
            writer.attempts.append({"from_step": w.first, "started": time.time()})
            writer.write({"type": "start", "step": w.first,
                          "time": writer.attempts[-1]["started"]})
        hooks = [Liveness(heartbeat), Faults(w.injector), tally,
                 Checkpointer(cfg, w, tally, recorder, heartbeat, idle, writer)]
        return run_loop(Steps(w.first, cfg.steps), step, recorder, hooks)
    finally:
        if bar is not None:
            bar.close()
        if isinstance(recorder, ObservedRecords):
            recorder.observer.close(abort=sys.exc_info()[0] is not None)
        w.agg.close()


class Checkpointer(Hook):
    """Every ``checkpoint_every`` committed steps: the records up to it first, then
    ``OUT/checkpoints/step-<n>`` (:func:`_checkpoint`)."""

    def __init__(self, cfg: TrainConfig, worker: Worker, tally: Tally, recorder: Records,
                 heartbeat: Heartbeat, idle, writer: MetricsWriter | None) -> None:
        self.cfg, self.w, self.tally, self.recorder = cfg, worker, tally, recorder
        self.heartbeat, self.idle, self.writer = heartbeat, idle, writer

    def after_commit(self, step: int) -> None:
        cfg, w, writer = self.cfg, self.w, self.writer
        if not (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0):
            return
        self.heartbeat.beat(step, "checkpoint")
        self.recorder.flush()  # an observed run's records up to the checkpoint first
        _checkpoint(cfg, step + 1, w.model, w.optimizer, w.agg, self.idle, writer, {
            "events": self.tally.events, "elapsed": time.perf_counter() - self.tally.start,
            "recorded": self.tally.recorded,
            "running": self.tally.running,
            "last_eval": writer.last_eval if writer is not None else None,
            "compressor": (payload_compressor().state_dict()
                           if payload_compressor() is not None else None)})


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
