"""ACGA: adaptive consensus gradient aggregation (AdaCons).

Paper: Choukroun, Azoulay, Kisilev, "Adaptive Consensus Gradients Aggregation for Scaled
Distributed Training", arXiv 2411.03742 (2024). Reference script: yoniLc/AdaCons Main.py.

Update rule (N workers, g_i the local gradient of worker i, s = sum_j g_j)::

    a_i  = <g_i, s> / (N (||g_i|| + eps))          consensus coefficient = <u_i, mean g>
    perm = stable argsort(a)                        identical on all ranks (gathered a)
    m    = sort(a)              at the first step
    m    = beta m + (1 - beta) sort(a)  afterwards  subspace momentum on the SORTED vector
    c[perm[k]] = m[k]                               hand rank-k value to the worker at rank k
    c    = c / sum(c)                               coefficients sum to one (guarded)
    d    = sum_i c_i g_i / (||g_i|| + eps)
    d    = d / max(1, ||d||)                        written into every p.grad

Hook: ``after_backward``. Communication per step, by route (``coefficients``; ``auto``
picks one when the aggregator is built, :func:`auto_route`): ``gather``, one all-gather of
the whole gradient (N x D <= ``GATHER_LIMIT``); ``sketch``, an all-gather of
``sketch_size`` + 1 numbers per worker and one model-size allreduce (:class:`GramSketch`);
``exact``, two model-size allreduces and an all-gather of 2 floats per worker.

Decisions where the sources are silent or disagree (docs/algorithms/acga.md has each in
full): ``reference_order`` (default False) scatters through the inverse permutation, not
the script's ``m[perm]``; ``guard`` (``uniform`` keeps negative coefficients, ``shift``,
``clamp``); every mode falls back to 1/N when the negative mass Q >= P / 2
(``NEGATIVE_FRACTION``) and divides d by max(1, ||d||), so ||d|| <= 1 always;
``per_layer`` runs the rule per tensor; a zero gradient gets coefficient 0;
``restore_scale`` (``none``, ``mean_norm``, ``avg_norm``); dots and norms in fp32; no host
sync on any step (``metrics()`` computes the observables when called)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from ..comm import FlatBuffer, accumulation_dtype, payload_compressor
from ..core import Aggregator, Hyper, StepContext
from . import register
from ._gram_sketch import GramSketch

log = logging.getLogger(__name__)

#: on the CPU, where reading a value back costs nothing, skip the norm limit's two passes
#: when every coefficient is non-negative (the device-agnostic path never reads back; the
#: host-sync test switches this off to check that path on the CPU)
CPU_SHORTCUTS = True

#: default ``sketch_size`` (see benchmarks/acga_sketch.py for the error study)
SKETCH_SIZE = 65536

#: ``coefficients=auto`` all-gathers the whole gradient (one round, exact coefficients)
#: when N x D is at most this many numbers (1 MB of fp32 gathered per rank; see the
#: module docstring for the measurement)
GATHER_LIMIT = 2**18

#: a coefficient vector whose negative mass is at least this fraction of its positive mass
#: falls back to uniform coefficients (see the module docstring)
NEGATIVE_FRACTION = 0.5


# ---------------------------------------------------------------------------------------
# Pure maths (no process group). The last dimension indexes workers; leading dimensions
# (one row per tensor in per-layer mode) are independent problems.
# ---------------------------------------------------------------------------------------

def consensus_coefficients(
    dots: torch.Tensor, norms: torch.Tensor, world_size: int, eps: float = 1e-8
) -> torch.Tensor:
    """a_i = <g_i, sum_j g_j> / (N (||g_i|| + eps)) = <u_i, mean_j g_j>."""
    return dots / (world_size * (norms + eps))


def sorted_momentum(
    a: torch.Tensor, m: torch.Tensor | None, beta: float, reference_order: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Momentum on the sorted coefficients; returns (new momentum, per-worker coefficients).

    The worker holding the k-th smallest coefficient now receives the k-th smoothed value.
    With ``reference_order`` the smoothed vector is indexed by the sort permutation
    instead of scattered through it, as the reference script does.
    """
    values, order = torch.sort(a, dim=-1, stable=True)
    m_new = values.clone() if m is None else beta * m + (1.0 - beta) * values
    if reference_order:
        c = torch.gather(m_new, -1, order)
    else:
        c = torch.empty_like(m_new).scatter_(-1, order, m_new)
    return m_new, c


