"""The background exchange engine: group rounds that never wait for a slow worker's compute.

Wait-avoiding WAGMA and asynchronous EASGD share it. Each worker runs a *runner* thread
that executes numbered rounds, in order, on process groups of its own, and a *listener*
thread that receives activation messages. Round ``k`` is a weighted mean, over a group
(the world or a WAGMA butterfly group), of the model each member last *deposited*::

    compute thread                        runner thread (rounds 0, 1, 2, ... in order)
    engine.note(healthy) every step       wait until target >= k      (never times out)
    engine.deposit(x, version)            activate k for round k's whole group
    engine.request(k)                     all-gather (version, progress, finite, rank)
    r = engine.wait(k)                    allreduce of w_own * deposit -> the algorithm

Contract:

* Activation: a rank's target is the highest round its compute requested or any peer
  started; a runner that starts round k activates it for its group. By induction on k,
  a runner that starts a round completes it given live peers, and no step waits for a
  compute thread (the argument in full: docs/design/exchange.md). The only wait for
  everyone's compute is the algorithm's blocking global step, after :meth:`ExchangeEngine.arrive`.
* Idle is not failure: waiting for activation never times out (messages go through the
  job's store); a started collective times out after ``timeout``; ``arrive`` is bounded
  by ``idle_timeout``.
* Weights: ``uniform`` (1/S) or ``dynamic``: ``finite_j * 2 ** (-(s_j / half_life) ** 2)``,
  s_j the steps since j's last fresh progress (a changed deposit after a healthy step),
  renormalised (all zero: the round keeps the local model).
* Devices and memory: rounds run on host copies over gloo; the engine holds two
  model-size buffers plus what the algorithm keeps per round (:meth:`ExchangeEngine.pop`).
* :meth:`ExchangeEngine.close` is local and leaves no thread behind; ``abort=True`` (or an
  exception in flight) stops without finishing rounds. A thread's failure is re-raised in
  the compute thread at its next call, naming the round."""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..comm import CommStats, Communicator

log = logging.getLogger(__name__)

#: columns gathered per member: version, progress (round), finite, global rank
META = 4
#: a wait with "no" timeout: the store and gloo need a finite duration
FOREVER = timedelta(days=365)
_STOP = b"stop"
#: engines created in this process; every rank creates them in the same order
_engine_ids = itertools.count()


@dataclass
class RoundResult:
    """What one round produced, identical on every member except ``own_*``.

    The tensors stay where the round ran (the parameters' device inline, host memory on the
    engine's runner); the list views (``ranks``, ``versions``, ...) read them back to the
    host only when asked, for metrics and bookkeeping, never on the step path."""

    round: int
    mean: torch.Tensor | None  # weighted sum of the deposits (0 when ``valid`` is False)
    meta: torch.Tensor  # (S, 4): version, progress, finite, global rank; rank-ascending rows
    weight: torch.Tensor  # (S,) float64: each member's weight (sum 1, or all 0)
    stale: torch.Tensor  # (S,) float64: steps since each member's last fresh progress
    valid: torch.Tensor  # 0-dim bool: some member has a nonzero weight
    own_index: int
    own_deposit: torch.Tensor | None  # the deposit this rank contributed
    own_version: int

    @property
    def ranks(self) -> list[int]:
        return [int(r) for r in self.meta[:, 3].tolist()]

    @property
    def versions(self) -> list[int]:
        return [int(v) for v in self.meta[:, 0].tolist()]

    @property
    def progress(self) -> list[int]:
        return [int(p) for p in self.meta[:, 1].tolist()]

    @property
    def finite(self) -> list[bool]:
        return [bool(f) for f in self.meta[:, 2].tolist()]

    @property
    def weights(self) -> list[float]:
        return self.weight.tolist()

    @property
    def staleness(self) -> list[float]:
        return self.stale.tolist()

    @property
    def own_weight(self) -> float:
        return float(self.weight[self.own_index])

    def state_dict(self) -> dict[str, Any]:
        """The light fields (what metrics read), for a checkpoint."""
        return {"round": self.round, "meta": self.meta.clone(), "weight": self.weight.clone(),
                "stale": self.stale.clone(), "valid": self.valid.clone(),
                "own_index": self.own_index, "own_version": self.own_version}

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None) -> RoundResult | None:
        if state is None:
            return None
        return cls(int(state["round"]), None, state["meta"], state["weight"], state["stale"],
                   state["valid"], int(state["own_index"]), None, int(state["own_version"]))

    def light(self) -> RoundResult:
        """The same record without its model-size tensors (for metrics and tests)."""
        return RoundResult(self.round, None, self.meta, self.weight, self.stale, self.valid,
                           self.own_index, None, self.own_version)


