"""The background exchange engine: group rounds that never wait for a slow worker's compute.

Wait-avoiding WAGMA and asynchronous EASGD share one mechanism. Each worker runs one
communication thread on process groups of its own (never the training loop's), which
executes numbered *rounds*. Round ``k`` is a weighted mean over a group of ranks (the
world, or a WAGMA butterfly group) of the model each member last *deposited*::

    compute thread                           communication thread
    --------------                           --------------------
    engine.deposit(x, version=step)          wait until round k is activated:
    engine.request(k)        ---- token -->    by a local request, or by a token
    r = engine.wait(k)  (or newest result)     from any member of round k's group
                                             send a token to every other member
                                             snapshot the newest deposit
                                             all-gather (version, fingerprint, finite)
                                             weights w_j (uniform or dynamic)
                                             allreduce of w_own * deposit -> mean
                                             publish the result of round k

The first member whose compute reaches a round activates it for the whole group (the
activation tokens play the role of fflib's activation messages); a member still
computing takes part through its thread with the model it deposited last, so its
contribution is stale, never lost and never waited for. The thread blocks only on the
other *threads*, which respond within a message round trip. Rounds run in order on every
rank, and the members of a round's group all run it, so the engine cannot deadlock.

Staleness is measured per contribution: the round's time is the newest version among its
contributions (versions are the compute step of the deposit), and a contribution's
staleness is that time minus the step at which the contributor's model last changed
(detected with a fingerprint, so a frozen worker that keeps re-depositing the same model
counts as stale too). Results carry every member's staleness and weight.

Shutdown: :meth:`ExchangeEngine.close` is collective like the rest of the run. Every rank
requests one final round that carries only tokens flagged final; each thread leaves after
it, with no receive left pending, and the engine's process groups are destroyed. When a
worker fails the process exits and the daemon thread goes with it; a failed exchange in the
thread is re-raised in the compute thread at its next wait, naming the round.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .comm import CommStats, Communicator

log = logging.getLogger(__name__)

TOKEN_TAG = 7
#: meta columns gathered per member: version, fingerprint, finite, global rank
META = 4


def fingerprint_probe(numel: int, seed: int = 0x5EED) -> torch.Tensor:
    """A fixed random vector (identical on every rank): ``probe @ x`` changes whenever x
    does, for all practical purposes."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(numel, generator=gen, dtype=torch.float64)


@dataclass
class RoundResult:
    """What one round produced, identical on every member except ``own_*``."""

    round: int
    mean: torch.Tensor | None  # weighted mean of the deposits; None when every weight is 0
    ranks: list[int]  # global ranks of the group, ascending
    versions: list[int]  # deposit version (compute step) of each member's contribution
    staleness: list[int]  # steps since each member's model last changed, at round time
    weights: list[float]  # weight of each member (sum 1 over the survivors)
    finite: list[bool]
    own_deposit: torch.Tensor  # the deposit this rank contributed
    own_version: int
    own_weight: float
    final: bool = False


class Weighting:
    """Weights of a group's contributions; ``"uniform"`` or ``"dynamic"``.

    dynamic (designed here; the paper that motivates it, arXiv 2409.09242, does not give
    a formula we could verify):  w_j ∝ finite_j * 2 ** (-staleness_j / half_life)
    renormalised over the members with a nonzero weight. A worker that crashes, freezes or
    falls behind sees its staleness grow every round and its pull on the consensus fade
    with half-life ``half_life`` steps; a non-finite contribution weighs 0. uniform weighs
    every member 1/S (non-finite members included: the training loop's non-finite guard
    keeps NaN out of the models, and uniform means the textbook rule).

    The object keeps, per global rank, the fingerprint of its last contribution and the
    version at which it last changed, so it must see every round of its owner in order.
    """

    def __init__(self, mode: str, half_life: float) -> None:
        if mode not in ("uniform", "dynamic"):
            raise ValueError(f"weighting: got {mode!r}, allowed: 'uniform', 'dynamic'")
        self.mode = mode
        self.half_life = float(half_life)
        self.last_print: dict[int, float] = {}
        self.changed_at: dict[int, int] = {}

    def __call__(self, meta: torch.Tensor) -> tuple[list[float], list[int]]:
        """``meta`` rows: (version, fingerprint, finite, rank). Returns weights, staleness."""
        now = int(meta[:, 0].max())
        staleness = []
        for version, prt, _finite, rank in meta.tolist():
            rank, version = int(rank), int(version)
            if rank not in self.last_print or self.last_print[rank] != prt:
                self.last_print[rank] = prt
                self.changed_at[rank] = version
            staleness.append(max(0, now - self.changed_at[rank]))
        finite = [bool(f) for f in meta[:, 2].tolist()]
        if self.mode == "uniform":
            return [1.0 / len(staleness)] * len(staleness), staleness
        raw = [(2.0 ** (-s / self.half_life)) if ok else 0.0
               for s, ok in zip(staleness, finite, strict=True)]
        total = sum(raw)
        return ([w / total for w in raw] if total > 0 else raw), staleness


