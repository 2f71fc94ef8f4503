"""Payload compression for sum/avg allreduces: half-width casts, PowerSGD, int8/int4, top-k.

A :class:`Compressor` turns one in-place allreduce of a flat tensor into one or two
allreduces of a smaller payload. It is written over a *reduce primitive*::

    reducer(x)   # in-place SUM allreduce of the contiguous tensor x over the group,
                 # e.g. lambda x: dist.all_reduce(x, group=g); its return value is ignored

and, for the schemes whose wire codes cannot be summed (int8, int4, topk), a *gather
primitive*::

    gather(x)    # all-gather of the contiguous 1-D tensor x (uint8 here) over the group:
                 # returns a (world_size, x.numel()) tensor, row w from group rank w

so it knows nothing of process groups, and the :class:`~accord.comm.Communicator` can call it
from ``all_reduce_``::

    nbytes = compressor.all_reduce_(t, reducer, gather=gather, op=op, world_size=N,
                                    key=f"{kind}:{t.numel()}")
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

``int8``, ``int4`` (blocks of 128 elements, nearest rounding, error feedback)
    Each block of ``BLOCK = 128`` consecutive elements of the error-compensated payload
    ``v = x + e`` gets one float32 scale ``s = max_block |v| / L`` (``L = 127`` int8,
    ``L = 7`` int4: symmetric, zero exact) and codes ``q = round(v / s)`` in ``[-L, L]``;
    int4 packs two codes per byte (``q + 8`` in the low, then the high nibble). Why 128:
    the scale costs ``4 / 128`` bytes per element (3% of the int8 codes, 6% of the int4
    ones) and an outlier coarsens only its own 127 neighbours (a block lies within one
    layer for all but the layers' seams of the flat buffer). Why nearest, not stochastic
    rounding: stochastic rounding is unbiased, but error feedback already returns the
    bias (the residual is sent at the next call), so unbiasedness buys nothing here,
    while it doubles the worst-case error (``s`` instead of ``s / 2``), adds variance and
    needs a per-(seed, rank, step) generator in the state; nearest rounding is
    deterministic with no state but the residual. Round trip, elementwise::

        |v - s q| <= s / 2   (plus the float32 rounding of the product, relative 2^-24)

    Wire: the codes are not summable (each rank has its own scales; a sum of int8 codes
    overflows), so instead of the SUM reducer these schemes use an *all-gather* primitive
    (``gather(x)``, below) on one uint8 buffer per call: every rank's scales and codes
    (``4 ceil(n / 128)`` + ``n`` bytes int8, + ``ceil(n / 2)`` int4), decoded on every
    rank and summed in float32 (float64 payloads: float64) in rank order 0..N-1, so
    every rank gets the same result bit for bit (fp32 accumulation: nothing is added in
    8 or 4 bits). Both gloo and nccl have an all-gather of uint8; gloo's reduce-scatter
    does not cover every dtype, and a reduce-scatter + all-gather of *quantised* shards
    would round twice (the reduced shard is quantised again by its owner), with the second
    residual owned by one rank. The price: each rank receives N - 1 payloads, so the
    traffic per rank grows with N where a ring allreduce's does not; at N = 8 an int8
    all-gather moves about the bytes of a float32 ring allreduce (7 x 1.03 vs 2 x 7/8 x 4),
    int4 about half of them. Bytes counted: this rank's buffer, the payload it hands to the
    all-gather (as :meth:`accord.comm.Communicator.all_gather` counts).

``topk[:FRACTION]`` (default 1/64, error feedback)
    The sparse + quantised codec of SparseLoCo (Sarfi, Therien, Lidin, Belilovsky,
    "Communication Efficient LLM Pre-training with SparseLoCo", arXiv 2508.15706): the
    error-compensated payload ``v = x + e`` is cut into chunks of ``TOPK_CHUNK = 4096``
    elements (the whole buffer if shorter); each chunk sends its ``k = max(1,
    round(FRACTION chunk))`` entries of largest magnitude, as chunk-local int16 indices and
    int8 values under one float32 scale per chunk (``s = max_chunk |v| / 127``); the rest,
    and the rounding of what is sent, stays in ``e`` for the next call. A fixed k per
    chunk makes every rank's buffer the same size, which an all-gather needs, and bounds
    the indices to 16 bits. Every rank scatter-adds every rank's values into a float32
    vector in rank order (as above). Differences from the paper, and why: int8 values
    where the paper uses 2 bits (the indices, 2 bytes, dominate the 3 bytes per kept
    entry; 2-bit values would save a quarter of the bytes for a 40x coarser value), and
    plain error feedback (``e <- v - sent``) where the paper decays it (``e <- beta e +
    Delta``, beta < 1, which also stands in for the outer momentum): the plain form keeps
    the telescoping identity below exact and leaves momentum to the algorithm (DiLoCo's
    outer Nesterov). Round trip: ``|v - decoded| <= s / 2`` on the kept entries, and a
    dropped entry is at most the chunk's k-th largest magnitude. Bytes: ``ceil(n / c) (4 +
    3 k)``, ``c`` the chunk.

    ``int8``, ``int4`` and ``topk`` send a buffer whose coded size would not be smaller
    than its plain one (a handful of elements) uncompressed, as ``none``. Their error
    memory ``e_w`` is this rank's residual ``v_w - decoded(v_w)``, so the identity
    PowerSGD's section states holds for them too (``sum_k out_k = sum_k mean_w x_wk -
    mean_w e_wK``, avg): the compressed sequence stays within one call's error of the
    true one. Like PowerSGD they suit gradients (the outer gradient of DiLoCo, gradient
    averaging), not parameters: the error of a block scale is relative to the block's
    largest *parameter*, it does not shrink as training converges, and local SGD with its
    average sent as a compressed difference from the last synchronised model is DiLoCo
    with ``outer_lr = 1``, ``outer_momentum = 0``.

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
``state_dict()`` / ``load_state_dict()`` carry them through checkpoints (the int8, int4 and
topk error memories alike, under ``"error"``). Q and the fp16
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
Gatherer = Callable[[torch.Tensor], torch.Tensor]

SCHEMES = ("none", "bf16", "fp16", "powersgd", "int8", "int4", "topk")
#: the schemes whose payload must be a gradient (lossy with error feedback): the others
#: may also round parameters
GRADIENT_SCHEMES = ("powersgd", "int8", "int4", "topk")
#: the schemes sent by all-gather (wire codes that a sum cannot merge)
GATHERED_SCHEMES = ("int8", "int4", "topk")
COMPRESSIBLE_OPS = ("sum", "avg")

#: elements per float32 scale of int8/int4
BLOCK = 128
#: the largest code of each block quantiser (symmetric: codes in [-L, L])
LEVELS = {"int8": 127, "int4": 7}
#: elements per top-k chunk (chunk-local indices fit in int16)
TOPK_CHUNK = 4096
TOPK_FRACTION = 1 / 64

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


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def _from_bytes(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # a copy: a slice of a gathered row may sit at an offset the wider dtype cannot view
    return b.clone().view(dtype)


def coded_bytes(scheme: str, n: int, fraction: float = TOPK_FRACTION) -> int:
    """The bytes one rank sends for a buffer of ``n`` elements under ``int8``, ``int4``
    (``4 ceil(n/128)`` of scales + ``n`` or ``ceil(n/2)`` of codes) or ``topk``
    (``ceil(n/c) (4 + 3k)``, ``c = min(4096, n)``, ``k = max(1, round(fraction c))``)."""
    if scheme == "topk":
        chunk, k = topk_shape(n, fraction)
        return -(-n // chunk) * (4 + 3 * k) if n else 0
    blocks = -(-n // BLOCK)
    return 4 * blocks + (n if scheme == "int8" else -(-n // 2))


def topk_shape(n: int, fraction: float = TOPK_FRACTION) -> tuple[int, int]:
    """``(chunk, k)`` of the top-k codec on a buffer of ``n`` elements."""
    chunk = max(1, min(TOPK_CHUNK, n))
    return chunk, max(1, min(chunk, round(fraction * chunk)))


def encode(scheme: str, v: torch.Tensor, fraction: float = TOPK_FRACTION) -> torch.Tensor:
    """The uint8 wire buffer of the 1-D float tensor ``v`` under ``int8``, ``int4`` or
    ``topk`` (layout: float32 scales, then the int4/int8 codes, or for topk the scales,
    int16 chunk-local indices and int8 values), on ``v``'s device."""
    n = v.numel()
    if scheme == "topk":
        return _encode_topk(v, fraction)
    levels = LEVELS[scheme]
    blocks = -(-n // BLOCK)
    padded = torch.zeros(blocks * BLOCK, dtype=v.dtype, device=v.device)
    padded[:n].copy_(v)
    view = padded.view(blocks, BLOCK)
    scales = (view.abs().amax(dim=1) / levels).float()
    codes = _quantise(view, scales, levels).view(-1)[:n]
    if scheme == "int4":
        nibbles = torch.zeros(blocks * BLOCK + 1, dtype=torch.uint8, device=v.device)
        nibbles[:n].copy_(codes + 8)  # offset binary 1..15: int8 -> uint8 without wrap
        pairs = nibbles[: 2 * (-(-n // 2))].view(-1, 2)
        body = pairs[:, 0] | (pairs[:, 1] << 4)
    else:
        body = codes.view(torch.uint8)
    return torch.cat([_as_bytes(scales), body])


def _quantise(values: torch.Tensor, scales: torch.Tensor, levels: int) -> torch.Tensor:
    """int8 codes ``round(values / s)`` in ``[-levels, levels]``, one scale per row
    (a zero scale: a zero row, codes 0)."""
    s = scales.to(values.dtype)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    # the clamp only catches a quotient a float32-rounded scale pushed past the top code
    return torch.round(values / safe[:, None]).clamp_(-levels, levels).to(torch.int8)


def _encode_topk(v: torch.Tensor, fraction: float) -> torch.Tensor:
    n = v.numel()
    chunk, k = topk_shape(n, fraction)
    chunks = -(-n // chunk)
    padded = torch.zeros(chunks * chunk, dtype=v.dtype, device=v.device)
    padded[:n].copy_(v)
    view = padded.view(chunks, chunk)
    index = view.abs().topk(k, dim=1, sorted=False).indices
    picked = view.gather(1, index)
    scales = (picked.abs().amax(dim=1) / LEVELS["int8"]).float()
    codes = _quantise(picked, scales, LEVELS["int8"])
    return torch.cat([_as_bytes(scales), _as_bytes(index.to(torch.int16)),
                      _as_bytes(codes)])


def decode(scheme: str, buf: torch.Tensor, n: int, dtype: torch.dtype = torch.float32,
           fraction: float = TOPK_FRACTION) -> torch.Tensor:
    """The ``n`` values of a wire buffer of :func:`encode`, in ``dtype``, on its device."""
    if scheme == "topk":
        chunk, k = topk_shape(n, fraction)
        chunks = -(-n // chunk)
        scales = _from_bytes(buf[: 4 * chunks], torch.float32).to(dtype)
        at = 4 * chunks
        index = _from_bytes(buf[at: at + 2 * chunks * k], torch.int16).view(chunks, k)
        at += 2 * chunks * k
        codes = buf[at: at + chunks * k].view(torch.int8).view(chunks, k)
        out = torch.zeros(chunks, chunk, dtype=dtype, device=buf.device)
        # indices are distinct within a chunk: the scatter has no collisions
        out.scatter_(1, index.long(), codes.to(dtype) * scales[:, None])
        return out.view(-1)[:n]
    blocks = -(-n // BLOCK)
    scales = _from_bytes(buf[: 4 * blocks], torch.float32).to(dtype)
    body = buf[4 * blocks:]
    if scheme == "int4":
        pairs = torch.stack([body & 15, body >> 4], dim=1).view(-1)[:n]
        codes = pairs.to(torch.int8) - 8
    else:
        codes = body[:n].view(torch.int8)
    out = torch.zeros(blocks * BLOCK, dtype=dtype, device=buf.device)
    out[:n].copy_(codes)
    return out.view(blocks, BLOCK).mul_(scales[:, None]).view(-1)[:n]


def _orthonormalise(p: torch.Tensor) -> torch.Tensor:
    # Householder QR: orthonormal columns even when P is rank-deficient (a zero gradient
    # gives coordinate directions, not NaN); deterministic for identical input
    return torch.linalg.qr(p, mode="reduced").Q


class Compressor:
    """Compressed sum/avg allreduces over a SUM reduce primitive, with per-call-site state.

    ``scheme``: one of :data:`SCHEMES`. ``rank``: PowerSGD's rank r. ``seed``: PowerSGD's
    initial Q (the same on every rank). ``fraction``: the share of entries ``topk`` sends.
    ``error_feedback``: the error memory of PowerSGD, int8, int4 and topk (turning it off
    is for ablations and tests)."""

    def __init__(
        self, scheme: str, *, rank: int = 4, seed: int = 0, error_feedback: bool = True,
        fraction: float = TOPK_FRACTION,
    ) -> None:
        if scheme not in SCHEMES:
            raise ValueError(f"scheme: got {scheme!r}, allowed: {', '.join(SCHEMES)}")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank: got {rank!r}, allowed: an integer >= 1")
        if not (isinstance(fraction, float | int) and 0 < fraction <= 1):
            raise ValueError(f"fraction: got {fraction!r}, allowed: a number in (0, 1]")
        self.scheme = scheme
        self.rank = rank
        self.fraction = float(fraction)
        self.seed = int(seed)
        self.error_feedback = bool(error_feedback)
        self._sites: dict[str, dict[str, Any]] = {}

    @classmethod
    def from_spec(cls, spec: str, **kwargs: Any) -> Compressor:
        """``"bf16"``, ``"fp16"``, ``"powersgd"``, ``"powersgd:8"`` (rank 8), ``"int8"``,
        ``"int4"``, ``"topk"``, ``"topk:0.02"`` (2% of the entries), ``"none"``."""
        name, _, arg = spec.partition(":")
        if arg:
            if name == "powersgd" and arg.isdigit():
                kwargs["rank"] = int(arg)
            elif name == "topk" and _fraction(arg) is not None:
                kwargs["fraction"] = _fraction(arg)
            else:
                raise ValueError(f"compress: got {spec!r}, allowed: {', '.join(SCHEMES)}, "
                                 "powersgd:RANK, topk:FRACTION")
        return cls(name, **kwargs)

    def __repr__(self) -> str:
        extra = (f", rank={self.rank}" if self.scheme == "powersgd" else
                 f", fraction={self.fraction}" if self.scheme == "topk" else "")
        return f"Compressor({self.scheme!r}{extra})"

    # -- the reduction -----------------------------------------------------------------
    @torch.no_grad()
    def all_reduce_(
        self, t: torch.Tensor, reducer: Reducer, *, op: str = "sum", world_size: int,
        key: str = "allreduce", gather: Gatherer | None = None,
    ) -> int:
        """Reduce ``t`` in place over the ranks (``op``: sum or avg) through ``reducer``, an
        in-place SUM allreduce, or for int8/int4/topk through ``gather``, an all-gather;
        returns the payload bytes this rank handed to them. Every rank must make the same
        calls with the same ``key`` and numel."""
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
        if self.gathers(t):
            if gather is None:
                raise ValueError(f"{self.scheme} needs a gather primitive (an all-gather)")
            return self._gathered(t, gather, op, world_size, key)
        return _plain(t, reducer, op, world_size)

    def gathers(self, t: torch.Tensor) -> bool:
        """True when :meth:`all_reduce_` sends ``t`` as gathered codes (int8, int4, topk,
        and the code is smaller than ``t``): then :meth:`encode_` and :meth:`combine_` are
        its two halves, and the all-gather between them may run in the background."""
        return (self.scheme in GATHERED_SCHEMES and t.is_floating_point()
                and coded_bytes(self.scheme, t.numel(), self.fraction) < _nbytes(t))

    def encode_(self, t: torch.Tensor, key: str) -> torch.Tensor:
        """The first half of a gathered reduce: this rank's code of ``t`` plus its error
        memory at ``key``, the memory updated to what the code leaves out."""
        n = t.numel()
        wide = _accumulation_dtype(t.dtype)
        site = self._site(key, n)
        v = t.to(wide, copy=True)
        error = site.get("error")
        if self.error_feedback and error is not None:
            v.add_(error.to(device=t.device, dtype=wide))
        mine = encode(self.scheme, v, self.fraction)
        if self.error_feedback:
            site["error"] = v.sub_(decode(self.scheme, mine, n, wide, self.fraction))
        return mine

    def combine_(self, t: torch.Tensor, rows: torch.Tensor, op: str, world: int) -> None:
        """The second half: ``t`` <- the sum (``op="avg"``: the mean) of every rank's
        decoded code, ``rows`` the gathered codes in rank order (touches no state, so it may
        run on the thread that completes the all-gather)."""
        n = t.numel()
        wide = _accumulation_dtype(t.dtype)
        out = torch.zeros(n, dtype=wide, device=t.device)
        for row in rows:  # in rank order: the same sum, bit for bit, on every rank
            out.add_(decode(self.scheme, row, n, wide, self.fraction))
        if op == "avg":
            out.div_(world)
        t.copy_(out)

    def _gathered(self, t: torch.Tensor, gather: Gatherer, op: str, world: int,
                  key: str) -> int:
        mine = self.encode_(t, key)
        self.combine_(t, gather(mine), op, world)
        return _nbytes(mine)

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
        """The error memory e of a call site under powersgd, int8, int4 or topk (None before
        its first compressed call)."""
        return self._sites.get(key, {}).get("error")

    def fp16_scale(self, key: str) -> float:
        """The power-of-two scale the next ``fp16`` call of this call site will use."""
        return 2.0 ** self._sites.get(key, {}).get("scale_exp", 0)

    def state_dict(self) -> dict[str, Any]:
        """Scheme, rank and per-call-site state (tensors by reference, as torch's own
        state dicts; the compressor replaces them on each call, never mutates them)."""
        return {"scheme": self.scheme, "rank": self.rank, "fraction": self.fraction,
                "seed": self.seed, "error_feedback": self.error_feedback,
                "sites": {k: dict(v) for k, v in self._sites.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # checkpoints written before topk existed have no fraction: they cannot be topk's
        state = {"fraction": TOPK_FRACTION, **state}
        for name in ("scheme", "rank", "fraction"):
            if state[name] != getattr(self, name):
                raise ValueError(f"checkpoint compression {name} {state[name]!r} != "
                                 f"{getattr(self, name)!r} of this run")
        self.seed = int(state["seed"])
        self.error_feedback = bool(state["error_feedback"])
        self._sites = {k: dict(v) for k, v in state["sites"].items()}


def _fraction(text: str) -> float | None:
    """The number in (0, 1] that ``text`` spells, else None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0 < value <= 1 else None


def _plain(t: torch.Tensor, reducer: Reducer, op: str, world: int) -> int:
    reducer(t)
    if op == "avg":
        t.div_(world)
    return _nbytes(t)
