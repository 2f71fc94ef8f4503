"""Payload compression for sum/avg allreduces: half-width casts and PowerSGD.

A :class:`Compressor` turns one in-place allreduce of a flat tensor into one or two
allreduces of a smaller payload. It is written over a *reduce primitive*::

    reducer(x)   # in-place SUM allreduce of the contiguous tensor x over the group,
                 # e.g. lambda x: dist.all_reduce(x, group=g); its return value is ignored

so it knows nothing of process groups, and the :class:`~accord.comm.Communicator` can call it
from ``all_reduce_``::

    nbytes = compressor.all_reduce_(t, reducer, op=op, world_size=N, key=f"{kind}:{t.numel()}")
    stats.record(kind, nbytes, seconds)

``all_reduce_`` reduces ``t`` in place (the result in ``t``'s dtype) and returns the payload
bytes this rank handed to ``reducer``: bytes as sent, on the wire dtype, summed over the
reductions the call made (a fallback counts both attempts). With one rank there is nothing
to send and the caller should not compress (PowerSGD would still replace ``t`` by its
approximation). One compressor serves one Communicator; calls from two threads (the
background exchange) must use different keys.

Schemes (``--compress``):

``none``
    one reduction of ``t`` as it is.

``bf16``, ``fp16``
    cast to 16 bits, reduce, cast back: half the bytes of float32. For ``avg`` the payload
    is divided by N *before* the cast (the sum of N payloads is then the mean: no growth
    of the range). The reduction adds 16-bit numbers in 16 bits (gloo's float16 and
    bfloat16 sums round every addition to the payload dtype), so there is no float32
    accumulation on the wire: that would need a reduce with a widening combine, or an
    all-gather of N payloads, which a SUM primitive does not give. We accept the rounding
    and bound it (below). ``fp16`` has 5 exponent bits (largest value 65504, smallest
    normal 2^-14), so it carries a power-of-two scale per call site: the payload is
    multiplied by ``2^e`` before the cast and divided after, ``e`` chosen from the previous
    result of that call site (identical on every rank, since every rank holds the same
    reduced result) to put its largest magnitude at ``2^(15 - h)``, ``h`` a headroom of
    ``4 + ceil(log2 N)`` binades for partial sums larger than the result (cancellation). The
    first call uses ``e = 0``. Overflow guard: after the reduction one max-abs of the
    (identical) result is read on the host; if it is not finite -- a payload element or a
    partial sum passed 65504 -- the call is redone in float32 (both reductions counted:
    2 + 4 bytes per element) and the result is the float32 one; the next call's scale comes
    from it, and if the overflow happened under a scale already set from a result, ``h``
    grows by 4 (capped at 30) for the calls after. So no inf is ever returned for finite
    inputs. The price of one scale per buffer: the elements more than about 29 - h binades
    below the largest fall under fp16's normal range and keep an absolute, not relative,
    accuracy (the ``tiny / s`` term of the bound below). ``bf16`` has float32's
    exponent range and needs neither scale nor guard (and makes no host read).

``powersgd`` (rank ``r``, default 4)
    Vogels, Karimireddy, Jaggi, "PowerSGD: Practical Low-Rank Gradient Compression for
    Distributed Optimization", NeurIPS 2019, arXiv 1905.13727; with error feedback.
    Why low rank rather than top-k: PowerSGD's payloads (P and Q) are dense and *summable*,
    so it runs on the same SUM allreduce as every other call, with a payload size fixed by
    the shape; top-k selects different coordinates on every rank, which a sum cannot merge:
    it needs an all-gather of values and indices (N times the received bytes, growing with
    N) and a primitive the Communicator's reduce path does not have.

    The flat buffer of n elements is viewed as a matrix of ``rows x cols``,
    ``cols = ceil(sqrt(n))``, ``rows = ceil(n / cols)``, zero-padded at the end. This ignores
    layer structure (the paper reshapes each layer's weight to ``out x in``): the
    Communicator sees only flat buffers, and a square view of a concatenation of layers is
    still a matrix whose leading singular directions carry most of a gradient's energy
    (neighbouring rows are neighbouring slices of the same layers); the squarest shape also
    gives the most compression, ``(rows + cols) r`` numbers for ``rows cols``. Error
    feedback corrects whatever the rank-r view misses over later steps. A buffer with
    ``(rows + cols) r >= n`` is sent uncompressed (as ``none``).

    One call on rank w, with error memory e_w and warm-start Q of this call site::

        M_w   = x_w + e_w                     (rows x cols, float32; float64 stays float64)
        P     = sum_w M_w Q                   reducer(P): rows x r
        P^    = orthonormal basis of P        reduced QR (Householder), identical on all ranks
        Q_w   = M_w^T P^                      this rank's own contribution
        e_w  <- M_w - P^ Q_w^T                local error memory (before Q is reduced)
        Q     = sum_w Q_w                     reducer(Q): cols x r
        out   = P^ Q^T  (sum),  P^ Q^T / N  (avg); Q is kept as the next call's warm start

    Bytes: ``(rows + cols) * r * 4`` per call (float32). Q starts from a Gaussian drawn from
    a generator seeded by ``seed`` and the call site's key, the same on every rank.

    Error feedback, the definition: the paper's Algorithm 2 memorises the *local* error
    ``e_w = Delta_w - decompress(compress(Delta_w))`` with ``decompress = P^ Q_w^T``, this
    rank's own contribution under the shared P^; that is what is implemented. The paper's
    released code and torch's ``powerSGD_hook`` subtract the *aggregated* approximation
    instead (``e_w = M_w - P^ Q^T / N``). The two give the same outputs in exact arithmetic:
    the output depends on the M_w only through their mean, and the mean of the memories is
    ``(I - P^ P^^T) mean_w M_w`` either way. They differ in what each rank carries: the
    local memory is an orthogonal projection of M_w, so ``||e_w|| <= ||M_w||``, while the
    aggregated form also accumulates the rank's deviation from the mean, ``M_w - mean M``,
    summed over all past steps (a random walk that grows without bound). With the local
    form, the identity that tests check is exact::

        sum_k out_k = sum_k (1/N) sum_w x_wk - (1/N) sum_w e_wK      (avg; sum: without 1/N)

    so the compressed sequence stays within ``||mean_w e_wK||`` of the true one, a bounded
    quantity, where without error feedback the gap is a sum of K residuals.

Half-width error bound (``bf16``, ``fp16``), elementwise, for N ranks contributing
``y_w`` (``x_w`` for sum, ``x_w / N`` for avg), ``u`` the unit roundoff (2^-8 bf16, 2^-11
fp16), ``gamma_k = k u / (1 - k u)``, ``s`` the fp16 scale, ``tiny`` the smallest
subnormal (2^-24 fp16, 2^-133 bf16)::

    |out - sum_w y_w| <= gamma_{N+1} sum_w |y_w|  +  N tiny / s            (error_bound())

Each y_w is rounded once to 16 bits (relative u, or absolute tiny/2 in the subnormal range),
and the reduction adds the N rounded values with N - 1 roundings, in any order (ring or
tree): the classical bound for recursive summation; the extra 1 in N+1 absorbs the float32
division by N. Casting back to float32 is exact; a narrower ``t`` rounds once more on the
copy. One tensor through one rank (a round trip) is within ``u |x|``. So bf16 keeps about
2-3 significant digits of a sum of N terms relative to ``sum |y_w|``, fp16 about 3 (for
N = 8: gamma_9 = 3.6% bf16, 0.44% fp16); a sum of terms that cancel loses relative accuracy
in proportion to ``sum |y_w| / |sum y_w|``.

What compression is for, and what it must not touch: model-size payloads, gradients and
parameters, reduced with op ``sum`` or ``avg`` (``all_reduce_`` refuses any other op). Small
numbers that decisions or weights are computed from must stay exact and the caller routes
them uncompressed: ACGA's coefficients (Gram matrix entries, norms), push-sum weights,
scalars appended to a buffer, and every max/min reduction.

State: the error memories, the warm-start Q and the fp16 scales live per call site, under the
key the caller passes (the Communicator: ``kind`` plus numel), in the compressor;
``state_dict()`` / ``load_state_dict()`` carry them through checkpoints. Q and the fp16
scale are computed from reduced results and so are identical on every rank (bit for bit
on one build and hardware; ranks on different BLAS builds could differ in QR's last bits);
the error memories are per rank.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any

import torch

Reducer = Callable[[torch.Tensor], object]

SCHEMES = ("none", "bf16", "fp16", "powersgd")
COMPRESSIBLE_OPS = ("sum", "avg")

_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: unit roundoff of round-to-nearest in each wire format
UNIT_ROUNDOFF = {"bf16": 2.0**-8, "fp16": 2.0**-11}
_FP16_TOP = 15  # 65504 < 2^16: results are scaled to at most 2^(15 - headroom)
_MAX_HEADROOM = 30
_MAX_SCALE_EXP = 60  # |e| <= 60 keeps 2^e and x * 2^e inside float32 for gradient-sized x


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # as accord.comm.accumulation_dtype; not imported: comm will import this module
    return torch.float64 if dtype == torch.float64 else torch.float32


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def matrix_shape(n: int) -> tuple[int, int]:
    """The ``(rows, cols)`` PowerSGD views a flat buffer of ``n`` elements as:
    ``cols = ceil(sqrt(n))``, ``rows = ceil(n / cols)`` (zero padding at the end)."""
    if n <= 0:
        return 0, 0
    cols = math.isqrt(n - 1) + 1
    return -(-n // cols), cols


def powersgd_compresses(n: int, rank: int) -> bool:
    """True when a buffer of ``n`` elements is sent as P and Q: ``(rows + cols) rank < n``."""
    rows, cols = matrix_shape(n)
    return n > 0 and (rows + cols) * rank < n


def error_bound(
    scheme: str, abs_sum: torch.Tensor | float, world_size: int, scale: float = 1.0
) -> torch.Tensor | float:
    """The documented elementwise bound on ``|out - sum_w y_w|`` of a ``bf16``/``fp16``
    reduction: ``gamma_{N+1} abs_sum + N tiny / scale``, ``abs_sum = sum_w |y_w|`` (the
    payloads before the cast: ``x_w`` for sum, ``x_w / N`` for avg)."""
    u = UNIT_ROUNDOFF[scheme]
    k = world_size + 1
    gamma = k * u / (1 - k * u)
    tiny = torch.finfo(_HALF[scheme]).smallest_normal * torch.finfo(_HALF[scheme]).eps
    return gamma * abs_sum + world_size * tiny / scale


def _orthonormalise(p: torch.Tensor) -> torch.Tensor:
    # Householder QR: orthonormal columns even when P is rank-deficient (a zero gradient
    # gives coordinate directions, not NaN); deterministic for identical input
    return torch.linalg.qr(p, mode="reduced").Q


class Compressor:
    """Compressed sum/avg allreduces over a SUM reduce primitive, with per-call-site state.

    ``scheme``: one of :data:`SCHEMES`. ``rank``: PowerSGD's rank r. ``seed``: PowerSGD's
    initial Q (the same on every rank). ``error_feedback``: PowerSGD's error memory (turning
    it off is for ablations and tests)."""

    def __init__(
        self, scheme: str, *, rank: int = 4, seed: int = 0, error_feedback: bool = True
    ) -> None:
        if scheme not in SCHEMES:
            raise ValueError(f"scheme: got {scheme!r}, allowed: {', '.join(SCHEMES)}")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank: got {rank!r}, allowed: an integer >= 1")
        self.scheme = scheme
        self.rank = rank
        self.seed = int(seed)
        self.error_feedback = bool(error_feedback)
        self._sites: dict[str, dict[str, Any]] = {}

    @classmethod
    def from_spec(cls, spec: str, **kwargs: Any) -> Compressor:
        """``"bf16"``, ``"fp16"``, ``"powersgd"``, ``"powersgd:8"`` (rank 8), ``"none"``."""
        name, _, arg = spec.partition(":")
        if arg:
            if name != "powersgd" or not arg.isdigit():
                raise ValueError(f"compress: got {spec!r}, allowed: {', '.join(SCHEMES)}, "
                                 "powersgd:RANK")
            kwargs["rank"] = int(arg)
        return cls(name, **kwargs)

    def __repr__(self) -> str:
        extra = f", rank={self.rank}" if self.scheme == "powersgd" else ""
        return f"Compressor({self.scheme!r}{extra})"

    # -- the reduction -----------------------------------------------------------------
    @torch.no_grad()
    def all_reduce_(
        self, t: torch.Tensor, reducer: Reducer, *, op: str = "sum", world_size: int,
        key: str = "allreduce",
    ) -> int:
        """Reduce ``t`` in place over the ranks (``op``: sum or avg) through ``reducer``, an
        in-place SUM allreduce; returns the payload bytes this rank handed to ``reducer``.
        Every rank must make the same calls with the same ``key`` and numel."""
        if op not in COMPRESSIBLE_OPS:
            raise ValueError(f"op: got {op!r}, allowed: 'sum', 'avg' (max/min stay exact)")
        if not t.is_floating_point():
            raise ValueError(f"compression takes a floating-point tensor, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError("compression takes one contiguous tensor (a flat buffer)")
        if world_size < 1:
            raise ValueError(f"world_size: got {world_size}, allowed: >= 1")
        if self.scheme in _HALF:
            return self._half(t, reducer, op, world_size, key)
        if self.scheme == "powersgd" and powersgd_compresses(t.numel(), self.rank):
            return self._powersgd(t, reducer, op, world_size, key)
        return _plain(t, reducer, op, world_size)

    def _site(self, key: str, numel: int) -> dict[str, Any]:
        site = self._sites.setdefault(key, {"numel": numel})
        if site["numel"] != numel:
            raise ValueError(f"call site {key!r} had {site['numel']} elements, now {numel}: "
                             "one key per buffer")
        return site

    def _half(self, t: torch.Tensor, reducer: Reducer, op: str, world: int, key: str) -> int:
        wide = _accumulation_dtype(t.dtype)
        scale = 1.0
        if self.scheme == "fp16":
            site = self._site(key, t.numel())
            site.setdefault("headroom", 4 + math.ceil(math.log2(world)))
            scale = 2.0 ** site.get("scale_exp", 0)
        factor = scale / world if op == "avg" else scale
        payload = torch.mul(t.to(wide), factor).to(_HALF[self.scheme])
        reducer(payload)
        sent = _nbytes(payload)
        if self.scheme == "bf16":
            t.copy_(payload)
            return sent
        # one host read: the max of the reduced payload, identical on every rank, both
        # detects overflow and sets the next scale, so every rank decides alike
        peak = float(payload.abs().max()) if payload.numel() else 0.0
        if math.isfinite(peak):
            t.copy_(payload.to(wide).div_(scale))
            result_peak = peak / scale
        else:
            exact = t.to(wide, copy=True)
            reducer(exact)
            sent += _nbytes(exact)
            if op == "avg":
                exact.div_(world)
            t.copy_(exact)
            if "scale_exp" in site:  # a scale from a previous result was not low enough
                site["headroom"] = min(site["headroom"] + 4, _MAX_HEADROOM)
            result_peak = float(exact.abs().max())
        if result_peak > 0 and math.isfinite(result_peak):
            exp = math.floor(math.log2(2.0 ** (_FP16_TOP - site["headroom"]) / result_peak))
            site["scale_exp"] = max(-_MAX_SCALE_EXP, min(_MAX_SCALE_EXP, exp))
        return sent

    def _powersgd(self, t: torch.Tensor, reducer: Reducer, op: str, world: int,
                  key: str) -> int:
        n = t.numel()
        rows, cols = matrix_shape(n)
        wide = _accumulation_dtype(t.dtype)
        site = self._site(key, n)
        q = site.get("q")
        if q is None:
            gen = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
            # the same on every rank: a seeded CPU generator, then moved to t's device
            q = torch.randn(cols, self.rank, generator=gen)  # host: seeded, moved below
        q = q.to(device=t.device, dtype=wide)
        m = torch.zeros(rows * cols, dtype=wide, device=t.device)
        m[:n].copy_(t)
        error = site.get("error")
        if self.error_feedback and error is not None:
            m[:n].add_(error.to(device=t.device, dtype=wide))
        mat = m.view(rows, cols)
        p = (mat @ q).contiguous()
        reducer(p)
        p = _orthonormalise(p)
        q = (mat.t() @ p).contiguous()  # this rank's own Q_w
        if self.error_feedback:
            site["error"] = m[:n] - (p @ q.t()).view(-1)[:n]
        reducer(q)
        out = (p @ q.t()).view(-1)[:n]
        if op == "avg":
            out.div_(world)
        t.copy_(out)
        site["q"] = q
        return _nbytes(p) + _nbytes(q)

    # -- state --------------------------------------------------------------------------
    def error_memory(self, key: str) -> torch.Tensor | None:
        """PowerSGD's error memory e of a call site (None before its first compressed call)."""
        return self._sites.get(key, {}).get("error")

    def fp16_scale(self, key: str) -> float:
        """The power-of-two scale the next ``fp16`` call of this call site will use."""
        return 2.0 ** self._sites.get(key, {}).get("scale_exp", 0)

    def state_dict(self) -> dict[str, Any]:
        """Scheme, rank and per-call-site state (tensors by reference, as torch's own
        state dicts; the compressor replaces them on each call, never mutates them)."""
        return {"scheme": self.scheme, "rank": self.rank, "seed": self.seed,
                "error_feedback": self.error_feedback,
                "sites": {k: dict(v) for k, v in self._sites.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("scheme", "rank"):
            if state[name] != getattr(self, name):
                raise ValueError(f"checkpoint compression {name} {state[name]!r} != "
                                 f"{getattr(self, name)!r} of this run")
        self.seed = int(state["seed"])
        self.error_feedback = bool(state["error_feedback"])
        self._sites = {k: dict(v) for k, v in state["sites"].items()}


def _plain(t: torch.Tensor, reducer: Reducer, op: str, world: int) -> int:
    reducer(t)
    if op == "avg":
        t.div_(world)
    return _nbytes(t)