@torch.no_grad()
def group_round(
    comm: Communicator | None,
    deposit: torch.Tensor,
    version: int,
    global_rank: int,
    weighting: Weighting,
    probe: torch.Tensor,
    round_index: int,
) -> RoundResult:
    """One weighted-mean round over ``comm``'s group (collective on that group): gather the
    members' (version, fingerprint, finite, rank), weigh them identically on every member,
    then allreduce the weighted deposits. Used inline by the synchronous variants and by
    the engine thread. ``comm=None``: a group of this rank alone (no communication)."""
    if comm is None:
        comm = _SelfComm()
    finite = bool(torch.isfinite(deposit).all())
    prt = float(probe @ deposit.double()) if finite else float("nan")
    mine = torch.tensor([float(version), prt, float(finite), float(global_rank)],
                        dtype=torch.float64)
    meta = comm.all_gather(mine, kind="meta")
    order = sorted(range(meta.shape[0]), key=lambda i: int(meta[i, 3]))
    meta = meta[order]
    weights, staleness = weighting(meta)
    ranks = [int(r) for r in meta[:, 3].tolist()]
    own_weight = weights[ranks.index(global_rank)]
    mean = None
    if sum(weights) > 0:
        mean = deposit * own_weight if own_weight != 0 else torch.zeros_like(deposit)
        if not finite and own_weight == 0:
            mean.zero_()
        comm.all_reduce_(mean, op="sum")
    return RoundResult(round=round_index, mean=mean, ranks=ranks,
                       versions=[int(v) for v in meta[:, 0].tolist()], staleness=staleness,
                       weights=weights, finite=[bool(f) for f in meta[:, 2].tolist()],
                       own_deposit=deposit, own_version=version, own_weight=own_weight)


def subgroups(groups: Sequence[Sequence[int]], timeout: timedelta) -> dict[tuple[int, ...],
                                                                          dist.ProcessGroup]:
    """A gloo process group for every distinct group (collective: every rank must pass the
    same list). Groups of one rank get no process group."""
    out: dict[tuple[int, ...], dist.ProcessGroup] = {}
    for g in sorted({tuple(sorted(g)) for g in groups}):
        if len(g) < 2:
            continue
        out[g] = dist.new_group(list(g), timeout=timeout, backend="gloo")
    return out


@dataclass
class _Stats:
    rounds: int = 0
    own_stale: int = 0  # rounds this rank took part in with a deposit older than the round
    stale_received: int = 0  # other members' contributions older than the round's time
    received: int = 0
    staleness_sum: float = 0.0
    activated_by_peer: int = 0
    wait_s: float = 0.0  # compute-thread seconds spent waiting for round results


