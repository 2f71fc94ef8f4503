"""Fault-tolerant training on torchft: every worker is its own replica group.

A Lighthouse (:func:`start_lighthouse`, in the launcher's process) decides a quorum before
every step; each worker runs a torchft ``Manager`` with a reconfigurable gloo process group
(:class:`FTWorker`). An algorithm communicates through :class:`FTCommunicator` (the
interface of :class:`accord.comm.Communicator`; ``world_size`` and ``rank`` are the current
quorum's; point-to-point calls refused). A step is bracketed by :meth:`FTWorker.begin`
(quorum, a joiner's recovery from a live peer, membership bookkeeping) and
:meth:`FTWorker.end` (``should_commit``: a step in which a collective failed, or with
fewer than ``min_replicas`` participants, is discarded and the pre-step state restored).

Membership rules: each algorithm declares its own on its class
(``Aggregator.fault_tolerant``; None refuses it with ``ft_refusal``; ``accord list -v``
shows them), N being the current step's participants. Timeouts (:class:`FTTimeouts`,
checked by :func:`check_timeouts`)::

    heartbeat timeout < quorum timeout < process-group timeout < step deadline

and torchft's ``TORCHFT_*_TIMEOUT_SEC`` variables are refused so the checked values are the
ones used. The rules, the timeouts' reasons and the two torchft behaviours worked around:
docs/design/fault-tolerant-runs.md and docs/ft-design.md."""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from ..comm import CommStats, emulated_network, payload_compressor

log = logging.getLogger(__name__)

#: torchft's environment variables that would override the checked timeouts
TORCHFT_TIMEOUT_ENV = ("TORCHFT_TIMEOUT_SEC", "TORCHFT_QUORUM_TIMEOUT_SEC",
                       "TORCHFT_CONNECT_TIMEOUT_SEC")


def ft_algorithms() -> dict[str, str]:
    """Registry name -> membership rule of every algorithm that runs fault-tolerant (each
    declares its own rule: ``Aggregator.fault_tolerant``)."""
    from ..algorithms import REGISTRY, load_plugins

    load_plugins()
    return {name: cls.fault_tolerant for name, cls in sorted(REGISTRY.items())
            if cls.fault_tolerant is not None}


def check_algorithm(name: str, hyperparameters: Mapping[str, Any] | None = None) -> None:
    """ValueError (one line) unless algorithm ``name`` with these hyperparameters can run
    fault-tolerant (the class decides: ``fault_tolerant``, ``check_fault_tolerant``)."""
    from ..algorithms import get
    from ..core import resolve_hyperparameters

    try:
        cls = get(name)
    except (TypeError, ValueError):
        raise ValueError(f"--fault-tolerant: algorithm {name!r} is unknown; allowed: "
                         f"{', '.join(ft_algorithms())}") from None
    given = dict(hyperparameters or {})
    try:
        hp = resolve_hyperparameters(name, cls.hyperparameters, given)
    except (TypeError, ValueError):
        hp = given  # a bad value is named by the hyperparameter check
    cls.check_fault_tolerant(hp)


# -- timeouts ---------------------------------------------------------------------------

@dataclass(frozen=True)
class FTTimeouts:
    """Every timeout of a fault-tolerant run, in seconds (see the module docstring)."""

    heartbeat_interval: float = 0.1
    heartbeat: float = 2.0
    join: float = 1.0
    quorum_tick: float = 0.05
    quorum: float = 10.0
    process_group: float = 30.0
    step_deadline: float = 60.0
    connect: float = 10.0

    def check(self) -> FTTimeouts:
        check_timeouts(self.heartbeat, self.quorum, self.process_group, self.step_deadline)
        _below("heartbeat interval", self.heartbeat_interval, "heartbeat timeout",
               self.heartbeat)
        _below("join timeout", self.join, "quorum timeout", self.quorum)
        _below("heartbeat timeout plus the join timeout", self.heartbeat + self.join,
               "quorum timeout", self.quorum)
        _below("quorum tick", self.quorum_tick, "join timeout", self.join)
        return self


def _below(low_name: str, low: float, high_name: str, high: float) -> None:
    if not (isinstance(low, int | float) and isinstance(high, int | float)) or low <= 0:
        raise ValueError(f"fault-tolerant timeouts: {low_name} {low!r} s and {high_name} "
                         f"{high!r} s must be positive numbers")
    if not low < high:
        raise ValueError(f"fault-tolerant timeouts: the {low_name} ({low:g} s) must be "
                         f"below the {high_name} ({high:g} s)")


