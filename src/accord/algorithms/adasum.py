"""AdaSum: adaptive summation of worker gradients.

Paper: Maleki et al., "Scaling Distributed Training with Adaptive Summation", arXiv
2006.02924 (MLSys 2021). Also Horovod's ``hvd.DistributedOptimizer(..., op=hvd.Adasum)``.

Pair rule (a, b two gradients; per parameter tensor by default)::

    Adasum(a, b) = (1 - <a,b> / (2 ||a||^2)) a + (1 - <a,b> / (2 ||b||^2)) b

A zero vector contributes nothing. Reduction over N workers, P the largest power of two
<= N, M = N - P::

    fold:      ranks r >= P send g_r to r - P, which sets  v_{r-P} = Adasum(g_{r-P}, g_r)
    doubling:  for k = 0 .. log2(P) - 1, rank r < P and q = r XOR 2^k exchange and set
               v = Adasum(v_min(r,q), v_max(r,q))
    unfold:    ranks r < M send the result back to r + P;  d written into every p.grad

(``adasum_tree`` computes the same nesting in one process.) Hook: ``after_backward``.
Communication per step: log2(P) model-size ``exchange`` calls per rank r < P, plus one
``send``/``recv`` for folded ranks.

Decisions (in full: docs/algorithms/adasum.md): any world size (extra ranks folded in
first, so the tree, and the result, depend on the rank numbering); whole vectors at every
level, not Horovod's vector halving; bit-identical partners through a fixed-order dot
product (``_row_sums``); ``per_layer`` default True; dots and squared norms accumulated in
float64 (tiny gradients are combined, not added); no host sync; no state."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..comm import FlatBuffer
from ..core import Aggregator, Hyper, StepContext
from . import register

# ---------------------------------------------------------------------------------------
# Pure maths (no process group)
# ---------------------------------------------------------------------------------------

_CHUNK = 1024
# elements per block of float64 products: bounds the temporaries to 3 * 8 * _BLOCK bytes
# whatever the tensor size; a multiple of _CHUNK, so blocking leaves the order unchanged
_BLOCK = 256 * _CHUNK


def _row_sums(x: torch.Tensor) -> torch.Tensor:
    """Sums along dim 1 of a (K, n) float tensor with unit stride in dim 1.

    The summation order depends on n only: chunks of ``_CHUNK`` consecutive elements are
    summed first, then the chunk sums, recursively. Every reduction torch performs here
    either has fewer than its parallel grain size of elements or several outputs (it then
    parallelises over outputs), so no single sum is split across threads.
    """
    while x.shape[1] > _CHUNK:
        x = _chunk_sums(x)
    return x.sum(dim=1)


def _chunk_sums(x: torch.Tensor) -> torch.Tensor:
    """(K, n) -> (K, ceil(n / _CHUNK)): sums of consecutive chunks, the last one partial."""
    k, n = x.shape
    full = n - n % _CHUNK
    parts = x[:, :full].reshape(k, full // _CHUNK, _CHUNK).sum(dim=2)
    if full < n:
        parts = torch.cat([parts, x[:, full:].sum(dim=1, keepdim=True)], dim=1)
    return parts


def _check_segments(numel: int, segments: Sequence[int] | None) -> list[int]:
    if segments is None:
        return [numel]
    sizes = [int(s) for s in segments]
    if any(s < 0 for s in sizes) or sum(sizes) != numel:
        raise ValueError(
            f"segments: got sizes summing to {sum(sizes)}, need non-negative sizes summing to "
            f"the vector length {numel}"
        )
    return sizes


def _products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(3, n) float64: a*b, a*a, b*b elementwise (exact for fp32/bf16/fp16 inputs)."""
    x, y = a.double(), b.double()
    prods = torch.empty(3, x.numel(), dtype=torch.float64, device=x.device)
    torch.mul(x, y, out=prods[0])
    torch.mul(x, x, out=prods[1])
    torch.mul(y, y, out=prods[2])
    return prods


