"""``accord train --fault-tolerant``: the launcher and the worker loop on
:mod:`accord.ft.membership`.

Launcher (:func:`ft_launch`): starts the torchft Lighthouse in-process; starts N workers
(``ACCORD_FT_REPLICA=i``, each its own replica group in a gloo world of one); holds them
at a start barrier so the first quorum has every worker; watches them (a dead worker does
not stop the others; ``--respawn`` replaces it; a worker silent past ``--idle-timeout`` is
killed as hung; every wait is bounded); and writes ``metrics.jsonl`` from the workers'
``logs/ft<i>.jsonl`` (step records, membership timeline, discarded steps, summary).

Worker (:func:`ft_worker_main`): the one loop of every launch mode
(:func:`accord.run.loop.run_loop`) with the torchft membership of :mod:`accord.ft.loop`;
a late joiner skips its data stream to the live step; divergence is agreed inside the
step. Signals, exit codes, the summary and the lock are the local launcher's. In full:
docs/design/fault-tolerant-runs.md."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..run.config import ConfigError, TrainConfig
from ..run.failures import StorageError
from ..run.launch import CLEAN_EXITS, LAUNCHED, _die_with_parent, _stop
from ..run.rundir import RunLock
from ..run.validation import ft_timeouts
from .loop import ANOTHER

REPLICA_ENV = "ACCORD_FT_REPLICA"
LIGHTHOUSE_ENV = "ACCORD_FT_LIGHTHOUSE"
JOINER_ENV = "ACCORD_FT_JOINER"  # a respawned worker: no start barrier, joins a live run
START_TIMEOUT_S = 300.0  # the start barrier's bound (also bounded by idle_timeout)
#: once a worker has finished every step, the others have this long to finish theirs;
#: then the launcher stops them (a quorum timeout and more: their last steps' quorums)
END_GRACE_S = 15.0
#: a worker's exit status when the run diverged (as the local launcher's workers)
DIVERGED_EXIT = 3


def _worker_file(logs: Path, i: int) -> Path:
    return logs / f"ft{i}.jsonl"


# -- the launcher --------------------------------------------------------------------------

def ft_worker_env(i: int, lighthouse: str, joiner: bool) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
                "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE",
                "TORCHFT_TIMEOUT_SEC", "TORCHFT_QUORUM_TIMEOUT_SEC",
                "TORCHFT_CONNECT_TIMEOUT_SEC", "TORCHFT_LIGHTHOUSE"):
        env.pop(var, None)
    env.update({REPLICA_ENV: str(i), LIGHTHOUSE_ENV: lighthouse, LAUNCHED: "1",
                JOINER_ENV: "1" if joiner else "0"})
    env.setdefault("RUST_LOG", "warn")
    env.setdefault("OMP_NUM_THREADS", "1")
    src = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def ft_launch(cfg: TrainConfig) -> Any:
    """Run ``cfg`` fault-tolerant on ``cfg.workers`` local processes (module docstring).

    Ends as the local launcher does (:func:`accord.run.launch.launch`): it holds
    ``OUT/.accord.lock`` while the run lives; SIGINT or SIGTERM stop every worker, the
    summary says ``interrupted`` and the exit status is 130; a diverged run's summary says
    ``diverged`` (the caller exits 3)."""
    from ..run.launch import LaunchResult, _terminated

    out = Path(cfg.out)
    lock = RunLock(out)
    try:
        lock.acquire()
    except ConfigError as e:
        return LaunchResult(2, None, str(e))
    main_thread = threading.current_thread() is threading.main_thread()
    # SIGTERM (a scheduler, the bench stopping a run) ends the run like Ctrl-C
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    try:
        return _ft_run(cfg, out)
    except KeyboardInterrupt:  # before any worker started: nothing to record
        return LaunchResult(130, None, "interrupted")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        lock.release()


def _ft_run(cfg: TrainConfig, out: Path) -> Any:
    """The body of :func:`ft_launch`, with the run directory locked."""
    from ..run.launch import LaunchResult

    os.environ.setdefault("RUST_LOG", "warn")  # before torchft starts its logger
    from ..run.metrics import run_environment
    from . import membership as ft

    logs = out / "logs"
    timeouts = ft_timeouts(cfg)
    logs.mkdir(parents=True, exist_ok=True)
    for pattern in ("ft*.jsonl", "ft-ready-*", "ft-go", "rank*.heartbeat", "rank*.error",
                    "rank*.traceback"):
        for stale in logs.glob(pattern):
            stale.unlink()
    mine = replicas_of(cfg)
    server = None
    if cfg.lighthouse is None:
        server, address = ft.start_lighthouse(
            cfg.min_workers, join_timeout_ms=int(timeouts.join * 1000),
            quorum_tick_ms=int(timeouts.quorum_tick * 1000),
            heartbeat_timeout_ms=int(timeouts.heartbeat * 1000))
    else:
        address = cfg.lighthouse
    header = {"type": "header", "config": cfg.to_json(), "algorithm": cfg.algo,
              "hyperparameters": cfg.hyperparameters, "world_size": cfg.workers,
              "fault_tolerant": {"min_workers": cfg.min_workers, "respawn": cfg.respawn,
                                 "timeouts": timeouts.__dict__, "replicas": mine,
                                 "lighthouse": cfg.lighthouse}, **run_environment()}
    cmd = [sys.executable, "-m", "accord", "train", *cfg.to_argv()]
    procs: dict[int, subprocess.Popen] = {}
    files: list[Any] = []
    launcher_events: list[dict[str, Any]] = []
    start = time.time()
    interrupted = False
    bar = None

    def spawn(i: int, joiner: bool) -> None:
        # every worker logs to its file: torchft's own logging is verbose
        f = (logs / f"rank{i}.log").open("ab")
        files.append(f)
        stdout, stderr = f, subprocess.STDOUT
        procs[i] = subprocess.Popen(cmd, env=ft_worker_env(i, address, joiner),
                                    stdout=stdout, stderr=stderr,
                                    preexec_fn=_die_with_parent)

    try:
        for i in mine:
            spawn(i, joiner=False)
        _start_barrier(procs, logs, min(START_TIMEOUT_S, cfg.idle_timeout))
        respawns = 0
        killed: set[subprocess.Popen] = set()  # hung workers already sent SIGKILL
        ended: set[subprocess.Popen] = set()  # still running after the run ended: stopped
        ended_at: float | None = None
        if cfg.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, desc=f"{cfg.algo}/{cfg.task} x{len(mine)} (ft)",
                       unit="step", dynamic_ncols=True)
        shown = 0.0
        while True:
            now = time.time()
            if bar is not None and now - shown > 0.5:  # the furthest live worker's step
                shown = now
                bar.n = max([0, *(s for s in (_last_step(logs, i) for i in procs)
                                  if s is not None)])
                bar.set_postfix_str(f"workers {len(procs)}", refresh=False)
                bar.refresh()
            finished = any(_finished(logs, i, cfg.steps) for i in mine)
            if finished and ended_at is None:
                ended_at = time.monotonic()
            if ended_at is not None and time.monotonic() - ended_at > END_GRACE_S:
                # the run has ended: a worker still here cannot finish it (e.g. a
                # replacement that started too late waits for a quorum that cannot form)
                for i, p in procs.items():
                    if p not in ended and p.poll() is None:
                        ended.add(p)
                        p.terminate()
                        launcher_events.append({"type": "event", "kind": "stopped",
                                                "rank": i, "time": now,
                                                "step": _last_step(logs, i),
                                                "reason": "the run had ended"})
            for i, p in list(procs.items()):
                code = p.poll()
                if code is None:
                    if p.returncode is None and p not in killed and \
                            _hung(logs, i, timeouts.step_deadline):
                        killed.add(p)
                        p.kill()  # reaped at a later poll
                        launcher_events.append({"type": "event", "kind": "hung", "rank": i,
                                                "time": now})
                    continue
                del procs[i]
                if code in CLEAN_EXITS or p in ended:  # done, or stopped at divergence
                    continue
                launcher_events.append({"type": "event", "kind": "worker_exit", "rank": i,
                                        "returncode": code, "time": now,
                                        "step": _last_step(logs, i)})
                if respawns < cfg.respawn and not finished:
                    respawns += 1
                    spawn(i, joiner=True)
                    launcher_events.append({"type": "event", "kind": "respawn", "rank": i,
                                            "respawn": respawns, "time": time.time(),
                                            "step": _last_step(logs, i)})
            if not procs:
                break
            if cfg.lighthouse is None and not finished and len(procs) < cfg.min_workers:
                # no quorum can form again (every worker is this launcher's and no
                # replacement is left): end the run now, not after the quorum patience
                launcher_events.append({"type": "event", "kind": "too_few_workers",
                                        "alive": sorted(procs), "time": time.time()})
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if bar is not None:
            bar.close()
        _stop(list(procs.values()))
        for f in files:
            f.close()
        if server is not None:
            server.shutdown()
        at = [s for s in (_last_step(logs, i) for i in mine) if s is not None]
        try:
            summary = _write_metrics(out, [logs], cfg, header, launcher_events,
                                     time.time() - start, interrupted,
                                     interrupted_step=max(at, default=None))
        except StorageError as e:  # (a full disk): the workers' own files stay in logs/
            return LaunchResult(130 if interrupted else 1, None,
                                f"{e} (no summary; the workers' records: {logs}/ft<i>.jsonl)")
    if interrupted:
        return LaunchResult(130, None, "interrupted")
    if summary["status"] not in ("ok", "diverged"):  # diverged: the caller says so, exit 3
        return LaunchResult(1, None, summary.get("error", "no worker finished the run"))
    return LaunchResult(0)


def _start_barrier(procs: dict[int, subprocess.Popen], logs: Path, timeout: float) -> None:
    """Release the workers together once every live one is ready (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        waiting = [i for i, p in procs.items()
                   if p.poll() is None and not (logs / f"ft-ready-{i}").exists()]
        if not waiting:
            break
        time.sleep(0.05)
    (logs / "ft-go").touch()


def _records(logs: Path | list[Path], i: int) -> list[dict[str, Any]]:
    """Worker ``i``'s records (from every directory of ``logs`` that has its file)."""
    if isinstance(logs, list):
        return [r for d in logs for r in _records(d, i)]
    try:
        lines = _worker_file(logs, i).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill
    return out


def _finished(logs: Path, i: int, steps: int) -> bool:
    """Worker ``i`` ended the run: every step done, or it stopped at divergence (every
    participant stops at the same record)."""
    return any(r.get("type") == "done" and (r.get("steps", 0) >= steps
                                            or r.get("diverged_step") is not None)
               for r in _records(logs, i))


def _last_step(logs: Path, i: int) -> int | None:
    try:
        return int((logs / f"rank{i}.heartbeat").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        return None


def _hung(logs: Path, i: int, deadline: float) -> bool:
    try:
        age = time.time() - (logs / f"rank{i}.heartbeat").stat().st_mtime
    except OSError:
        return False
    return age > deadline


def _write_metrics(out: Path, logs: list[Path], cfg: TrainConfig, header: dict[str, Any],
                   launcher_events: list[dict[str, Any]], elapsed: float,
                   interrupted: bool, interrupted_step: int | None = None) -> dict[str, Any]:
    """metrics.jsonl from the workers' files in the ``logs`` directories (written once,
    at the end of the run; ``elapsed``: the run's wall time)."""
    steps: dict[int, dict[str, Any]] = {}
    memberships: list[dict[str, Any]] = []
    discarded: list[dict[str, Any]] = []
    dones: list[dict[str, Any]] = []
    for i in range(cfg.workers):
        for r in _records(logs, i):
            kind = r.get("type")
            if kind == "step":
                steps[r["step"]] = r
            elif kind == "event" and r.get("kind") == "membership":
                memberships.append(r)
            elif kind == "event" and r.get("kind") == "discarded":
                discarded.append(r)
            elif kind == "event":  # the fault injector's (delay, nan, ...)
                launcher_events.append(r)
            elif kind == "done":
                dones.append(r)
    # one membership event per change of participants, in step order (each worker saw
    # the change; a joiner's first event says "all joined": only the timeline counts)
    timeline: list[dict[str, Any]] = []
    current: list[int] | None = None
    for r in sorted(memberships, key=lambda r: (r.get("time", 0.0), r["step"])):
        if r["participants"] != current:
            before = current or []
            timeline.append({"type": "event", "kind": "membership", "step": r["step"],
                             "participants": r["participants"],
                             "joined": [w for w in r["participants"] if w not in before],
                             "left": [w for w in before if w not in r["participants"]],
                             "time": r.get("time")})
            current = r["participants"]
    events = timeline + sorted(discarded, key=lambda r: (r["step"], r["rank"]))
    records = sorted([*steps.values(), *events, *launcher_events],
                     key=lambda r: (r.get("step") if r.get("step") is not None else 0,
                                    0 if r["type"] == "event" else 1, r.get("time") or 0.0))
    counts: dict[str, int] = {}
    for r in events + launcher_events:
        counts[r["kind"]] = counts.get(r["kind"], 0) + 1
    complete = [d for d in dones if d["steps"] >= cfg.steps]
    final = max(complete or dones, key=lambda d: (d["steps"], d.get("writer", False)),
                default=None)
    last_eval = {k: v for k, v in (list(steps.values())[-1] if steps else {}).items()
                 if k.startswith("eval_")}
    if steps:
        last_eval = {k: v for k, v in steps[max(steps)].items() if k.startswith("eval_")}
    # the replicas that stopped at divergence; the most specific reason first (quorum rank
    # 0 evaluated the consensus model, the others know only the consensus distance)
    diverged = sorted((d for d in dones if d.get("diverged_step") is not None),
                      key=lambda d: (d["diverged_step"], ANOTHER in d.get("diverged_reason", "")))
    summary: dict[str, Any] = {"type": "summary", "status": "ok" if complete else "failed"}
    if interrupted:
        summary["status"] = "interrupted"
        summary["error"] = "interrupted (SIGINT or SIGTERM)"
        summary["interrupted_step"] = interrupted_step
    elif diverged:
        summary.update({"status": "diverged", "diverged_step": diverged[0]["diverged_step"],
                        "diverged_reason": diverged[0].get("diverged_reason")})
    elif not complete:
        summary["error"] = (f"no worker finished the {cfg.steps} steps (fewer than "
                            f"--min-workers {cfg.min_workers} left, or every worker died)")
        if any(r.get("kind") == "too_few_workers" for r in launcher_events):
            summary["error"] += "; stopped by the launcher: no quorum could form again"

    stats = (final or {}).get("comm", {})
    done_steps = (final or {}).get("steps", max(steps, default=0))  # else: last record
    summary.update({
        "steps": done_steps, "time_s": elapsed,
        "steps_per_s": done_steps / elapsed if elapsed > 0 else 0.0,
        "comm_bytes": (final or {}).get("comm_bytes", 0),
        "comm_calls": (final or {}).get("comm_calls", 0),
        "comm_s": (final or {}).get("comm_s", 0.0), "comm": stats,
        "discarded_steps": len({r["step"] for r in discarded}),
        "discarded": {str(d["rank"]): d["discarded"] for d in dones},
        "participants": current or [],
        "finished_workers": sorted(d["rank"] for d in complete),
        "respawns": counts.get("respawn", 0),
        "events": counts, **last_eval})
    path = out / "metrics.jsonl"
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in [header, *records, summary]))
    except OSError as e:  # whole or not at all: an earlier metrics.jsonl stays as it was
        tmp.unlink(missing_ok=True)
        raise StorageError(path, e) from None
    os.replace(tmp, path)
    return summary