def check_timeouts(heartbeat: float, quorum: float, process_group: float,
                   step_deadline: float) -> None:
    """ValueError (one line, naming both values) unless
    heartbeat < quorum timeout < process-group timeout < step deadline (seconds)."""
    chain = [("heartbeat timeout", heartbeat), ("quorum timeout", quorum),
             ("process-group timeout", process_group), ("step deadline", step_deadline)]
    for (a, x), (b, y) in zip(chain, chain[1:], strict=False):
        _below(a, x, b, y)


# -- the Lighthouse -----------------------------------------------------------------------

def start_lighthouse(min_replicas: int, join_timeout_ms: int = 1000, quorum_tick_ms: int = 50,
                     heartbeat_timeout_ms: int = 2000, bind: str = "[::]:0") -> tuple[Any, str]:
    """Start a torchft Lighthouse in this process (its Rust threads serve it); returns
    ``(server, address)``, the address as ``http://host:port`` for ``lighthouse_addr`` /
    ``TORCHFT_LIGHTHOUSE``. Stop it with ``server.shutdown()``."""
    from torchft.coordination import LighthouseServer

    if min_replicas < 1:
        raise ValueError(f"min_replicas: got {min_replicas!r}, allowed: an integer >= 1")
    server = LighthouseServer(bind=bind, min_replicas=int(min_replicas),
                              join_timeout_ms=int(join_timeout_ms),
                              quorum_tick_ms=int(quorum_tick_ms),
                              heartbeat_timeout_ms=int(heartbeat_timeout_ms))
    return server, server.address()


# -- the process group that remembers its quorum ----------------------------------------

def _recording_gloo(timeout: timedelta):
    """torchft's reconfigurable gloo group, remembering who is in each configuration."""
    from torchft.process_group import ProcessGroupGloo

    class _RecordingGloo(ProcessGroupGloo):
        def __init__(self, timeout: timedelta) -> None:
            super().__init__(timeout=timeout)
            #: worker indices of the current configuration (replica ids' trailing
            #: digits, in replica-rank order), and its quorum id
            self.members: list[int] = []
            self.quorum: int | None = None
            self.configures = 0

        def configure(self, store_addr, replica_id, rank, world_size, quorum_id=None,
                      group_rank=None, group_world_size=None, global_ranks=None):
            self.members = list(global_ranks or [])
            self.quorum = quorum_id
            self.configures += 1
            super().configure(store_addr, replica_id, rank, world_size, quorum_id,
                              group_rank, group_world_size, global_ranks)

    return _RecordingGloo(timeout)


def _snapshot_transport(timeout: timedelta, host: str | None = None):
    """torchft's HTTP checkpoint transport, serving the pre-step snapshot at any time,
    and fetching with retries.

    * torchft's own transport stops serving at ``should_commit`` (its served state is
      the live model, which the optimizer step changes after it). FTWorker serves an
      immutable snapshot instead, so the server never closes: a sender may finish a step
      without any collective (local SGD, DiLoCo between syncs) before the joiner has
      fetched, and with torchft's transport the joiner's request then waits until it
      times out.
    * The joiner may ask before the sender's quorum thread has staged the state (both
      leave the process-group rendezvous together, then the sender stages while the
      joiner already fetches): HTTP 400 "serving -1 but got step=0" (seen on CPU at
      step 0). The fetch is retried until the timeout."""
    import urllib.error

    from torchft.checkpointing import HTTPTransport

    class _SnapshotTransport(HTTPTransport):
        def disallow_checkpoint(self) -> None:
            pass

        def recv_checkpoint(self, src_rank, metadata, step, timeout):
            deadline = time.monotonic() + timeout.total_seconds()
            while True:
                try:
                    return super().recv_checkpoint(src_rank, metadata, step, timeout)
                except urllib.error.HTTPError as exc:  # not staged yet
                    if exc.code != 400 or time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)

        def address(self) -> str:
            # torchft advertises socket.gethostname(); several hosts need the name given
            if host is None:
                return super().address()
            return f"http://{host}:{self._server.socket.getsockname()[1]}/checkpoint/"

    return _SnapshotTransport(timeout=timeout, num_chunks=0)


# -- the communicator ---------------------------------------------------------------------

