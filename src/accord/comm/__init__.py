"""The one choke point for communication, and the flat buffers algorithms send.

Every byte an algorithm sends goes through a :class:`Communicator`, which performs one
collective (or point-to-point exchange) per call on one contiguous tensor and records, per
operation kind, the number of calls, the payload bytes and the seconds spent waiting.

Bytes are *payload* bytes: the size of the tensor this rank hands to the operation
(for ``all_gather`` its own contribution, for ``send`` the message). They are the same on
every backend and do not depend on the collective algorithm the backend picks; a ring
allreduce moves about ``2 (N-1)/N`` times the payload over the wire.

**Emulated network.** :func:`emulate_network` (``accord train --network 1gbit,5ms``) makes
every call of every Communicator of this process take at least the time the emulated link
needs (the alpha-beta costs of :mod:`accord.comm.network`, by operation: allreduce, all-gather,
broadcast, send, recv, exchange): after the real call returns, the calling thread sleeps
for the rest of that time; a call that already took longer is not shortened. Computation
is not slowed. The seconds counted per operation include the emulated wait. An
asynchronous allreduce's future completes no earlier than its emulated time after it was
issued (the wait runs in the completion callback), so overlap with backward is kept.
Background-engine rounds go through the same Communicators, so they obey it too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist

from . import network as _net
from .compress import Compressor

#: the emulated network of this process: (link or profile, clock), or None for the real one
_EMULATION: tuple[_net.Link | _net.Network, _net.Clock] | None = None


def emulate_network(model: _net.Link | _net.Network | None,
                    clock: _net.Clock = _net.REAL_CLOCK) -> None:
    """Emulate ``model`` (a :class:`~accord.comm.network.Link` or a per-pair
    :class:`~accord.comm.network.Network`) for every Communicator of this process from now on;
    ``None`` restores the real network. ``clock`` is for tests (a FakeClock)."""
    global _EMULATION
    _EMULATION = None if model is None else (model, clock)


def emulated_network() -> _net.Link | _net.Network | None:
    """The network this process emulates, or None."""
    return None if _EMULATION is None else _EMULATION[0]


#: the payload compressor of this process (``accord train --compress``), or None
_COMPRESSOR: Compressor | None = None


def compress_payloads(compressor: Compressor | None) -> None:
    """Compress every model-size sum/avg allreduce of every Communicator of this process
    with ``compressor`` from now on (None: no compression). See :meth:`Communicator.all_reduce_`
    for what stays exact."""
    global _COMPRESSOR
    _COMPRESSOR = compressor


def payload_compressor() -> Compressor | None:
    """The compressor of this process, or None."""
    return _COMPRESSOR


@dataclass
class OpStats:
    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0


@dataclass
class CommStats:
    """Counters per operation kind (``allreduce``, ``allgather``, ``broadcast``, ...)."""

    ops: dict[str, OpStats] = field(default_factory=dict)
    # a background exchange thread records into the same stats as the compute thread
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, kind: str, nbytes: int, seconds: float) -> None:
        with self._lock:
            op = self.ops.setdefault(kind, OpStats())
            op.calls += 1
            op.bytes += nbytes
            op.seconds += seconds

    @property
    def calls(self) -> int:
        with self._lock:
            return sum(o.calls for o in self.ops.values())

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(o.bytes for o in self.ops.values())

    @property
    def seconds(self) -> float:
        with self._lock:
            return sum(o.seconds for o in self.ops.values())

    def as_dict(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {k: {"calls": o.calls, "bytes": o.bytes, "seconds": o.seconds}
                    for k, o in sorted(self.ops.items())}

    def reset(self) -> None:
        with self._lock:
            self.ops.clear()

    def load(self, ops: dict[str, dict[str, float]]) -> None:
        """Continue from counters saved with :meth:`as_dict` (a resumed run)."""
        with self._lock:
            self.ops = {k: OpStats(int(v["calls"]), int(v["bytes"]), float(v["seconds"]))
                        for k, v in ops.items()}


# torch 2.13 renamed all_gather_into_tensor to all_gather_single
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of sums that must not round at a narrow parameter precision (dots, norms,
    running means, push-sum weights, an outer model): float64 for float64 tensors, float32
    for every narrower float (float32, bfloat16, float16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _backend(group: dist.ProcessGroup | None) -> str:
    """The group's backend name; groups built outside ``new_group`` (the background engine
    constructs its own gloo groups) are not registered, and are gloo."""
    try:
        return str(dist.get_backend(group))
    except (ValueError, RuntimeError):
        return "gloo"


def _first(fut: torch.futures.Future) -> torch.Tensor:
    return fut.value()[0]  # value() re-raises the collective's error, if any


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@runtime_checkable
class Collectives(Protocol):
    """What an algorithm may call: the collectives every communicator offers (the
    counted :class:`Communicator` on a process group, and
    :class:`accord.ft.membership.FTCommunicator` on a torchft quorum, whose ``world_size`` and
    ``rank`` follow the current participants). Each call counts its bytes and seconds in
    ``stats`` under ``kind``."""

    rank: int
    world_size: int
    stats: CommStats
    native_avg: bool
    emulated: bool

    def global_rank(self, rank: int) -> int: ...

    def all_reduce_(self, t: torch.Tensor, op: str = "sum", kind: str = "allreduce",
                    exact: bool = False) -> torch.Tensor: ...

    def all_reduce_async_(self, t: torch.Tensor, op: str = "sum",
                          kind: str = "allreduce") -> torch.futures.Future: ...

    def all_gather(self, t: torch.Tensor, kind: str = "allgather") -> torch.Tensor: ...

    def broadcast_(self, t: torch.Tensor, src: int = 0,
                   kind: str = "broadcast") -> torch.Tensor: ...


@runtime_checkable
class PointToPoint(Collectives, Protocol):
    """:class:`Collectives` plus point-to-point calls (a fixed world's communicator only:
    a peer schedule drawn for one world means nothing in the next quorum)."""

    def send(self, t: torch.Tensor, dst: int, kind: str = "send") -> None: ...

    def recv_(self, t: torch.Tensor, src: int, kind: str = "recv") -> torch.Tensor: ...

    def exchange_(self, send: torch.Tensor, recv: torch.Tensor, peer: int,
                  kind: str = "exchange") -> torch.Tensor: ...


class Communicator:
    """Collectives on one process group, each on one contiguous tensor, all counted (it
    implements :class:`PointToPoint`)."""

    def __init__(
        self, group: dist.ProcessGroup | None = None, stats: CommStats | None = None,
        emulated: bool = True,
    ) -> None:
        self.group = group
        #: False: this communicator's calls ignore the emulated network (bookkeeping such as
        #: the training loop's metrics records, which are not an algorithm's traffic)
        self.emulated = emulated
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        # communicators of one algorithm on several subgroups share one CommStats
        self.stats = CommStats() if stats is None else stats
        #: True when the backend averages inside the collective (NCCL's AVG); gloo has no
        #: AVG, so an average is a sum and one division pass
        self.native_avg = _backend(group) == "nccl"
        #: the group's global ranks, in group-rank order (an emulated network prices them)
        self.ranks = (list(range(self.world_size)) if group is None
                      else dist.get_process_group_ranks(group))

    def _now(self) -> float:
        return _EMULATION[1].now() if _EMULATION is not None and self.emulated else 0.0

    def _emulate(self, op: str, nbytes: int, started: float, peers: Sequence[int] | None = None,
                 received: int | None = None) -> None:
        """Wait out the rest of the emulated time of ``op`` (see the module docstring);
        ``peers``: the global ranks of a point-to-point call's other end(s)."""
        if _EMULATION is None or not self.emulated:
            return
        model, clock = _EMULATION
        if peers is None:
            group: Sequence[int] = self.ranks
        else:
            me = self.ranks[self.rank]
            group = [me, *peers]
        _net.wait_for(model, op, nbytes, group, started, clock, received_bytes=received)

    def _check(self, t: torch.Tensor) -> None:
        if not t.is_contiguous():
            raise ValueError("Communicator operations take one contiguous tensor (a flat buffer)")

    def all_reduce_(
        self, t: torch.Tensor, op: str = "sum", kind: str = "allreduce", exact: bool = False
    ) -> torch.Tensor:
        """In-place allreduce of ``t`` (``op``: sum, avg, max, min).

        Under :func:`compress_payloads` a floating-point sum or avg goes through the
        compressor (:mod:`accord.comm.compress`; bytes counted as sent, each wire allreduce, or
        the all-gather of int8/int4/topk codes, under the emulated network) unless
        ``exact``: a caller whose maths needs the exact value (ACGA's sum that its
        coefficients are computed from) passes ``exact=True``;
        max and min, integer tensors, a world of one and communicators with
        ``emulated=False`` (bookkeeping) are never compressed. The compressor keeps state
        per call site: ``kind``, the size and the group's ranks."""
        self._check(t)
        comp = _COMPRESSOR
        if (comp is not None and not exact and self.emulated and op in ("sum", "avg")
                and t.is_floating_point() and self.world_size > 1):
            start = time.perf_counter()

            def reducer(x: torch.Tensor) -> None:
                began = self._now()
                dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
                self._emulate(_net.ALLREDUCE, _nbytes(x), began)

            def gather(x: torch.Tensor) -> torch.Tensor:
                # int8/int4/topk codes cannot be summed on the wire: every rank's, gathered
                began = self._now()
                rows = torch.empty(self.world_size, x.numel(), dtype=x.dtype, device=x.device)
                _all_gather_flat(rows.view(-1), x.reshape(-1), self.group)
                self._emulate(_net.ALLGATHER, _nbytes(x), began)
                return rows

            sent = comp.all_reduce_(t, reducer, op=op, world_size=self.world_size,
                                    key=f"{kind}:{t.numel()}:{','.join(map(str, self.ranks))}",
                                    gather=gather)
            self.stats.record(kind, sent, time.perf_counter() - start)
            return t
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                     "min": dist.ReduceOp.MIN, "avg": dist.ReduceOp.SUM}[op]
        native = op == "avg" and self.native_avg
        if native:
            reduce_op = dist.ReduceOp.AVG
        start, emulated = time.perf_counter(), self._now()
        if self.world_size > 1:
            dist.all_reduce(t, op=reduce_op, group=self.group)
        if op == "avg" and not native and self.world_size > 1:
            t.div_(self.world_size)
        self._emulate(_net.ALLREDUCE, _nbytes(t), emulated)
        self.stats.record(kind, _nbytes(t), time.perf_counter() - start)
        return t

    def all_reduce_async_(
        self, t: torch.Tensor, op: str = "sum", kind: str = "allreduce",
        compressed: bool = False,
    ) -> torch.futures.Future:
        """Start an in-place allreduce of ``t`` (``op``: sum or avg); the future gives ``t``
        once reduced. Used where communication overlaps computation (DDP communication
        hooks, the native path's buckets, streaming DiLoCo). ``avg`` divides before the
        collective (as DDP's own hook does; NCCL averages inside it). Counted when issued:
        the bytes, and as seconds the time the calling thread spent issuing it; the wait
        for completion is the caller's (and counted where the caller blocks on it).

        ``compressed=True`` sends ``t`` through the run's compressor, as
        :meth:`all_reduce_` would: int8, int4 and topk codes are encoded now (the error
        memory updated now), all-gathered in the background and decoded into ``t`` when the
        gather completes, with the same result bit for bit as the blocking call; the other
        schemes (bf16, fp16, powersgd) reduce before this returns (a completed future)."""
        self._check(t)
        if op not in ("sum", "avg"):
            raise ValueError(f"op: got {op!r}, allowed: 'sum', 'avg'")
        comp = _COMPRESSOR if compressed else None
        if (comp is not None and self.emulated and t.is_floating_point()
                and self.world_size > 1):
            if not comp.gathers(t):
                done = torch.futures.Future()
                done.set_result(self.all_reduce_(t, op=op, kind=kind))
                return done
            return self._gathered_async(comp, t, op, kind)
        start = time.perf_counter()
        if self.world_size == 1:
            done: torch.futures.Future = torch.futures.Future()
            done.set_result(t)
            self.stats.record(kind, _nbytes(t), time.perf_counter() - start)
            return done
        reduce_op = dist.ReduceOp.SUM
        if op == "avg":
            if self.native_avg:
                reduce_op = dist.ReduceOp.AVG
            else:
                t.div_(self.world_size)
        emulated = self._now()
        work = dist.all_reduce(t, op=reduce_op, group=self.group, async_op=True)
        if _EMULATION is None or not self.emulated:
            fut = work.get_future().then(_first)
        else:
            nbytes = _nbytes(t)

            def _done(f: torch.futures.Future) -> torch.Tensor:
                self._emulate(_net.ALLREDUCE, nbytes, emulated)
                return _first(f)

            fut = work.get_future().then(_done)
        self.stats.record(kind, _nbytes(t), time.perf_counter() - start)
        return fut

    def _gathered_async(self, comp: Compressor, t: torch.Tensor, op: str,
                        kind: str) -> torch.futures.Future:
        start, began = time.perf_counter(), self._now()
        mine = comp.encode_(t, f"{kind}:{t.numel()}:{','.join(map(str, self.ranks))}")
        rows = torch.empty(self.world_size, mine.numel(), dtype=mine.dtype, device=mine.device)
        work = _all_gather_flat(rows.view(-1), mine.reshape(-1), self.group, async_op=True)
        sent, world = _nbytes(mine), self.world_size
        result: torch.futures.Future = torch.futures.Future()

        def _finish() -> None:
            try:
                self._emulate(_net.ALLGATHER, sent, began)
                comp.combine_(t, rows, op, world)
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits
                result.set_exception(e)
            else:
                result.set_result(t)

        def _gathered(f: torch.futures.Future) -> None:
            try:
                f.value()
            except BaseException as e:  # noqa: BLE001 - the gather's own error
                result.set_exception(e)
                return
            # a gather that completed before this callback was attached runs it on the
            # issuing thread: the emulated wait and the decoding go to a thread of their
            # own, so the caller never waits for them here
            threading.Thread(target=_finish, name="accord-gathered", daemon=True).start()

        work.get_future().then(_gathered)
        self.stats.record(kind, sent, time.perf_counter() - start)
        return result

    def all_gather(self, t: torch.Tensor, kind: str = "allgather") -> torch.Tensor:
        """Gather ``t`` from every rank into a new tensor of shape ``(world_size, *t.shape)``."""
        self._check(t)
        out = torch.empty(self.world_size * t.numel(), dtype=t.dtype, device=t.device)
        start, emulated = time.perf_counter(), self._now()
        if self.world_size > 1:
            _all_gather_flat(out, t.reshape(-1), self.group)
        else:
            out.copy_(t.reshape(-1))
        self._emulate(_net.ALLGATHER, _nbytes(t), emulated)
        self.stats.record(kind, _nbytes(t), time.perf_counter() - start)
        return out.view(self.world_size, *t.shape)

    def broadcast_(self, t: torch.Tensor, src: int = 0, kind: str = "broadcast") -> torch.Tensor:
        """In-place broadcast from group rank ``src``; bytes count on the sender only."""
        self._check(t)
        start, emulated = time.perf_counter(), self._now()
        if self.world_size > 1:
            dist.broadcast(t, src=self.global_rank(src), group=self.group)
        self._emulate(_net.BROADCAST, _nbytes(t), emulated)  # every rank waits for the tree
        self.stats.record(kind, _nbytes(t) if self.rank == src else 0,
                          time.perf_counter() - start)
        return t


    # -- point to point ----------------------------------------------------------------
    def global_rank(self, rank: int) -> int:
        """The default-group rank of this group's rank ``rank``."""
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    def send(self, t: torch.Tensor, dst: int, kind: str = "send") -> None:
        """Blocking send to group rank ``dst``."""
        self._check(t)
        start, emulated = time.perf_counter(), self._now()
        dist.send(t, dst=self.global_rank(dst), group=self.group)
        self._emulate(_net.SEND, _nbytes(t), emulated, [self.global_rank(dst)])
        self.stats.record(kind, _nbytes(t), time.perf_counter() - start)

    def recv_(self, t: torch.Tensor, src: int, kind: str = "recv") -> torch.Tensor:
        """Blocking receive from group rank ``src`` into ``t`` (no bytes sent)."""
        self._check(t)
        start, emulated = time.perf_counter(), self._now()
        dist.recv(t, src=self.global_rank(src), group=self.group)
        self._emulate(_net.RECV, _nbytes(t), emulated, [self.global_rank(src)])
        self.stats.record(kind, 0, time.perf_counter() - start)
        return t

    def exchange_(
        self, send: torch.Tensor, recv: torch.Tensor, peer: int, kind: str = "exchange"
    ) -> torch.Tensor:
        """Send ``send`` to group rank ``peer`` while receiving its message into ``recv``.
        Both sides must call it with each other as ``peer``; deadlock-free."""
        self._check(send)
        self._check(recv)
        start, emulated = time.perf_counter(), self._now()
        ops = [dist.P2POp(dist.isend, send, self.global_rank(peer), self.group),
               dist.P2POp(dist.irecv, recv, self.global_rank(peer), self.group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        self._emulate(_net.EXCHANGE, _nbytes(send), emulated, [self.global_rank(peer)],
                      received=_nbytes(recv))
        self.stats.record(kind, _nbytes(send), time.perf_counter() - start)
        return recv


    def multi_exchange_(
        self,
        sends: Sequence[tuple[torch.Tensor, int]],
        recvs: Sequence[tuple[torch.Tensor, int]],
        kind: str = "exchange",
    ) -> None:
        """Post every send ``(tensor, dst)`` and receive ``(tensor, src)`` of one step in a
        single batch and wait for all of them: asymmetric patterns (i pulls from j while j
        pulls from k) cannot deadlock. Bytes: the payload this rank sends."""
        for t, _ in [*sends, *recvs]:
            self._check(t)
        start, emulated = time.perf_counter(), self._now()
        ops = [dist.P2POp(dist.isend, t, self.global_rank(dst), self.group) for t, dst in sends]
        ops += [dist.P2POp(dist.irecv, t, self.global_rank(src), self.group) for t, src in recvs]
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
            peers = sorted({self.global_rank(r) for _, r in [*sends, *recvs]})
            self._emulate(_net.MULTI_EXCHANGE, sum(_nbytes(t) for t, _ in sends), emulated,
                          peers, received=sum(_nbytes(t) for t, _ in recvs))
        self.stats.record(kind, sum(_nbytes(t) for t, _ in sends), time.perf_counter() - start)


class FlatBuffer:
    """One preallocated contiguous buffer mirroring a list of tensors of one dtype/device.

    The buffer lives on the tensors' device and has their dtype; ``split`` and the
    ``store_*`` methods also accept a buffer of another (wider) dtype with the same
    layout, which ``copy_`` rounds into the tensors.

    ``load_grads`` / ``load_values`` copy the tensors in, ``store_grads`` /
    ``store_values`` copy back; ``split`` gives the per-tensor views of a buffer.

    Gradients are zero-copy in steady state: ``store_grads()`` on the own buffer does not
    copy, it makes every ``.grad`` a view of the buffer (as DDP's
    ``gradient_as_bucket_view``). Autograd then accumulates the next backward pass into
    the buffer in place when the loop zeroes gradients with ``zero_grad(set_to_none=False)``
    (``accord train`` does), and ``load_grads()`` finds them already there; after
    ``zero_grad()`` (``set_to_none=True``, PyTorch's default) autograd allocates fresh
    gradients and ``load_grads()`` copies each one in once. The buffer keeps the last
    result until the next ``load_grads()`` either way, except that a
    ``zero_grad(set_to_none=False)`` zeroes it.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], extra: int = 0) -> None:
        self.tensors = list(tensors)
        if not self.tensors:
            raise ValueError("FlatBuffer needs at least one tensor")
        kinds = {(t.dtype, t.device) for t in self.tensors}
        if len(kinds) > 1:
            found = ", ".join(sorted(f"{d}@{v}" for d, v in kinds))
            raise ValueError(
                f"parameters must share one dtype and device for a flat buffer; found {found}"
            )
        t0 = self.tensors[0]
        self.numel = sum(t.numel() for t in self.tensors)
        # ``extra`` trailing slots carry scalars in the same collective as the tensors
        self.buffer = torch.zeros(self.numel + extra, dtype=t0.dtype, device=t0.device)
        self.sizes = [t.numel() for t in self.tensors]
        self.views = self.split(self.buffer)  # per-tensor views of the own buffer

    def new_buffer(self) -> torch.Tensor:
        return torch.zeros_like(self.buffer)

    def split(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Per-tensor views of another buffer with this layout."""
        chunks = buffer[: self.numel].split(self.sizes)
        return [v.view_as(t) for v, t in zip(chunks, self.tensors, strict=True)]

    def _views_of(self, buffer: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if buffer is None or buffer is self.buffer:
            return self.buffer, self.views
        return buffer, self.split(buffer)

    @staticmethod
    def _bound(grad: torch.Tensor | None, view: torch.Tensor) -> bool:
        """True if ``grad`` is ``view``'s memory (a gradient a previous store bound)."""
        return (grad is not None and grad.data_ptr() == view.data_ptr()
                and grad.shape == view.shape and grad.dtype == view.dtype
                and grad.numel() > 0)

    @torch.no_grad()
    def load_grads(self, buffer: torch.Tensor | None = None,
                   scale: float | None = None) -> torch.Tensor:
        """The tensors' ``.grad`` in the buffer (a missing grad counts as zero), times
        ``scale`` if given, in one pass: a gradient that already is a view of the buffer
        is scaled in place (or left alone), any other is copied (and scaled) in."""
        buf, views = self._views_of(buffer)
        for view, t in zip(views, self.tensors, strict=True):
            grad = t.grad
            if grad is None:
                view.zero_()
            elif self._bound(grad, view):
                if scale is not None:
                    view.mul_(scale)
            elif scale is not None:
                torch.mul(grad, scale, out=view)
            else:
                view.copy_(grad)
        return buf

    @torch.no_grad()
    def store_grads(self, buffer: torch.Tensor | None = None) -> None:
        """The buffer's values as the tensors' ``.grad``: on the own buffer each ``.grad``
        becomes a view of it (no copy); another buffer is copied (rounded) into them."""
        buf, views = self._views_of(buffer)
        own = buf is self.buffer
        for view, t in zip(views, self.tensors, strict=True):
            if own:
                if not self._bound(t.grad, view):
                    t.grad = view
            elif t.grad is None:
                t.grad = view.to(t.dtype, copy=True)
            else:
                t.grad.copy_(view)

    @torch.no_grad()
    def load_values(self, buffer: torch.Tensor | None = None) -> torch.Tensor:
        buf, views = self._views_of(buffer)
        for view, t in zip(views, self.tensors, strict=True):
            view.copy_(t)
        return buf

    @torch.no_grad()
    def store_values(self, buffer: torch.Tensor | None = None) -> None:
        _, views = self._views_of(buffer)
        for view, t in zip(views, self.tensors, strict=True):
            t.copy_(view)
