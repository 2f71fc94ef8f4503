"""Payload compression for sum/avg allreduces: half-width casts, PowerSGD, int8/int4, top-k.

A :class:`Compressor` turns one in-place allreduce of a flat tensor into one or two
allreduces (or one all-gather) of a smaller payload. It is written over primitives the
caller passes, so it knows nothing of process groups::

    reducer(x)   # in-place SUM allreduce of the contiguous tensor x over the group
    gather(x)    # all-gather of the 1-D uint8 tensor x: (world_size, x.numel()), row w from rank w
    nbytes = compressor.all_reduce_(t, reducer, gather=gather, op=op, world_size=N,
                                    key=f"{kind}:{t.numel()}")

``all_reduce_`` reduces ``t`` in place and returns the payload bytes this rank sent (on the
wire dtype, every attempt counted). Schemes (``--compress``):

* ``bf16``, ``fp16``: cast, SUM in 16 bits, cast back; fp16 carries a power-of-two scale
  per call site and redoes an overflowing call in float32. Error per element at most
  ``gamma_{N+1} sum_w |y_w| + N tiny / s`` (:func:`error_bound`).
* ``powersgd[:R]``: rank-R PowerSGD (Vogels, Karimireddy, Jaggi, NeurIPS 2019, arXiv
  1905.13727) of the buffer viewed as a near-square matrix, with *local* error feedback.
* ``int8``, ``int4``: nearest-rounded codes under one float32 scale per block of
  :data:`BLOCK` elements, error feedback, all-gathered and summed in float32 in rank order.
* ``topk[:F]``: SparseLoCo's codec (Sarfi et al., arXiv 2508.15706): per chunk of
  :data:`TOPK_CHUNK` the k largest entries as int16 indices and int8 values, plain error
  feedback.

Decisions: only ``sum``/``avg`` of model-size payloads are compressed (coefficients,
norms, weights and max/min stay exact, routed by the caller); error memories, PowerSGD's
warm start and fp16 scales are kept per call-site key and travel in ``state_dict()``.
The arithmetic of each scheme, the bound and the reasons: docs/design/compression.md."""

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