def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class FTCommunicator:
    """:class:`accord.comm.Collectives` (the communicator protocol, without point-to-point
    calls) on a torchft Manager.

    ``world_size`` and ``rank`` are the current quorum's (read at every access; they
    change only at :meth:`FTWorker.begin`). Every collective is counted into ``stats``
    as the Communicator counts (payload bytes, seconds). A failed collective does not
    raise: the Manager records the error, the call returns with the tensor unreduced, and
    the step is discarded at :meth:`FTWorker.end`; after a failure later collectives of
    the step are skipped.
    """

    #: the Manager's avg divides by the participants inside the call (as NCCL's AVG)
    native_avg = True
    #: fault-tolerant calls never wait for an emulated network
    emulated = False
    group = None

    def __init__(self, manager: Any, pg: Any, stats: CommStats | None = None) -> None:
        if payload_compressor() is not None:
            raise ValueError("--fault-tolerant does not support --compress (not wired)")
        if emulated_network() is not None:
            raise ValueError("--fault-tolerant does not support --network (not wired)")
        self.manager = manager
        self.pg = pg
        self.stats = CommStats() if stats is None else stats

    @property
    def world_size(self) -> int:
        return int(self.manager.num_participants())

    @property
    def rank(self) -> int:
        rank = self.manager.participating_rank()
        if rank is None:
            raise RuntimeError("this replica does not participate in the current quorum")
        return int(rank)

    @property
    def ranks(self) -> list[int]:
        return list(range(self.world_size))

    def global_rank(self, rank: int) -> int:
        """Ranks are the quorum's: a group rank is its own global rank."""
        return rank

    def _check(self, t: torch.Tensor) -> None:
        if not t.is_contiguous():
            raise ValueError("Communicator operations take one contiguous tensor (a flat buffer)")

    def all_reduce_(self, t: torch.Tensor, op: str = "sum", kind: str = "allreduce",
                    exact: bool = False) -> torch.Tensor:
        """In-place allreduce over the participants through ``Manager.allreduce``
        (``op``: sum, avg, max, min; ``exact`` is accepted: nothing is compressed)."""
        from torch.distributed import ReduceOp

        self._check(t)
        reduce_op = {"sum": ReduceOp.SUM, "avg": ReduceOp.AVG, "max": ReduceOp.MAX,
                     "min": ReduceOp.MIN}.get(op)
        if reduce_op is None:
            raise ValueError(f"op: got {op!r}, allowed: 'sum', 'avg', 'max', 'min'")
        start = time.perf_counter()
        if op == "avg" and not t.is_floating_point():
            raise ValueError("op='avg' needs a floating-point tensor")
        self.manager.allreduce(t, reduce_op=reduce_op).wait()
        self.stats.record(kind, _nbytes(t), time.perf_counter() - start)
        return t

    def all_reduce_async_(self, t: torch.Tensor, op: str = "sum",
                          kind: str = "allreduce") -> torch.futures.Future:
        """Synchronous here (torchft's managed future cannot be chained like a plain one):
        the returned future is already complete."""
        if op not in ("sum", "avg"):
            raise ValueError(f"op: got {op!r}, allowed: 'sum', 'avg'")
        self.all_reduce_(t, op=op, kind=kind)
        done: torch.futures.Future = torch.futures.Future()
        done.set_result(t)
        return done

    def _run(self, what: str, issue: Callable[[], Any]) -> bool:
        """Issue a process-group call and wait; an error is reported to the Manager (the
        step will be discarded). False if skipped or failed."""
        if self.manager.errored() is not None:
            return False
        self.manager.wait_quorum()
        try:
            issue().wait()
            return True
        except Exception as exc:  # a dead peer: connection reset, timeout, ...
            log.warning("fault-tolerant %s failed (step discarded): %s", what, exc)
            self.manager.report_error(exc)
            return False

    def all_gather(self, t: torch.Tensor, kind: str = "allgather") -> torch.Tensor:
        """Gather ``t`` from every participant: shape ``(world_size, *t.shape)``, in
        quorum-rank order. On a failure the rows of the others are zeros."""
        from torch.distributed.distributed_c10d import AllgatherOptions

        self._check(t)
        n = self.world_size
        out = torch.zeros((n, *t.shape), dtype=t.dtype, device=t.device)
        start = time.perf_counter()
        if n == 1:
            out[0].copy_(t)
        else:
            rows = list(out.unbind(0))
            if not self._run("allgather",
                             lambda: self.pg.allgather([rows], [t], AllgatherOptions())):
                out.zero_()
                out[self.rank].copy_(t)
        self.stats.record(kind, _nbytes(t), time.perf_counter() - start)
        return out

    def broadcast_(self, t: torch.Tensor, src: int = 0, kind: str = "broadcast") -> torch.Tensor:
        """In-place broadcast from quorum rank ``src``; bytes count on the sender only."""
        from torch.distributed.distributed_c10d import BroadcastOptions

        self._check(t)
        start = time.perf_counter()
        if self.world_size > 1:
            opts = BroadcastOptions()
            opts.rootRank = src
            opts.rootTensor = 0
            self._run("broadcast", lambda: self.pg.broadcast([t], opts))
        self.stats.record(kind, _nbytes(t) if self.rank == src else 0,
                          time.perf_counter() - start)
        return t

    def _p2p(self, *_: Any, **__: Any) -> None:
        raise NotImplementedError(
            "--fault-tolerant refuses point-to-point communication: peers chosen for one "
            "world mean nothing after a change of membership (torchft's Manager makes only "
            "allreduce fault-tolerant)")

    send = recv_ = exchange_ = multi_exchange_ = _p2p