class ExchangeEngine:
    """Rounds of weighted group means on a background thread (see the module docstring).

    ``group_of(k)`` gives the global ranks of this rank's group in round ``k`` (identical
    on every member); ``on_round(result)`` runs on the thread after each round (EASGD
    moves its centre there). Everything published is read under ``self.lock``.
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
        on_round: Callable[[RoundResult], None] | None = None,
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
        self.timeout = timeout
        td = timedelta(seconds=timeout)
        # the thread's own world group (tokens) and one group per distinct round group
        self.token_pg = dist.new_group(list(range(self.world_size)), timeout=td,
                                       backend="gloo")
        self.pgs = subgroups(all_groups, td)
        self.comms = {g: Communicator(pg, stats) for g, pg in self.pgs.items()}
        self.stats = stats
        self.probe = fingerprint_probe(initial.numel())
        self.lock = threading.Condition()
        # the first deposit exists before the thread starts: a peer's round 0 may come at once
        self._deposit = initial.detach().clone()
        self._version = 0
        self._requested = -1
        self._final: int | None = None
        self._results: dict[int, RoundResult] = {}
        self._done = -1  # last completed round
        self._error: BaseException | None = None
        self._tokens: dict[int, int] = {}  # round -> activation tokens received
        self._final_tokens: dict[int, int] = {}
        self.counters = _Stats()
        self._listener = threading.Thread(target=self._listen, daemon=True,
                                          name=f"accord-tokens-{self.rank}")
        self._listener.start()
        self._thread = threading.Thread(target=self._run, name=f"accord-exchange-{self.rank}",
                                        daemon=True)
        self._thread.start()

    # -- compute-thread side ------------------------------------------------------------
    def deposit(self, x: torch.Tensor, version: int) -> None:
        """Offer ``x`` (copied) as this rank's contribution from now on."""
        with self.lock:
            self._deposit.copy_(x)
            self._version = version

    def request(self, k: int) -> None:
        """Activate every round up to ``k`` (no-op for rounds already run)."""
        with self.lock:
            if k > self._requested:
                self._requested = k
                self.lock.notify_all()

    def wait(self, k: int) -> RoundResult:
        """Block until round ``k`` is complete; returns its result (kept until popped)."""
        start = time.perf_counter()
        with self.lock:
            while self._done < k:
                self._raise_if_failed()
                if not self.lock.wait(timeout=self.timeout):
                    self._raise_if_failed()
                    raise RuntimeError(
                        f"rank {self.rank}: background round {k} not complete after "
                        f"{self.timeout:g} s (a peer stopped exchanging)")
            self.counters.wait_s += time.perf_counter() - start
            return self._results[k]

    def pop(self, k: int) -> RoundResult:
        result = self.wait(k)
        with self.lock:
            for old in [r for r in self._results if r <= k]:
                del self._results[old]
        return result

    def metrics(self) -> dict[str, float]:
        """Counters of this rank's rounds, for an algorithm's ``metrics()``."""
        with self.lock:
            c = self.counters
            return {"own_stale": float(c.own_stale), "stale_received": float(c.stale_received),
                    "staleness_mean": c.staleness_sum / max(c.received, 1),
                    "activated_by_peer": float(c.activated_by_peer), "wait_s": c.wait_s}

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"rank {self.rank}: background exchange failed: "
                               f"{type(self._error).__name__}: {self._error}") from self._error

    def close(self, abort: bool | None = None) -> None:
        """Collective: run one final token-only round, then join the thread and free the
        process groups. Safe to call twice. ``abort`` (default: whether an exception is
        propagating, e.g. close() in a ``finally`` after a failure) skips the final round:
        the peers may be gone, and the daemon threads end with the process."""
        if self._thread is None:
            return
        if abort is None:
            abort = sys.exc_info()[0] is not None
        if abort:
            self._thread = None
            return
        if self._thread.is_alive() and self._error is None:
            with self.lock:
                self._final = max(self._requested, self._done) + 1
                self._requested = self._final
                self.lock.notify_all()
            self._thread.join(timeout=self.timeout)
        if self._thread.is_alive():
            log.warning("rank %d: background exchange thread did not stop", self.rank)
        else:
            for pg in [*self.pgs.values(), self.token_pg]:
                try:
                    dist.destroy_process_group(pg)
                except Exception:  # noqa: BLE001 - shutting down, nothing left to save
                    pass
        self._thread = None

    # -- communication thread ------------------------------------------------------------
    def _run(self) -> None:
        try:
            k = 0
            while True:
                if self._round(k):
                    return
                k += 1
        except BaseException as exc:  # noqa: BLE001 - handed to the compute thread
            with self.lock:
                self._error = exc
                self.lock.notify_all()

    def _listen(self) -> None:
        """Receive activation tokens from any rank (a gloo receive cannot be polled, so a
        blocking any-source receive on this thread stands in for polling). Leaves after
        the N - 1 final tokens: every rank's last message to this one."""
        try:
            finals = 0
            while finals < self.world_size - 1:
                token = torch.zeros(2, dtype=torch.int64)
                dist.recv(token, src=None, group=self.token_pg, tag=TOKEN_TAG)
                k, flag = int(token[0]), int(token[1])
                with self.lock:
                    if flag:
                        finals += 1
                        self._final_tokens[k] = self._final_tokens.get(k, 0) + 1
                    else:
                        self._tokens[k] = self._tokens.get(k, 0) + 1
                    self.lock.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to the compute thread
            with self.lock:
                self._error = self._error or exc
                self.lock.notify_all()

    def _wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        """Under ``self.lock``: wait until ``predicate()``, failing after the timeout."""
        deadline = time.monotonic() + self.timeout
        while not predicate():
            if self._error is not None:
                raise RuntimeError(f"token listener failed: {self._error}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"{what} not received within {self.timeout:g} s")
            self.lock.wait(timeout=min(remaining, 1.0))

    def _send_tokens(self, k: int, final: bool, ranks: Sequence[int]) -> None:
        token = torch.tensor([k, int(final)], dtype=torch.int64)
        works = [dist.isend(token, dst=r, group=self.token_pg, tag=TOKEN_TAG) for r in ranks]
        for w in works:
            w.wait()
        if ranks:
            self.stats.record("activation", token.numel() * 8 * len(ranks), 0.0)

    def _round(self, k: int) -> bool:
        """Run round ``k``; True when it was the final round."""
        with self.lock:
            # activation: our own compute thread, or a token from any member of the round
            self._wait_for_activation(k)
            by_peer = self._requested < k
            final = (self._final is not None and k >= self._final) or k in self._final_tokens
        if final:  # a world-wide round of tokens only, then the thread leaves
            everyone = [r for r in range(self.world_size) if r != self.rank]
            self._send_tokens(k, True, everyone)
            with self.lock:
                self._wait_for(lambda: self._final_tokens.get(k, 0) == len(everyone),
                               f"final tokens of round {k}")
            self._listener.join(timeout=self.timeout)
            return True
        group = sorted(self.group_of(k))
        others = [r for r in group if r != self.rank]
        self._send_tokens(k, False, others)
        with self.lock:
            self._wait_for(lambda: self._tokens.get(k, 0) == len(others),
                           f"activation tokens of round {k}")
            self._tokens.pop(k, None)
            deposit = self._deposit.clone()
            version = self._version
        result = group_round(self.comms.get(tuple(group)), deposit, version, self.rank,
                             self.weighting, self.probe, k)
        if self.on_round is not None:
            self.on_round(result)
        now = max(result.versions)
        c = self.counters
        with self.lock:
            c.rounds += 1
            c.activated_by_peer += int(by_peer)
            c.own_stale += int(version < now)
            for r, v, s in zip(result.ranks, result.versions, result.staleness, strict=True):
                if r != self.rank:
                    c.received += 1
                    c.stale_received += int(v < now)
                    c.staleness_sum += s
            self._results[k] = result
            self._done = k
            self.lock.notify_all()
        return False

    def _wait_for_activation(self, k: int) -> None:
        # no timeout: a round waits as long as no member's compute reaches it
        while (self._requested < k and not self._tokens.get(k)
               and not self._final_tokens.get(k)):
            if self._error is not None:
                raise RuntimeError(f"token listener failed: {self._error}")
            self.lock.wait(timeout=1.0)


class _SelfComm:
    """A group of one: the round is this rank's own deposit."""

    def all_gather(self, t: torch.Tensor, kind: str = "") -> torch.Tensor:
        return t.reshape(1, *t.shape).clone()

    def all_reduce_(self, t: torch.Tensor, op: str = "sum", kind: str = "") -> torch.Tensor:
        return t