class Weighting:
    """Weights of a group's contributions, ``"uniform"`` or ``"dynamic"`` (see the module
    docstring). Stateless: every member computes the same weights from the gathered meta,
    with tensor operations on the meta's device (no host read). ``steps_per_round``
    converts staleness in rounds to steps (EASGD: its period)."""

    def __init__(self, mode: str, half_life: float, steps_per_round: float = 1.0) -> None:
        if mode not in ("uniform", "dynamic"):
            raise ValueError(f"weighting: got {mode!r}, allowed: 'uniform', 'dynamic'")
        if not half_life > 0:
            raise ValueError(f"half_life: got {half_life!r}, allowed: a number > 0")
        self.mode = mode
        self.half_life = float(half_life)
        self.steps_per_round = float(steps_per_round)

    def __call__(self, meta: torch.Tensor,
                 round_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``meta`` rows (version, progress, finite, rank) -> (weights, staleness in steps)."""
        stale = (round_index - meta[:, 1]).clamp(min=0) * self.steps_per_round
        if self.mode == "uniform":
            return torch.full_like(stale, 1.0 / stale.numel()), stale
        raw = meta[:, 2] * torch.exp2(-(stale / self.half_life) ** 2)
        total = raw.sum()
        return raw / torch.where(total > 0, total, torch.ones_like(total)), stale


class Progress:
    """Fresh-progress bookkeeping of one worker (see the module docstring): ``note`` every
    step's health, ``observe`` the model contributed to round ``k``; returns the round of
    the last fresh progress, as a 0-dim tensor on the model's device (no host read).
    ``track=False`` (uniform weighting) skips the comparison and calls every contribution
    fresh."""

    def __init__(self, like: torch.Tensor, track: bool) -> None:
        self.previous = like.detach().clone() if track else None
        self.round = torch.zeros((), dtype=torch.float64, device=like.device)
        self._healthy = False

    def note(self, healthy: bool) -> None:
        self._healthy = self._healthy or bool(healthy)

    def state_dict(self) -> dict[str, Any]:
        return {"previous": None if self.previous is None else self.previous.clone(),
                "round": self.round.clone(), "healthy": self._healthy}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.previous is not None and state.get("previous") is not None:
            self.previous.copy_(state["previous"])
        self.round.copy_(state["round"])
        self._healthy = bool(state["healthy"])

    def observe(self, x: torch.Tensor, k: int) -> torch.Tensor:
        if self.previous is None:
            self.round.fill_(k)
        else:
            if self._healthy:
                changed = (x != self.previous).any()
                self.round.copy_(torch.where(changed, torch.full_like(self.round, k),
                                             self.round))
            self.previous.copy_(x)
        self._healthy = False
        return self.round


@torch.no_grad()
def group_round(
    comm: Communicator | None,
    deposit: torch.Tensor,
    version: int,
    progress: int | torch.Tensor,
    global_rank: int,
    weighting: Weighting,
    round_index: int,
    trust: float = 1.0,
) -> RoundResult:
    """One weighted-mean round over ``comm``'s group (collective on that group): gather the
    members' (version, progress, finite, rank), weigh them identically on every member,
    then allreduce the weighted deposits. Used inline by the synchronous variants and by
    the engine's runner; no value is read back to the host. ``comm=None``: a group of
    this rank alone (no communication). A group's rows come in group-rank order, which is
    ascending global rank (process groups sort their ranks). ``trust`` in [0, 1] scales
    this member's raw dynamic weight (the ``finite`` column carries it): a worker that
    joined a fault-tolerant run fades in with it."""
    if comm is None:
        comm = _SelfComm()
    mine = torch.tensor([float(version), 0.0, 0.0, float(global_rank)],
                        dtype=torch.float64, device=deposit.device)
    mine[1] = progress
    mine[2] = torch.isfinite(deposit).all()
    if trust != 1.0:
        mine[2] *= float(trust)
    meta = comm.all_gather(mine, kind="meta")
    weight, stale = weighting(meta, round_index)
    own = weight[comm.rank].to(deposit.dtype)
    # a zero-weight contribution is an explicit zero: 0 times a non-finite deposit is NaN
    mean = torch.where(own != 0, deposit * own, torch.zeros_like(deposit))
    comm.all_reduce_(mean, op="sum")
    return RoundResult(round=round_index, mean=mean, meta=meta, weight=weight, stale=stale,
                       valid=weight.sum() > 0, own_index=comm.rank, own_deposit=deposit,
                       own_version=version)


def subgroups(groups: Sequence[Sequence[int]], timeout: timedelta,
              backend: str | None = None) -> dict[tuple[int, ...], dist.ProcessGroup]:
    """A process group for every distinct group (collective: every rank must pass the same
    list), on ``backend`` (default: the world's). Groups of one rank get none."""
    out: dict[tuple[int, ...], dist.ProcessGroup] = {}
    for g in sorted({tuple(sorted(g)) for g in groups}):
        if len(g) < 2:
            continue
        out[g] = dist.new_group(list(g), timeout=timeout, backend=backend)
    return out


def _engine_store(engine_id: int) -> tuple[dist.Store, dist.Store]:
    """Two connections of the engine's own to the job's store (one for the listener's
    blocking pops, one for sends), with no timeout, under a prefix unique to the engine."""
    try:
        base = dist.distributed_c10d._get_default_store()
        conns = []
        for _ in range(2):
            conn = base.clone()
            conn.set_timeout(FOREVER)
            # a restarted job (torchrun --max-restarts) keeps its store: a fresh namespace
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            conns.append(dist.PrefixStore(f"accord/engine/{attempt}/{engine_id}/", conn))
        conns[1].queue_len("probe")
    except (AttributeError, RuntimeError, NotImplementedError) as exc:
        raise RuntimeError(
            "the background exchange engine needs a process group whose store supports "
            "clone() and queues (the TCPStore of torchrun, env:// or tcp:// "
            f"initialisation); this one does not ({type(exc).__name__}: {exc})") from None
    return conns[0], conns[1]


@dataclass
class _Stats:
    rounds: int = 0
    own_stale: int = 0  # rounds this rank took part in with a deposit older than the round
    stale_received: int = 0  # other members' contributions older than the round's time
    received: int = 0
    staleness_sum: float = 0.0
    activated_by_peer: int = 0  # rounds run before this rank's own compute asked for them
    messages: int = 0  # activation messages sent
    wait_s: float = 0.0  # compute-thread seconds spent waiting for round results


class ExchangeEngine:
    """Rounds of weighted group means on background threads (see the module docstring).

    ``group_of(k)`` gives the global ranks of this rank's group in round ``k`` (identical
    on every member). ``on_round(result)`` runs on the runner after each round and returns
    what :meth:`wait` / :meth:`pop` hand to the compute thread for that round (``None``:
    nothing is kept; without ``on_round`` the result itself is kept). ``weighting`` is
    used by the runner only. Everything shared is read under ``self.lock``.
    """

    def __init__(
        self,
        initial: torch.Tensor,
        group_of: Callable[[int], Sequence[int]],
        all_groups: Sequence[Sequence[int]],
        weighting: Weighting,
        stats: CommStats,
        *,
        timeout: float = 60.0,
        idle_timeout: float = 1800.0,
        on_round: Callable[[RoundResult], Any] | None = None,
        first_round: int = 0,
    ) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        if len(set().union(*map(set, all_groups))) != self.world_size:
            raise ValueError("the background engine spans the default process group: its "
                             "groups must cover every rank (use the synchronous variant on "
                             "a subgroup)")
        self.group_of = group_of
        self.weighting = weighting
        self.on_round = on_round
        self.timeout = float(timeout)
        # the runner's collectives are gloo on host copies: a thread of its own cannot share
        # a GPU stream safely, and gloo is what can wait for a peer without a kernel
        self.pgs = subgroups(all_groups, timedelta(seconds=timeout), backend="gloo")
        self.comms = {g: Communicator(pg, stats) for g, pg in self.pgs.items()}
        self._idle_pg = dist.new_group(list(range(self.world_size)),
                                       timeout=timedelta(seconds=idle_timeout), backend="gloo")
        self.stats = stats
        self._inbox, self._outbox = _engine_store(next(_engine_ids))
        self._send_lock = threading.Lock()
        self.lock = threading.Condition()
        # the first deposit exists before the threads start: a peer's round 0 may come at once;
        # deposits live in host memory (pinned for a GPU model), results come back there too
        self._deposit = initial.detach().to("cpu", copy=True)
        if initial.is_cuda:
            self._deposit = self._deposit.pin_memory()
        self._version = 0
        self._fresh = False  # a deposit of fresh progress since the runner's last snapshot
        self._healthy = True  # health of the steps since the last deposit (initial: fresh)
        self._started: dict[int, int] = {}  # peer -> highest round it told us it started
        self._results: dict[int, Any] = {}
        # a resumed run's engine starts at the checkpoint's round (rounds before it ran in
        # the checkpointed run); its deposit counts as fresh progress there, so dynamic
        # weighting does not take a resumed worker for a stale one
        self._first = int(first_round)
        self._done = self._first - 1  # last completed round
        self._requested = self._target = self._first - 1
        self._progress = self._first
        self._error: BaseException | None = None
        self._error_round: int | None = None
        self._stopping = False
        self._abort = False
        self.counters = _Stats()
        self._listener: threading.Thread | None = threading.Thread(
            target=self._listen, daemon=True, name=f"accord-listener-{self.rank}")
        self._runner: threading.Thread | None = threading.Thread(
            target=self._run, daemon=True, name=f"accord-runner-{self.rank}")
        self._listener.start()
        self._runner.start()

    # -- compute-thread side ------------------------------------------------------------
    def note(self, healthy: bool) -> None:
        """Record the health of one compute step (see ``progress`` in the module docstring)."""
        if healthy:
            self._healthy = True

    def deposit(self, x: torch.Tensor, version: int) -> None:
        """Offer ``x`` (copied) as this rank's contribution from now on; it is fresh
        progress if it changed and :meth:`note` saw a healthy step since the last one."""
        staged = x.detach().to("cpu")  # the same tensor on the CPU; a copy from a GPU
        with self.lock:
            if self._healthy and not torch.equal(staged, self._deposit):
                self._fresh = True
            self._deposit.copy_(staged)
            self._version = version
            self._healthy = False

    def request(self, k: int) -> None:
        """Activate every round up to ``k`` (no-op for rounds already run)."""
        with self.lock:
            self._raise_if_failed()
            self._requested = max(self._requested, k)
            if k > self._target:
                self._target = k
                self.lock.notify_all()

    def wait(self, k: int) -> Any:
        """Block until round ``k`` is complete; returns what ``on_round`` kept for it (kept
        until popped). Waits only for runner threads: fails when the runner failed, or
        when no round completed for ``2 * timeout`` seconds."""
        start = time.perf_counter()
        with self.lock:
            last, since = self._done, time.monotonic()
            while self._done < k:
                self._raise_if_failed()
                self.lock.wait(timeout=1.0)
                if self._done != last:
                    last, since = self._done, time.monotonic()
                elif time.monotonic() - since > 2 * self.timeout:
                    raise RuntimeError(
                        f"rank {self.rank}: background round {k} not complete: no round "
                        f"finished in {2 * self.timeout:g} s (a peer's exchange thread "
                        "stopped)")
            self._raise_if_failed()
            self.counters.wait_s += time.perf_counter() - start
            return self._results.get(k)

    def pop(self, k: int) -> Any:
        """:meth:`wait`, then drop what was kept for every round up to ``k``."""
        result = self.wait(k)
        with self.lock:
            for old in [r for r in self._results if r <= k]:
                del self._results[old]
        return result

    def arrive(self) -> None:
        """Wait until every rank's compute arrives here (a barrier bounded by
        ``idle_timeout``, not by the collective timeout); call before a blocking collective
        that waits for the slowest worker."""
        self._raise_if_failed()
        dist.barrier(group=self._idle_pg)

    def pending(self) -> int:
        """Results kept and not yet popped."""
        with self.lock:
            return len(self._results)

    def metrics(self) -> dict[str, float]:
        """Counters of this rank's rounds, for an algorithm's ``metrics()``."""
        with self.lock:
            c = self.counters
            return {"own_stale": float(c.own_stale), "stale_received": float(c.stale_received),
                    "staleness_mean": c.staleness_sum / max(c.received, 1),
                    "activated_by_peer": float(c.activated_by_peer), "wait_s": c.wait_s,
                    "pending": float(len(self._results))}

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            where = f" in round {self._error_round}" if self._error_round is not None else ""
            raise RuntimeError(f"rank {self.rank}: background exchange failed{where}: "
                               f"{type(self._error).__name__}: {self._error}") from self._error

    def close(self, abort: bool | None = None) -> None:
        """Stop both threads (local, see the module docstring); idempotent. ``abort``
        (default: whether an exception is propagating) does not finish outstanding
        rounds."""
        if self._runner is None:
            return
        if abort is None:
            abort = sys.exc_info()[0] is not None
        with self.lock:
            self._stopping = True
            self._abort = abort or self._error is not None
            self.lock.notify_all()
        runner, self._runner = self._runner, None
        last = -2
        while runner.is_alive():  # finishing rounds: wait while they make progress
            runner.join(timeout=self.timeout + 5.0)
            with self.lock:
                done = self._done
            if done == last:
                log.warning("rank %d: background runner did not stop", self.rank)
                break
            last = done
        try:
            self._send(self.rank, _STOP)
        except Exception as exc:  # noqa: BLE001 - the store is gone: the listener failed too
            log.debug("rank %d: could not stop the listener: %s", self.rank, exc)
        if self._listener is not None:
            self._listener.join(timeout=self.timeout)
            if self._listener.is_alive():
                log.warning("rank %d: background listener did not stop", self.rank)
        self._listener = None
        with self.lock:
            self._results.clear()

    # -- runner and listener ---------------------------------------------------------
    def _send(self, rank: int, message: bytes) -> None:
        with self._send_lock:
            self._outbox.queue_push(f"inbox/{rank}", message)

    def _listen(self) -> None:
        key = f"inbox/{self.rank}"
        try:
            while True:
                message = self._inbox.queue_pop(key, True)
                if message == _STOP:
                    return
                sender, _, k = message.partition(b":")
                sender, k = int(sender), int(k)
                with self.lock:
                    self._started[sender] = max(self._started.get(sender, -1), k)
                    if k > self._target:
                        self._target = k
                        self.lock.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to the compute thread
            with self.lock:
                if not self._stopping:
                    self._error = self._error or exc
                self.lock.notify_all()

    def _run(self) -> None:
        k = 0
        try:
            while True:
                with self.lock:
                    # activation: never times out (idle is not failure)
                    k = max(k, self._first)
                    while self._target < k and not self._stopping:
                        self.lock.wait()
                    if self._abort or (self._stopping and self._target < k):
                        return
                self._round(k)
                k += 1
        except BaseException as exc:  # noqa: BLE001 - handed to the compute thread
            with self.lock:
                self._error = self._error or exc
                self._error_round = k
                self.lock.notify_all()

    def _round(self, k: int) -> None:
        group = sorted(self.group_of(k))
        with self.lock:
            by_peer = self._requested < k
            to_activate = [r for r in group if r != self.rank and self._started.get(r, -1) < k]
            if self._fresh:
                self._progress = k
                self._fresh = False
            deposit = self._deposit.clone()
            version, progress = self._version, self._progress
        for r in to_activate:
            self._send(r, b"%d:%d" % (self.rank, k))
        if to_activate:
            self.stats.record("activation", 16 * len(to_activate), 0.0)
        result = group_round(self.comms.get(tuple(group)), deposit, version, progress,
                             self.rank, self.weighting, k)
        kept = self.on_round(result) if self.on_round is not None else result
        now = max(result.versions)
        with self.lock:
            c = self.counters
            c.rounds += 1
            c.messages += len(to_activate)
            c.activated_by_peer += int(by_peer)
            c.own_stale += int(version < now)
            for r, v, s in zip(result.ranks, result.versions, result.staleness, strict=True):
                if r != self.rank:
                    c.received += 1
                    c.stale_received += int(v < now)
                    c.staleness_sum += s
            if kept is not None:
                self._results[k] = kept
            self._done = k
            self.lock.notify_all()


class _SelfComm:
    """A group of one: the round is this rank's own deposit."""

    rank = 0

    def all_gather(self, t: torch.Tensor, kind: str = "") -> torch.Tensor:
        return t.reshape(1, *t.shape).clone()

    def all_reduce_(self, t: torch.Tensor, op: str = "sum", kind: str = "") -> torch.Tensor:
        return t