def normalize_coefficients(
    c: torch.Tensor, guard: str = "uniform"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients summing to one along the last dimension.

    Returns (c, rows that fell back to 1/N as a 0-dim int64 tensor). After the guard
    (``shift``, ``clamp`` or none for ``uniform``), a row falls back to 1/N when its
    negative mass Q = sum max(-c_i, 0) is at least ``NEGATIVE_FRACTION`` times its positive
    mass P = sum max(c_i, 0); this includes an all-zero row. Other rows are divided by
    their sum P - Q >= P / 2 > 0.
    """
    if guard == "shift":
        c = c - c.min(dim=-1, keepdim=True).values.clamp(max=0.0)
    elif guard == "clamp":
        c = c.clamp(min=0.0)
    elif guard != "uniform":
        raise ValueError(f"guard: got {guard!r}, allowed: 'uniform', 'shift', 'clamp'")
    total = c.sum(dim=-1, keepdim=True)
    positive = c.clamp(min=0.0).sum(dim=-1, keepdim=True)
    negative = (-c).clamp(min=0.0).sum(dim=-1, keepdim=True)
    bad = negative >= NEGATIVE_FRACTION * positive
    uniform = torch.full_like(c, 1.0 / c.shape[-1])
    out = torch.where(bad, uniform, c / torch.where(bad, torch.ones_like(total), total))
    return out, bad.sum()


def limit_norm_(segments: Sequence[torch.Tensor]) -> torch.Tensor:
    """Divide each tensor by max(1, its norm), in place; returns the divisors (L,).

    Tensor operations only (no host sync). A tensor of norm <= 1 is divided by exactly
    1.0, so it is unchanged bit for bit. Norms are taken in fp32 at least.
    """
    norms = torch.stack([torch.linalg.vector_norm(
        seg, dtype=torch.promote_types(seg.dtype, torch.float32)) for seg in segments])
    scale = norms.clamp(min=1.0)
    for seg, sc in zip(segments, scale.unbind(), strict=True):
        seg.div_(sc)
    return scale


def acga_combine(
    grads: torch.Tensor,
    momentum: torch.Tensor | None = None,
    beta: float = 0.0,
    *,
    segments: Sequence[int] | None = None,
    reference_order: bool = False,
    guard: str = "uniform",
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Single-process ACGA on stacked worker gradients ``grads`` of shape (N, D).

    Returns (aggregated gradient d, coefficients c, new momentum). ``segments`` (sizes of
    consecutive pieces of D, one per parameter tensor) gives the per-layer form: c and the
    momentum are then (L, N), one independent problem per piece. The distributed class
    computes the same thing with collectives; tests use this as the in-process form.
    """
    g = grads.float()
    n = g.shape[0]
    sizes = [g.shape[1]] if segments is None else [int(x) for x in segments]
    parts = g.split(sizes, dim=1)
    dots = torch.stack([p @ p.sum(dim=0) for p in parts])  # (L, N)
    norms = torch.stack([p.norm(dim=1) for p in parts])
    if segments is None:  # one row, kept 1-D so a (N,) momentum stays (N,)
        dots, norms = dots[0], norms[0]
    a = consensus_coefficients(dots, norms, n, eps)
    m, c = sorted_momentum(a, momentum, beta, reference_order)
    c = torch.where(norms > 0, c, torch.zeros_like(c))
    c, _ = normalize_coefficients(c, guard)
    w = (c / (norms + eps)).reshape(len(sizes), n)
    d = torch.cat([(w[l][:, None] * p).sum(dim=0) for l, p in enumerate(parts)])
    limit_norm_(d.split(sizes))
    return d, c, m


def auto_route(world_size: int, sizes: Sequence[int], sketch_size: int,
               compressed: bool = False) -> str:
    """The route ``coefficients=auto`` takes for segments of ``sizes`` (one for the whole
    gradient, or one per tensor with ``per_layer``) on ``world_size`` workers: ``gather``
    when N x D <= ``GATHER_LIMIT``, else ``sketch`` when the sketch is at most half the
    gradient, else ``exact``. ``compressed``: a payload compressor is set; it acts on
    allreduces, and the gather would send the gradient past it, so it is left out."""
    dim = sum(int(n) for n in sizes)
    width = sum(min(int(n), sketch_size) for n in sizes)  # the sketch's numbers per worker
    if world_size * dim <= GATHER_LIMIT and not compressed:
        return "gather"
    return "sketch" if 2 * width <= dim else "exact"


def sketch_coefficients(gram: torch.Tensor, norms: torch.Tensor, eps: float = 1e-8
                        ) -> torch.Tensor:
    """a (L, N) from Gram matrices (L, N, N) and norms (L, N): a_i = sum_j G_ij / (N (||g_i||
    + eps)), the exact a when G is exact."""
    return consensus_coefficients(gram.sum(dim=-1), norms, gram.shape[-1], eps)


# ---------------------------------------------------------------------------------------
# The aggregator
# ---------------------------------------------------------------------------------------

@register
class ACGA(Aggregator):
    name = "acga"
    description = "adaptive consensus gradient aggregation: weights by agreement with the mean"
    paper = ("Adaptive Consensus Gradients Aggregation for Scaled Distributed Training, "
             "arXiv 2411.03742")
    phase = "gradient"
    compressible = low_rank = scale_invariant = True
    ddp_hook_form = "sum_then_combine"
    fault_tolerant = ("a, c and the sorted momentum have length N: when N changes the "
                      "momentum restarts from sort(a) of that step, as at step 0")
    hyperparameters = {
        "momentum": Hyper(0.99, float, "subspace momentum beta on the sorted coefficients",
                          low=0.0, high=1.0, high_open=True),
        "per_layer": Hyper(False, bool, "one coefficient vector per parameter tensor"),
        "reference_order": Hyper(False, bool,
                                 "un-sort with the permutation itself, as the reference script"),
        "guard": Hyper("uniform", str, "treatment of negative coefficients before normalising",
                       choices=("uniform", "shift", "clamp")),
        "restore_scale": Hyper("none", str, "rescale d to a gradient-averaging magnitude",
                               choices=("none", "mean_norm", "avg_norm")),
        "eps": Hyper(1e-8, float, "added to gradient norms", low=0.0, low_open=True),
        "coefficients": Hyper("auto", str, "exact: from the allreduced sum (two model-size "
                              "allreduces); gather: exact, from the all-gathered gradients "
                              "(one round, small models); sketch: from gradient sketches "
                              "(one model-size allreduce); auto: gather when N x D <= "
                              f"{GATHER_LIMIT}, sketch when the sketch is at most half the "
                              "gradient, exact otherwise",
                              choices=("auto", "exact", "gather", "sketch")),
        "sketch_size": Hyper(SKETCH_SIZE, int, "numbers per gradient (per tensor with "
                             "per_layer) in the sketch; smaller segments are sent exactly",
                             low=1, high=2**31 - 1),
        "sketch_seed": Hyper(0, int, "seed of the sketch's random signs (same on all ranks)",
                             low=0),
    }

    def __init__(self, params, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.flat = FlatBuffer(self.params)
        self.layers = len(self.params) if self.hp["per_layer"] else 1
        self.acc = accumulation_dtype(self.flat.buffer.dtype)
        device = self.flat.buffer.device
        self.mode = self._choose_mode()  # exact, gather or sketch, fixed for the run
        self.sketch: GramSketch | None = None
        self._send: torch.Tensor | None = None  # the sketch and the norms, all-gathered
        if self.mode == "sketch":
            self.sketch = GramSketch(self.flat.sizes, self.hp["sketch_size"],
                                     self.hp["sketch_seed"], device, self.acc,
                                     joined=not self.hp["per_layer"])
            self._send = torch.zeros(self.sketch.width + self.layers, dtype=self.acc,
                                     device=device)
        # exact: the buffer the sum s is allreduced into (the DDP hook fills it too)
        self.total = self.flat.new_buffer() if self.mode == "exact" else None
        # gather: s, summed from the gathered gradients (metrics and avg_norm read it)
        self._sum = (torch.zeros(self.flat.numel, dtype=self.acc, device=device)
                     if self.mode == "gather" else None)
        self.count = 0  # steps combined (the sketch's row signs are drawn from it)
        self.momentum: torch.Tensor | None = None
        self.guard_hits: torch.Tensor | int = 0
        self._coefficients: torch.Tensor | None = None  # c of the last step, (L, N)
        self._sketch_cos: tuple[torch.Tensor, torch.Tensor] | None = None  # <d, s>, ||s||^2

    def _segments(self, buf: torch.Tensor) -> list[torch.Tensor]:
        return [v.reshape(-1) for v in self.flat.split(buf)] if self.hp["per_layer"] else [buf]

    def _choose_mode(self) -> str:
        """The coefficients' route for ``coefficients`` on this model and world size."""
        asked, k = self.hp["coefficients"], self.hp["sketch_size"]
        dim, n = self.flat.numel, self.world_size
        sizes = self.flat.sizes if self.hp["per_layer"] else [dim]
        width = sum(min(s, k) for s in sizes)  # the sketch's numbers per worker
        if asked == "auto":
            mode = auto_route(n, sizes, k, compressed=payload_compressor() is not None)
            log.info("acga: coefficients=auto chose %s (N=%d, %d parameters, sketch_size=%d)",
                     mode, n, dim, k)
            return mode
        if asked == "sketch" and width == dim:  # nothing to compress
            log.info("acga: every gradient segment has at most sketch_size=%d numbers; "
                     "using the exact coefficients", k)
            return "exact"
        return asked

    @torch.no_grad()
    def after_backward(self, ctx: StepContext) -> None:
        if self.mode == "sketch":
            # the sketch and the norms read the gradients where autograd left them, and each
            # rank's weight is applied in the pass that loads them into the flat buffer:
            # one read of the gradient more than averaging
            c, all_norms, gram = self._sketched([p.grad for p in self.params])
            weights = self._own_weights(c, all_norms)
            if self.hp["per_layer"]:
                local = self.flat.load_grads()
                for seg, w in zip(self._segments(local), weights.unbind(), strict=True):
                    seg.mul_(w)
            else:
                local = self.flat.load_grads(scale=weights[0])
            self.comm.all_reduce_(local)  # d = sum_i c_i g_i / ||g_i||
            self._finish(local, c, all_norms, gram, None)
        else:
            local = self.flat.load_grads()
            if self.total is not None:
                self.total.copy_(local)
                self.comm.all_reduce_(self.total, exact=True)  # s = sum_j g_j: coefficients
            self.combine_(local, self.total)
        self.flat.store_grads(local)

    def _own_weights(self, c: torch.Tensor, all_norms: torch.Tensor) -> torch.Tensor:
        """This rank's c_i / (||g_i|| + eps), one per coefficient row (L,)."""
        return c[:, self.rank] / (all_norms[:, self.rank] + self.hp["eps"])

    def _sketched(self, tensors: Sequence[torch.Tensor | None]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c, norms, Gram estimate) from the sketches of every rank's gradient, given this
        rank's per-parameter gradients. Collective: one all-gather of width + L numbers."""
        assert self.sketch is not None and self._send is not None
        self.sketch.fill_(tensors, self.count, self._send)
        gathered = self.comm.all_gather(self._send)  # (N, K + L)
        width = self.sketch.width
        all_norms = gathered[:, width:].T.contiguous()  # (L, N)
        gram = self.sketch.gram(gathered[:, :width], all_norms)
        a = sketch_coefficients(gram, all_norms, self.hp["eps"])
        return self._coefficients_from(a, all_norms), all_norms, gram

    @torch.no_grad()
    def combine_(self, local: torch.Tensor, total: torch.Tensor | None) -> None:
        """In place: ``local`` (this rank's flat gradient) becomes d, given ``total`` = the
        sum of every rank's gradient (``exact``; None with ``gather`` and ``sketch``).
        Collective. Shared by ``after_backward`` and the DDP hook (which sums the buckets
        as they come)."""
        eps = self.hp["eps"]
        n = self.world_size
        loc_segs = self._segments(local)
        if self.mode == "sketch":
            c, all_norms, gram = self._sketched(self.flat.split(local))
            for seg, w in zip(loc_segs, self._own_weights(c, all_norms).unbind(), strict=True):
                seg.mul_(w)
            self.comm.all_reduce_(local)  # d = sum_i c_i g_i / ||g_i||
            self._finish(local, c, all_norms, gram, None)
            return
        if self.mode == "gather":
            # every rank holds every gradient: the exact coefficients and d itself are
            # computed locally, the same operations on the same numbers on every rank
            gathered = self.comm.all_gather(local).to(self.acc)  # (N, D)
            assert self._sum is not None
            torch.sum(gathered, dim=0, out=self._sum)
            sums = self._segments(self._sum)
            parts = (gathered.split(self.flat.sizes, dim=1) if self.hp["per_layer"]
                     else [gathered])
            dots = torch.stack([p @ s for p, s in zip(parts, sums, strict=True)])  # (L, N)
            all_norms = torch.stack([torch.linalg.vector_norm(p, dim=1) for p in parts])
            c = self._coefficients_from(consensus_coefficients(dots, all_norms, n, eps),
                                        all_norms)
            weights = c / (all_norms + eps)
            for seg, p, w in zip(loc_segs, parts, weights.unbind(), strict=True):
                seg.copy_(w @ p)
            self._finish(local, c, all_norms, None, sums)
            return
        assert total is not None, "acga: coefficients=exact needs the summed gradient"
        norms = torch.stack([g.float().norm() for g in loc_segs])
        tot_segs = self._segments(total)
        pairs = zip(loc_segs, tot_segs, strict=True)
        dots = torch.stack([torch.dot(g.float(), s.float()) for g, s in pairs])
        a_local = consensus_coefficients(dots, norms, n, eps)
        gathered = self.comm.all_gather(torch.cat([a_local, norms]))  # (N, 2L)
        a = gathered[:, : self.layers].T.contiguous()  # (L, N)
        all_norms = gathered[:, self.layers:].T.contiguous()
        c = self._coefficients_from(a, all_norms)
        for seg, w in zip(loc_segs, self._own_weights(c, all_norms).unbind(), strict=True):
            seg.mul_(w)
        self.comm.all_reduce_(local)  # d = sum_i c_i g_i / ||g_i||
        self._finish(local, c, all_norms, None, tot_segs)

    def _coefficients_from(self, a: torch.Tensor, all_norms: torch.Tensor) -> torch.Tensor:
        """c (L, N) from the consensus coefficients a (L, N): sorted momentum, zero for a
        zero gradient, normalised under the guard (counted in ``guard_hits``)."""
        self.count += 1
        if self.momentum is not None and self.momentum.shape != a.shape:
            log.warning("acga: momentum shape %s does not match %s; restarting it",
                        tuple(self.momentum.shape), tuple(a.shape))
            self.momentum = None
        self.momentum, c = sorted_momentum(a, self.momentum, self.hp["momentum"],
                                           self.hp["reference_order"])
        c = torch.where(all_norms > 0, c, torch.zeros_like(c))
        c, hits = normalize_coefficients(c, self.hp["guard"])
        self.guard_hits = self.guard_hits + hits
        return c

    def _finish(self, local: torch.Tensor, c: torch.Tensor, all_norms: torch.Tensor,
                gram: torch.Tensor | None, sums: list[torch.Tensor] | None) -> None:
        """On d (``local``, the same on every rank): the norm limit and ``restore_scale``;
        keeps what ``metrics()`` needs. ``sums``: the segments of s (exact, gather), else
        ``gram``: the Gram estimate (sketch)."""
        eps = self.hp["eps"]
        n = self.world_size
        loc_segs = self._segments(local)
        # d is identical on every rank, so every rank computes the same divisors
        if CPU_SHORTCUTS and local.device.type == "cpu" and bool((c >= 0).all()):
            # bounded by construction (a convex combination of vectors of norm < 1); on the
            # CPU reading c costs nothing, so the two passes over d are skipped
            divisors = torch.ones(len(loc_segs), dtype=torch.float32, device=local.device)
        else:
            divisors = limit_norm_(loc_segs)

        mode = self.hp["restore_scale"]
        factors = 1.0 / divisors
        if mode != "none":
            if mode == "mean_norm":
                scales = all_norms.mean(dim=1)
            elif sums is not None:
                scales = torch.stack([s.float().norm() for s in sums]) / n
            else:  # ||s||^2 = sum_ij G_ij, an estimate (clamped at 0)
                scales = gram.sum(dim=(1, 2)).clamp(min=0.0).sqrt() / n
            for seg, scale in zip(loc_segs, scales.unbind(), strict=True):
                seg.mul_(scale)
            factors = factors * scales
        if gram is not None:  # metrics' cosine with the mean, from the Gram estimate
            weights_all = c / (all_norms + eps)  # (L, N)
            ds = ((weights_all.unsqueeze(-1) * gram).sum(dim=(1, 2)) * factors).sum()
            self._sketch_cos = (ds, gram.sum(dim=(1, 2)).sum())
        self._coefficients = c  # metrics() reads it back when it is called

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        """Coefficient range, norm of the written gradient, its cosine with the mean
        gradient (last step), and the number of coefficient rows that fell back to 1/N.
        Computed here, at log steps: the flat buffers still hold the last d and s."""
        c = self._coefficients
        if c is None:
            return {}
        d, s = self.flat.buffer, self.total if self._sum is None else self._sum
        acc = accumulation_dtype(d.dtype)
        d_norm = torch.linalg.vector_norm(d, dtype=acc)
        if s is not None:
            s_norm = torch.linalg.vector_norm(s, dtype=acc)
            dot = torch.dot(d.to(acc), s.to(acc))
        else:  # sketch: <d, s> and ||s||^2 from the estimated Gram matrix
            dot, ss = self._sketch_cos
            s_norm = ss.clamp(min=0.0).sqrt()
        return {"coef_min": float(c.min()), "coef_max": float(c.max()),
                "grad_norm": float(d_norm), "cos_mean": float(dot / (d_norm * s_norm + 1e-30)),
                "guard_hits": float(self.guard_hits)}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["momentum"] = None if self.momentum is None else self.momentum.clone()
        state["guard_hits"] = int(self.guard_hits)
        state["count"] = self.count
        return state

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        m = state.get("momentum")
        if m is not None and tuple(m.shape) != (self.layers, self.world_size):
            log.warning("acga: saved momentum has shape %s, this run needs %s; restarting it",
                        tuple(m.shape), (self.layers, self.world_size))
            m = None
        self.momentum = None if m is None else m.clone()
        self.guard_hits = int(state.get("guard_hits", 0))
        self.count = int(state.get("count", 0))