def _piece_sums(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(<a,b>, ||a||^2, ||b||^2) of two flat pieces, float64, in the order of ``_row_sums``
    on the whole piece, computed block by block."""
    n = a.numel()
    if n <= _BLOCK:
        return _row_sums(_products(a, b))
    parts = torch.cat([_chunk_sums(_products(a[i:i + _BLOCK], b[i:i + _BLOCK]))
                       for i in range(0, n, _BLOCK)], dim=1)
    return _row_sums(parts)


def _pair_sums(
    a: torch.Tensor, b: torch.Tensor, sizes: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-segment <a,b>, ||a||^2, ||b||^2 in float64, each of shape (L,), reproducibly."""
    af, bf = a.reshape(-1), b.reshape(-1)
    sums = torch.stack([_piece_sums(x, y)
                        for x, y in zip(af.split(sizes), bf.split(sizes), strict=True)])
    dot, na, nb = sums.unbind(dim=1)  # (L, 3) -> three (L,)
    return dot, na, nb


def _coefficients(
    dot: torch.Tensor, na: torch.Tensor, nb: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # A zero piece gets coefficient 1: it adds nothing, and the other piece's coefficient
    # is then exactly 1 (its dot is 0). Only a float64 piece can have a squared norm that
    # underflows to zero (elements below about 1e-154); it is added, not dropped.
    one = torch.ones_like(dot)
    c_a = torch.where(na > 0, 1.0 - dot / (2.0 * na), one)
    c_b = torch.where(nb > 0, 1.0 - dot / (2.0 * nb), one)
    return c_a, c_b


def adasum_coefficients(
    a: torch.Tensor, b: torch.Tensor, segments: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-segment coefficients (c_a, c_b), float64 tensors of shape (L,), of the pair rule.

    ``segments`` are the sizes of consecutive pieces of the flat vectors (one per
    parameter tensor); None means the whole vector is one piece. Where a (or b) is zero,
    both coefficients are 1, so the other passes through unchanged.
    """
    if a.shape != b.shape:
        raise ValueError(f"adasum: vectors of different shapes {tuple(a.shape)}, {tuple(b.shape)}")
    return _coefficients(*_pair_sums(a, b, _check_segments(a.numel(), segments)))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 vectors, float32 for every narrower float."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _combine(
    a: torch.Tensor,
    b: torch.Tensor,
    c_a: torch.Tensor,
    c_b: torch.Tensor,
    sizes: list[int],
    out: torch.Tensor | None,
) -> torch.Tensor:
    cd = _compute_dtype(a.dtype)
    c_a, c_b = c_a.to(cd), c_b.to(cd)
    if out is None:
        out = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    pieces = zip(a.reshape(-1).split(sizes), b.reshape(-1).split(sizes), c_a.unbind(),
                 c_b.unbind(), out.view(-1).split(sizes), strict=True)
    for x, y, ca, cb, dst in pieces:
        # separate multiplies and an add (no fused multiply-add), each exactly rounded, so
        # the bits do not depend on which elements a vectorised loop handles. The piece is
        # formed before it is written, and ``out`` (which may be a or b) has the same
        # layout, so no later piece reads what an earlier one wrote.
        dst.copy_(x.to(cd) * ca + y.to(cd) * cb)
    return out


def adasum_pair(
    a: torch.Tensor,
    b: torch.Tensor,
    segments: Sequence[int] | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Adasum(a, b) = (1 - <a,b>/(2||a||^2)) a + (1 - <a,b>/(2||b||^2)) b, per segment.

    Dots and norms accumulated in float64; the combination formed in float64 for float64
    vectors, in fp32 otherwise; the result has a's dtype (or is written into ``out``,
    which may be a or b). Symmetric and bit-reproducible: the same inputs give the same
    bits whatever their memory alignment or the thread count.
    """
    c_a, c_b = adasum_coefficients(a, b, segments)
    return _combine(a, b, c_a, c_b, _check_segments(a.numel(), segments), out)


def largest_power_of_two(n: int) -> int:
    """The largest power of two <= n (n >= 1)."""
    if n < 1:
        raise ValueError(f"world size must be >= 1, got {n}")
    return 1 << (n.bit_length() - 1)


def adasum_tree(grads: torch.Tensor, segments: Sequence[int] | None = None) -> torch.Tensor:
    """In-process AdaSum of stacked worker gradients ``grads`` (N, D), in the exact nesting
    the distributed reduction uses: fold ranks >= P into r - P, recursive doubling over
    the first P (lower rank first), as in the module docstring."""
    if grads.dim() != 2 or grads.shape[0] < 1:
        raise ValueError(f"adasum_tree: need grads of shape (N >= 1, D), got {tuple(grads.shape)}")
    n = grads.shape[0]
    p = largest_power_of_two(n)
    vecs = [grads[r].clone() for r in range(n)]
    for r in range(p, n):
        vecs[r - p] = adasum_pair(vecs[r - p], vecs[r], segments)
    vecs = vecs[:p]
    distance = 1
    while distance < p:
        # after this level, all ranks of every block of 2*distance ranks hold the same vector
        nxt = list(vecs)
        for r in range(p):
            q = r ^ distance
            if r < q:
                nxt[r] = nxt[q] = adasum_pair(vecs[r], vecs[q], segments)
        vecs = nxt
        distance *= 2
    return vecs[0]


# ---------------------------------------------------------------------------------------
# The aggregator
# ---------------------------------------------------------------------------------------

@register
class AdaSum(Aggregator):
    name = "adasum"
    description = "adaptive summation: pairwise sums that average agreeing, add orthogonal parts"
    paper = "Scaling Distributed Training with Adaptive Summation, arXiv 2006.02924"
    phase = "gradient"
    ddp_hook_form = "combine"
    ft_refusal = "its recursive-doubling tree of point-to-point exchanges is built for a fixed N"
    hyperparameters = {
        "per_layer": Hyper(True, bool, "dot products and norms per parameter tensor (Horovod)"),
    }

    def __init__(self, params, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.flat = FlatBuffer(self.params)
        self.peer = self.flat.new_buffer()
        self.segments = list(self.flat.sizes) if self.hp["per_layer"] else None
        self._sizes = _check_segments(self.flat.numel, self.segments)
        self.power = largest_power_of_two(self.world_size)
        self._stepped = False
        # per combination of the last step: (c_a, c_b, pieces non-zero on both sides)
        self._coefs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def _fold_in(self, buf: torch.Tensor, mine_first: bool) -> None:
        """buf = Adasum(lower rank's vector, higher rank's vector) with self.peer."""
        a, b = (buf, self.peer) if mine_first else (self.peer, buf)
        dot, na, nb = _pair_sums(a, b, self._sizes)
        c_a, c_b = _coefficients(dot, na, nb)
        _combine(a, b, c_a, c_b, self._sizes, buf)
        # pieces that are zero on either side say nothing about agreement
        self._coefs.append((c_a, c_b, (na > 0) & (nb > 0)))

    @torch.no_grad()
    def after_backward(self, ctx: StepContext) -> None:
        buf = self.flat.load_grads()
        self.combine_(buf)
        self.flat.store_grads(buf)

    @torch.no_grad()
    def combine_(self, buf: torch.Tensor) -> None:
        """In place: this rank's flat gradient becomes the AdaSum of every rank's.
        Collective (blocking point-to-point); shared by ``after_backward`` and the DDP
        hook."""
        rank, n, p = self.rank, self.world_size, self.power
        self._coefs = []
        if rank >= p:
            self.comm.send(buf, rank - p)
            self.comm.recv_(buf, rank - p)
        else:
            has_extra = rank + p < n
            if has_extra:
                self.comm.recv_(self.peer, rank + p)
                self._fold_in(buf, True)
            distance = 1
            while distance < p:
                partner = rank ^ distance
                self.comm.exchange_(buf, self.peer, partner)
                self._fold_in(buf, rank < partner)
                distance *= 2
            if has_extra:
                self.comm.send(buf, rank + p)
        self._stepped = True

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        """``grad_norm`` of the combined gradient; ``coef_min`` / ``coef_max``: range of the
        pair coefficients this rank computed in the step (0.5 for agreeing pieces, 1 for
        orthogonal ones, above 1 for opposed ones); absent on ranks that combined nothing
        (ranks >= P, N = 1) or only pieces that were zero on one side."""
        if not self._stepped:
            return {}
        buf = self.flat.buffer  # the combined gradient of the last step
        out = {"grad_norm": float(torch.linalg.vector_norm(buf,
                                                           dtype=_compute_dtype(buf.dtype)))}
        if self._coefs:
            c_a = torch.cat([c[0] for c in self._coefs])
            c_b = torch.cat([c[1] for c in self._coefs])
            both = torch.cat([c[2] for c in self._coefs])
            inf = torch.full_like(c_a, math.inf)
            lo = float(torch.minimum(torch.where(both, c_a, inf),
                                     torch.where(both, c_b, inf)).min())
            hi = float(torch.maximum(torch.where(both, c_a, -inf),
                                     torch.where(both, c_b, -inf)).max())
            if math.isfinite(lo):
                out["coef_min"], out["coef_max"] = lo, hi
        return out