# -- membership and the step bracket ------------------------------------------------------

def membership_event(step: int, participants: list[int], previous: list[int] | None,
                     rank: int | None = None) -> dict[str, Any]:
    """The metrics record of a change of membership (``previous=None``: the first)."""
    now, before = sorted(participants), sorted(previous or [])
    event: dict[str, Any] = {"type": "event", "kind": "membership", "step": int(step),
                             "participants": now,
                             "joined": [w for w in now if w not in before],
                             "left": [w for w in before if w not in now]}
    if rank is not None:
        event["rank"] = rank
    return event


def refresh(agg: Any, comm: FTCommunicator, launch_world_size: int) -> None:
    """Point aggregator ``agg`` at the current quorum: its ``comm``, ``rank`` and
    ``world_size``, and what an algorithm derives from N (EASGD: beta kept, alpha =
    beta / N; a given alpha means beta = alpha * ``launch_world_size``, the number of
    workers launched). Idempotent; pass it as :class:`FTWorker`'s ``on_quorum`` so it
    also runs before a joiner loads the state it received (ACGA checks its momentum's
    length against ``world_size`` when loading)."""
    agg.comm = comm
    agg.group = None
    agg.world_size = comm.world_size
    agg.rank = comm.rank
    on_change = getattr(agg, "on_world_change", None)
    if on_change is not None:  # what the algorithm derives from N (its class decides)
        on_change(launch_world_size)


