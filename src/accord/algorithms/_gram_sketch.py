"""The Gram-matrix sketch behind ACGA's ``coefficients=sketch`` (see
:mod:`accord.algorithms.acga`): each worker sends k numbers instead of its gradient, and
the inner products of the sketches estimate those of the gradients."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from . import _sketch_native

#: on the CPU, run the sketch's pieces through ``torch._foreach_*`` (see
#: :meth:`GramSketch.fill_`); the tests switch it off to check the per-piece path
FOREACH_ON_CPU = True


class GramSketch:
    """A shared-seed sketch of gradient segments whose inner products estimate the Gram
    matrix of the workers' gradients.

    The gradient is cut into segments (one per tensor, or, ``joined``, one for all the
    tensors end to end). A segment of n <= k numbers is sent as it is (its Gram matrix is
    then exact). A longer one is laid out as R = ceil(n / k) rows of k (the last row
    zero-padded); row r is multiplied elementwise by random signs sigma_r and the rows are
    summed with random row signs tau, both drawn afresh at every step from ``seed`` and
    the step count::

        y = sum_r tau_r (sigma_r * g_r)           k numbers

    E_tau <y(x), y(z)> = sum_r <sigma_r x_r, sigma_r z_r> = <x, z>: unbiased at every
    step, with an error that is independent across steps. The sigma_r break the structure
    of the layout: the rows of a layer's weight gradient are nearly parallel, and rows that
    collide without them add coherently (measured with ``benchmarks/acga_sketch.py`` on the
    9.5M-parameter MLP, N = 4: 2.7% error at the 95th percentile for k = 65536 without
    signs, 0.5% with them).

    The signs cost no memory traffic: sigma_r is the window [s_r, s_r + k) of one fixed
    table T of k random signs written twice (2k numbers, which stay in cache), with a
    distinct shift s_r < k/2 per row. For two rows, sigma_r * sigma_r' is T(l + s_r)
    T(l + s_r') (indices mod k): over the random table every entry is a uniform sign and
    any two entries are independent (they would share both table entries only if
    s_r - s_r' = k/2), which is all the variance of the estimate depends on. So the error
    is that of independent random signs per element (the earlier form of this sketch,
    which read a gradient-size sign vector at every step), for one read of the gradient:
    one fused multiply-add per row into y (``addcmul_``), and the exact squared norm of each
    row as a dot product with itself. tau and the shifts are drawn on the host (Python's
    ``random``, a few numbers per row and step, no tensor): no host sync, nothing to copy.
    """

    def __init__(self, sizes: Sequence[int], k: int, seed: int,
                 device: torch.device | str, dtype: torch.dtype = torch.float32,
                 joined: bool = False) -> None:
        self.sizes = [int(n) for n in sizes]
        self.k = int(k)
        self.seed = int(seed)
        self.dtype = dtype
        self.device = torch.device(device)
        lengths = [sum(self.sizes)] if joined else self.sizes  # one per segment
        self.rows = [-(-n // self.k) if n > self.k else 0 for n in lengths]
        self.widths = [self.k if r else n for n, r in zip(lengths, self.rows, strict=True)]
        self.width = sum(self.widths)
        self.segments = len(lengths)
        total_rows = sum(self.rows)
        self.table: torch.Tensor | None = None
        if total_rows:
            gen = torch.Generator().manual_seed(self.seed)  # host: drawn once, then moved
            signs = torch.randint(0, 2, (self.k,), generator=gen,  # host: as above
                                  dtype=torch.int8).to(device=self.device, dtype=dtype)
            signs.mul_(2).sub_(1)
            self.table = torch.cat([signs, signs])
        # the plan: one piece per (tensor, row) overlap, as
        # (tensor, start, stop, position in y, position in the row or -1 to copy, row)
        self.plan: list[tuple[int, int, int, int, int, int]] = []
        piece_segment: list[int] = []
        offsets = [0] * len(self.sizes)
        members = [list(range(len(self.sizes)))] if joined else [[i] for i in
                                                                  range(len(self.sizes))]
        if joined:
            for i in range(1, len(self.sizes)):
                offsets[i] = offsets[i - 1] + self.sizes[i - 1]
        y_at = row_at = 0
        for seg, (tensors, rows) in enumerate(zip(members, self.rows, strict=True)):
            for i in tensors:
                start, stop = offsets[i], offsets[i] + self.sizes[i]
                if rows == 0:
                    if stop > start:
                        self.plan.append((i, 0, stop - start, y_at + start, -1, -1))
                        piece_segment.append(seg)
                    continue
                at = start
                while at < stop:
                    row, col = divmod(at, self.k)
                    end = min((row + 1) * self.k, stop)
                    self.plan.append((i, at - start, end - start, y_at + col, col,
                                      row_at + row))
                    piece_segment.append(seg)
                    at = end
            y_at += self.widths[seg]
            row_at += rows
        self.total_rows = total_rows
        self.piece_segment = torch.tensor(piece_segment, dtype=torch.long, device=self.device)
        self.piece_squares = torch.zeros(len(self.plan), dtype=dtype, device=self.device)
        # per tensor: the plan's pieces of it in order, and their lengths (one split a step)
        self._tensor_pieces: list[list[int]] = [[] for _ in self.sizes]
        self._tensor_splits: list[list[int]] = [[] for _ in self.sizes]
        for j, (i, a, b, _, _, _) in enumerate(self.plan):
            self._tensor_pieces[i].append(j)
            self._tensor_splits[i].append(b - a)
        assert sum(self._tensor_pieces, []) == list(range(len(self.plan)))
        # the fused CPU kernel (accord.algorithms._sketch_native), built on first use
        self.native = None
        if self.device.type == "cpu" and dtype == torch.float32 and self.plan:
            self.native = _sketch_native.kernel()
        if self.native is not None:
            # host: the native kernel's piece tables (it runs on the CPU only)
            self._native_y = torch.tensor([at for _, _, _, at, _, _ in self.plan])  # host: CPU
            self._native_modes = torch.tensor([0 if col < 0 else 1  # host: CPU kernel
                                               for _, _, _, _, col, _ in self.plan])
            self._native_slots = torch.arange(len(self.plan))  # host: CPU kernel
        self._target_key: tuple | None = None
        self._target_views: list[torch.Tensor] = []

    def row_signs(self, count: int) -> tuple[list[float], list[int]]:
        """The row signs tau and the table shifts of step ``count`` (all rows of all
        segments), as host numbers: distinct shifts below k/2 (they repeat only past k/2
        rows, a gradient of more than k^2 / 2 numbers)."""
        rng = random.Random((self.seed * 1_000_003 + 7919 * (count + 1)) % (2**63 - 1))
        rows = self.total_rows
        bits = rng.getrandbits(rows) if rows else 0
        half = max(1, self.k // 2)
        picked = rng.sample(range(half), min(half, rows))
        return ([1.0 if (bits >> r) & 1 else -1.0 for r in range(rows)],
                [picked[r % half] for r in range(rows)])

    @torch.no_grad()
    def fill_(self, tensors: Sequence[torch.Tensor | None], count: int, out: torch.Tensor
              ) -> torch.Tensor:
        """Write the sketch of ``tensors`` (the sizes given; None counts as zeros) at step
        ``count`` into ``out[:width]`` and each segment's exact norm into
        ``out[width:width + segments]``; returns ``out``. One read of the tensors.

        On the CPU, fp32 pieces go through the fused kernel of
        :mod:`accord.algorithms._sketch_native` where it builds (``ACCORD_NATIVE``), in one
        call: y bit for bit the torch path's, the norms equal to rounding. Otherwise they go
        through ``torch._foreach_*`` calls, one per kind of work (:data:`FOREACH_ON_CPU`):
        its CPU kernels run the list in order, so the pieces that add into the same numbers
        of ``y`` do so one after the other, with the same result bit for bit as one call
        per piece (tested). Other devices take one call per piece: a fused multi-tensor
        kernel may run aliased outputs at once."""
        tau, shifts = self.row_signs(count)
        flat = [None if t is None else t.reshape(-1) for t in tensors]
        y = out[: self.width]
        y.zero_()
        pieces = []  # (piece index, source slice) of the tensors given
        for i, t in enumerate(flat):
            if t is not None and self._tensor_splits[i]:
                pieces += zip(self._tensor_pieces[i], t.split(self._tensor_splits[i]),
                              strict=True)
        if self.native is not None and y.is_contiguous() and all(
                src.dtype == torch.float32 and src.is_contiguous() for _, src in pieces):
            self._fill_native(pieces, tau, shifts, y)
        else:
            self._fill_torch(pieces, tau, shifts, y)
        seg_norms = out[self.width: self.width + self.segments]
        seg_norms.zero_().index_add_(0, self.piece_segment, self.piece_squares).sqrt_()
        return out

    def _fill_native(self, pieces, tau: list[float], shifts: list[int], y: torch.Tensor
                     ) -> None:
        """y and the pieces' squared norms through the fused kernel (one call)."""
        squares = self.piece_squares
        if len(pieces) == len(self.plan):
            index = None
        else:
            squares.zero_()
            index = torch.tensor([j for j, _ in pieces], dtype=torch.long)  # host: CPU
        tabpos: list[int] = []
        taus: list[float] = []
        for j, _ in pieces:
            _, _, _, _, col, row = self.plan[j]
            tabpos.append(shifts[row] + col if col >= 0 else 0)
            taus.append(tau[row] if col >= 0 else 0.0)
        pick = (lambda t: t) if index is None else (lambda t: t[index])
        positions = torch.tensor(tabpos, dtype=torch.long)  # host: the CPU kernel's input
        values = torch.tensor(taus, dtype=torch.float32)  # host: the CPU kernel's input
        assert self.native is not None
        self.native.sketch_pieces(
            y, [src for _, src in pieces], pick(self._native_y), positions, values,
            pick(self._native_modes), self.table if self.table is not None else y,
            squares, pick(self._native_slots), _sketch_native.TILE)

    def _fill_torch(self, pieces, tau: list[float], shifts: list[int], y: torch.Tensor
                    ) -> None:
        """y and the pieces' squared norms through torch's kernels."""
        targets = self._targets(y)
        fused = (FOREACH_ON_CPU and self.device.type == "cpu"
                 and all(src.dtype == self.dtype for _, src in pieces))
        sums: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = []
        for j, src in pieces:
            _, a, b, _, col, row = self.plan[j]
            if col < 0:
                targets[j].copy_(src)
            else:
                window = shifts[row] + col
                sums.append((targets[j], src, self.table[window: window + b - a], tau[row]))
        if fused and sums:
            ys, srcs, signs, values = zip(*sums, strict=True)
            torch._foreach_addcmul_(list(ys), list(srcs), list(signs), list(values))
        else:
            for target, src, sign, value in sums:
                target.addcmul_(src, sign, value=value)
        # squared norms: a BLAS dot per piece where the dtype allows (its blocked sums
        # hold the norm of a 10M gradient to 1e-8, half the time of vector_norm here)
        squares = self.piece_squares
        if len(pieces) == len(self.plan) and pieces:  # every tensor given: pieces in order
            if all(src.dtype == self.dtype for _, src in pieces):
                torch.stack([torch.dot(src, src) for _, src in pieces], out=squares)
            else:
                torch.stack([torch.linalg.vector_norm(src, dtype=self.dtype)
                             for _, src in pieces], out=squares).square_()
        else:
            squares.zero_()
            for j, src in pieces:
                squares[j] = torch.linalg.vector_norm(src, dtype=self.dtype).square()

    def _targets(self, y: torch.Tensor) -> list[torch.Tensor]:
        """The piece-by-piece views of ``y`` the plan writes into (kept for the last
        buffer: ACGA fills the same one at every step)."""
        key = (y.data_ptr(), y.dtype, y.device)
        if self._target_key != key:
            self._target_views = [y[at: at + b - a] for _, a, b, at, _, _ in self.plan]
            self._target_key = key
        return self._target_views

    def apply(self, tensors: Sequence[torch.Tensor | None], count: int) -> torch.Tensor:
        """The sketch of ``tensors`` at step ``count``: ``width`` numbers in the sketch
        dtype (a new tensor)."""
        out = torch.empty(self.width + self.segments, dtype=self.dtype, device=self.device)
        return self.fill_(tensors, count, out)[: self.width]

    def gram(self, sketches: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """(L, N, N) Gram estimates from the gathered sketches (N, width), with each
        diagonal set to the exact squared norms ``norms`` (L, N)."""
        grams = torch.stack([part @ part.T for part in sketches.split(self.widths, dim=1)])
        eye = torch.eye(grams.shape[-1], dtype=torch.bool, device=grams.device)
        return torch.where(eye, torch.diag_embed(norms.to(grams.dtype) ** 2), grams)