def ft_host(cfg: TrainConfig) -> str:
    """The name other workers reach this host's workers at: ``--ft-host``, else
    ``localhost`` with the launcher's own Lighthouse (one host), else this host's name."""
    import socket

    if cfg.ft_host:
        return cfg.ft_host
    return "localhost" if cfg.lighthouse is None else socket.gethostname()


def replicas_of(cfg: TrainConfig) -> list[int]:
    """The worker indices this launcher starts (``--replicas``; default all)."""
    from ..run.validation import parse_replicas

    return parse_replicas(cfg.replicas, cfg.workers) if cfg.replicas else list(range(cfg.workers))


# -- several hosts ----------------------------------------------------------------------------

def serve_lighthouse(min_workers: int, bind: str) -> int:
    """``accord ft-lighthouse``: a Lighthouse with the timeouts of ``accord train
    --fault-tolerant`` until SIGINT or SIGTERM; prints its address."""
    import importlib.util

    from ..run.validation import FT_HEARTBEAT_S, FT_QUORUM_S

    if importlib.util.find_spec("torchft") is None:
        raise ConfigError("ft-lighthouse needs torchft: pip install 'accord[ft]'")
    if isinstance(min_workers, bool) or not isinstance(min_workers, int) or min_workers < 1:
        raise ConfigError(f"--min-workers: got {min_workers!r}, allowed: an integer >= 1")
    os.environ.setdefault("RUST_LOG", "warn")
    from . import membership as ft

    timeouts = ft.FTTimeouts(heartbeat=FT_HEARTBEAT_S, quorum=FT_QUORUM_S)
    try:
        server, address = ft.start_lighthouse(
            min_workers, join_timeout_ms=int(timeouts.join * 1000),
            quorum_tick_ms=int(timeouts.quorum_tick * 1000),
            heartbeat_timeout_ms=int(timeouts.heartbeat * 1000), bind=bind)
    except Exception as exc:  # noqa: BLE001 - torchft's bind error, in one line
        raise ConfigError(f"--bind {bind!r}: {str(exc).splitlines()[0]}") from None
    print(f"lighthouse: {address} (min workers {min_workers}); on every host: accord train "
          f"--fault-tolerant --lighthouse {address} --replicas LIST ...", flush=True)
    stop = []

    def handler(signum, frame):
        stop.append(signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    try:
        while not stop:
            time.sleep(0.2)
    finally:
        server.shutdown()
    return 0


def merge_hosts(out: Path, hosts: list[Path]) -> dict[str, Any]:
    """``accord ft-merge``: one metrics.jsonl in ``out`` from the run directories of the
    hosts of one fault-tolerant run (their ``logs/ft<i>.jsonl`` and launcher events);
    returns the summary. ConfigError (one line) for a directory that is not such a run,
    or runs that differ in more than ``--replicas``, ``--ft-host`` and ``--out``."""
    from ..run.metrics import read_metrics

    headers, events, elapsed = [], [], 0.0
    for d in hosts:
        path = d / "metrics.jsonl"
        if not path.is_file():
            raise ConfigError(f"{str(d)!r}: no metrics.jsonl (not a finished host of a "
                              "fault-tolerant run)")
        recs = read_metrics(path)
        if not recs or recs[0].get("type") != "header" or \
                not recs[0].get("config", {}).get("fault_tolerant"):
            raise ConfigError(f"{str(path)!r}: not the record of a fault-tolerant run")
        headers.append(recs[0])
        events += [r for r in recs if r.get("type") == "event"
                   and r.get("kind") in ("worker_exit", "respawn", "hung")]
        summary = recs[-1] if recs[-1].get("type") == "summary" else {}
        elapsed = max(elapsed, float(summary.get("time_s") or 0.0))
    ignore = ("replicas", "ft_host", "out")
    first = {k: v for k, v in headers[0]["config"].items() if k not in ignore}
    for d, h in zip(hosts[1:], headers[1:], strict=True):
        other = {k: v for k, v in h["config"].items() if k not in ignore}
        diff = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
        if diff:
            raise ConfigError(f"{str(d)!r} is another run: {diff[0]} {other.get(diff[0])!r} "
                              f"vs {first.get(diff[0])!r}")
    cfg = TrainConfig(**{k: v for k, v in headers[0]["config"].items()
                         if k in TrainConfig.__dataclass_fields__})
    cfg.out, cfg.replicas = str(out), None
    header = {**headers[0], "config": cfg.to_json(),
              "merged_from": [str(d) for d in hosts]}
    header["fault_tolerant"] = {**header.get("fault_tolerant", {}),
                                "replicas": list(range(cfg.workers))}
    out.mkdir(parents=True, exist_ok=True)
    return _write_metrics(out, [d / "logs" for d in hosts], cfg, header, events, elapsed,
                          interrupted=False)


# -- the worker ------------------------------------------------------------------------------

def ft_worker_main(cfg: TrainConfig) -> int:
    """One worker of a fault-tolerant run: its exit status (0: done)."""
    import traceback

    from ..run.failures import one_line

    replica = int(os.environ[REPLICA_ENV])
    logs = Path(cfg.out) / "logs"
    try:
        diverged = _ft_worker(cfg, replica, os.environ[LIGHTHOUSE_ENV],
                              os.environ.get(JOINER_ENV) == "1", logs)
        code = DIVERGED_EXIT if diverged else 0
    except KeyboardInterrupt:
        code = 130
    except BaseException as exc:  # noqa: BLE001 - one line here, the traceback on disk
        for name, text in ((f"rank{replica}.traceback", traceback.format_exc()),
                           (f"rank{replica}.error", one_line(exc) + "\n")):
            try:  # evidence only: on a full disk it cannot be written
                (logs / name).write_text(text)
            except OSError:
                (logs / name).unlink(missing_ok=True)
        print(f"accord train: worker {replica}: {one_line(exc)}", file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def _ft_worker(cfg: TrainConfig, replica: int, lighthouse: str, joiner: bool,
               logs: Path) -> bool:
    """Set up replica ``replica``'s objects and run the one loop (:func:`accord.run.loop.run_loop`)
    with its torchft membership until the run ends; True if it diverged."""
    import torch
    import torch.distributed as dist

    from ..comm import CommStats
    from ..run.failures import Heartbeat
    from ..run.loop import Batches, Faults, Liveness, Step, Tally, build_worker, run_loop
    from . import membership as ft
    from .loop import FTMembership, FTRecords

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    torch.set_num_threads(1)
    logs.mkdir(parents=True, exist_ok=True)
    outf = _worker_file(logs, replica).open("a", buffering=1)

    def emit(record: dict[str, Any]) -> None:
        try:
            outf.write(json.dumps(record) + "\n")
        except OSError as e:
            raise StorageError(_worker_file(logs, replica), e) from None

    heartbeat = Heartbeat(logs, replica)
    heartbeat.beat(0, "start")
    # a world of one: the aggregators are built as usual; FTCommunicator replaces it
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    device = torch.device("cpu")  # fault-tolerant runs are CPU only (checked)
    w = build_worker(cfg, replica, cfg.workers, device, logs)
    tally = Tally()

    def get_state() -> dict[str, Any]:
        return {"model": w.model.state_dict(), "opt": w.optimizer.state_dict(),
                "agg": w.agg.state_dict(), "running": tally.running}

    def set_state(state: dict[str, Any]) -> None:
        w.model.load_state_dict(state["model"])
        w.optimizer.load_state_dict(state["opt"])
        w.agg.load_state_dict(state["agg"])
        tally.running = state["running"]

    worker = ft.FTWorker(replica, lighthouse, cfg.min_workers, get_state, set_state,
                         timeouts=ft_timeouts(cfg), stats=CommStats(), host=ft_host(cfg),
                         on_quorum=lambda comm: ft.refresh(w.agg, comm, cfg.workers),
                         on_wait=lambda: heartbeat.beat(worker.step, "quorum"))
    book = ft.FTCommunicator(worker.manager, worker.pg, CommStats())  # the loop's own
    batches = Batches(w.task.train_stream(replica, cfg.resolved_batch_size()), cfg.accum_steps)
    try:
        if not joiner:  # the start barrier: the first quorum has every launched worker
            (logs / f"ft-ready-{replica}").touch()
            deadline = time.monotonic() + min(START_TIMEOUT_S, cfg.idle_timeout)
            while not (logs / "ft-go").exists():
                if time.monotonic() > deadline:
                    raise TimeoutError("the launcher's start barrier did not open")
                time.sleep(0.02)
        tally.start_clock()
        membership = FTMembership(worker, w, emit, heartbeat, cfg.steps, replica, joiner)
        recorder = FTRecords(cfg, w, tally, membership, book, emit, heartbeat, replica)
        step = Step(cfg, w, batches, heartbeat, book, device, replica)
        return run_loop(membership, step, recorder, [Liveness(heartbeat), Faults(w.injector),
                                                     tally])
    finally:
        try:
            outf.close()
        except OSError:
            pass  # a line a full disk refused: already raised as a StorageError
        heartbeat.close()
        try:
            worker.shutdown()
        finally:
            w.agg.close()