class FTWorker:
    """One worker of a fault-tolerant run: its own replica group of one process.

    ``get_state()`` returns everything a step changes and a joiner needs (model,
    optimizer, aggregator, data position: any picklable structure of tensors);
    ``set_state(state)`` loads such a structure. Both run on the training thread, except
    that torchft calls the snapshot server from its quorum thread (served: the pre-step
    snapshot, never live tensors, so a peer can read it while this worker trains on).

    ``replica`` is the worker's index; the replica id is ``accord_<replica>`` (torchft
    appends a fresh uuid, so a respawned worker with the same index is a new member).
    ``on_quorum(comm)`` runs once the quorum of a step is known: before a received state
    is loaded and at the end of every :meth:`begin` (``lambda c: refresh(agg, c, N)``).

    Use::

        worker = FTWorker(i, lighthouse, min_replicas, get_state, set_state)
        while worker.step < steps:
            step = worker.begin()            # quorum; a joiner has the peers' state now
            ...forward, backward, agg hooks through worker.comm, optimizer...
            worker.end()                     # committed, or rolled back to the snapshot
        worker.shutdown()
    """

    def __init__(self, replica: int, lighthouse: str, min_replicas: int,
                 get_state: Callable[[], Any], set_state: Callable[[Any], None],
                 timeouts: FTTimeouts | None = None, host: str = "localhost",
                 stats: CommStats | None = None,
                 on_quorum: Callable[[FTCommunicator], None] | None = None,
                 on_wait: Callable[[], None] | None = None) -> None:
        from torch.distributed import TCPStore
        from torchft import Manager

        self.timeouts = (timeouts or FTTimeouts()).check()
        for var in TORCHFT_TIMEOUT_ENV:
            if os.environ.get(var):
                raise ValueError(f"--fault-tolerant: environment variable {var} is set "
                                 "and would override the checked timeouts; unset it")
        t = self.timeouts
        self.replica = int(replica)
        self._get_state, self._set_state = get_state, set_state
        self._on_quorum = on_quorum
        self._on_wait = on_wait
        #: how long a step's quorum may keep failing (each attempt bounded by the quorum
        #: timeout) before the worker gives up: long enough for the launcher to kill a
        #: hung peer (step deadline) and the Lighthouse to drop it (heartbeat timeout)
        self.patience = t.step_deadline + t.heartbeat + t.join
        self.quorum_retries = 0
        self._snapshot: Any = None
        self._healed = False
        #: after :meth:`begin`: this step's quorum replaced our state with a live peer's
        self.healed = False
        self.participants: list[int] | None = None
        self.events: list[dict[str, Any]] = []
        self.discarded = 0
        # the Manager's own store (it connects as a client: someone must serve it);
        # the quorum's process group uses the store of one member, so peers reach it
        self.store = TCPStore(host, 0, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=t.connect))
        self.pg = _recording_gloo(timedelta(seconds=t.process_group))
        self.manager = Manager(
            pg=self.pg, load_state_dict=self._receive, state_dict=self._serve,
            min_replica_size=int(min_replicas), use_async_quorum=False,
            timeout=timedelta(seconds=t.process_group),
            quorum_timeout=timedelta(seconds=t.quorum),
            connect_timeout=timedelta(seconds=t.connect),
            rank=0, world_size=1, store_addr=host, store_port=self.store.port,
            lighthouse_addr=lighthouse, replica_id=f"accord_{self.replica}",
            hostname=host,
            heartbeat_interval=timedelta(seconds=t.heartbeat_interval), init_sync=True,
            checkpoint_transport=_snapshot_transport(timedelta(seconds=t.process_group),
                                                     host))
        self.comm = FTCommunicator(self.manager, self.pg, stats)

    # torchft's callbacks
    def _serve(self) -> Any:
        return self._snapshot

    def _receive(self, state: Any) -> None:
        if self._on_quorum is not None:  # the world the received state is loaded into
            self._on_quorum(self.comm)
        self._set_state(state)
        self._healed = True

    def _take_snapshot(self) -> None:
        self._snapshot = copy.deepcopy(self._get_state())

    @property
    def step_lost(self) -> bool:
        """True once the current step is known to be discarded (a failed collective, or
        a failed quorum / recovery at :meth:`begin`): the loop may skip to :meth:`end`."""
        return self.manager.errored() is not None

    @property
    def step(self) -> int:
        """Committed steps (the same on every participant after :meth:`begin`)."""
        return int(self.manager.current_step())

    def begin(self) -> int:
        """Start a step: snapshot, quorum (a joiner loads a live peer's state here),
        membership bookkeeping. Returns the step number (committed steps so far)."""
        self._take_snapshot()
        self._healed = False
        self._quorum()
        self.healed = self._healed
        if self.manager.errored() is not None:
            # the quorum's reconfiguration or our recovery failed: this step is lost and
            # we skip its collectives; drop our process group at once so that the peers'
            # collectives fail now rather than after the process-group timeout (the
            # next quorum gets a new id after a failed commit and reconfigures)
            log.warning("fault-tolerant step %d lost at the quorum: %s", self.step,
                        self.manager.errored())
            self.pg.abort()
        if self._healed:  # our state was replaced: that is the state to roll back to
            self._take_snapshot()
        if self._on_quorum is not None:
            self._on_quorum(self.comm)
        members = sorted(self.pg.members) or [self.replica]
        if members != self.participants:
            event = membership_event(self.step, members, self.participants, self.replica)
            self.events.append(event)
            self.participants = members
        return self.step

    def _quorum(self) -> None:
        """``start_quorum``, retried after a quorum timeout for up to :attr:`patience`
        seconds. A quorum that keeps half or fewer of the previous members waits until
        the missing ones' heartbeats expire (torchft's split-brain guard); a *hung* peer
        keeps heartbeating from its Rust thread until the launcher kills it at the step
        deadline, so with two workers the survivor would otherwise give up first."""
        deadline = time.monotonic() + self.patience
        while True:
            try:
                self.manager.start_quorum()
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
                self.quorum_retries += 1
                log.warning("fault-tolerant quorum timed out at step %d; retrying (%d)",
                            self.step, self.quorum_retries)
                # torchft keeps the failed attempt's future and would re-raise it
                self.manager._quorum_future = None
                if self._on_wait is not None:
                    self._on_wait()

    def end(self) -> bool:
        """End a step: True if committed; else the snapshot is restored (every
        participant whose step failed does the same, so replicated state stays equal)."""
        if self.manager.should_commit():
            return True
        self.discarded += 1
        self._set_state(copy.deepcopy(self._snapshot))
        return False

    def drain_events(self) -> list[dict[str, Any]]:
        out, self.events = self.events, []
        return out

    def shutdown(self) -> None:
        """Stop the Manager's servers (not collective)."""
        try:
            self.manager.shutdown(wait=False)
        finally:
            self.pg.shutdown()
