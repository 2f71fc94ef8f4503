"""Streaming DiLoCo: DiLoCo on P model fragments, staggered, with overlapped exchanges.

Paper: Douillard et al., "Streaming DiLoCo with overlapping communication: Towards a
Distributed Free Lunch", arXiv 2501.18512. Maintained reference: torchft's
``torchft.local_sgd.DiLoCo(fragment_sync_delay, fragment_update_alpha)`` (0.2.0), whose
schedule and merge rule this module follows.

H = ``period``, P = ``fragments``, tau = ``delay``, alpha = ``alpha`` (the weight of the
*local* parameters, torchft's convention); theta_p, v_p: fragment p's outer model and
Nesterov momentum, identical on every rank. Update rule::

    every step:          x_i <- inner_optimizer_step(x_i, g_i)
    start of p's sync:   m_p   = mean_i x_i,p             (one allreduce, not waited for)
    merge, tau later:    delta = theta_p - m_p
                         v_p   = outer_momentum * v_p + delta
                         theta_p = theta_p - outer_lr * (delta + outer_momentum * v_p)
                         x_i,p = (1 - alpha) * theta_p + alpha * x_i,p

Schedule: offset_p = floor((p + 1) H / P); p's exchange starts at steps s with
(s + 1 + tau - offset_p) % H == 0 and merges tau steps later; checked: H >= P and
tau < floor(H / P), so at most one exchange is in flight. Fragments are strided *layers*
(a tensor of 2+ dimensions starts a layer, its bias and norms join it); buffer j goes to
fragment j mod P.

Hook: ``after_step``. Communication: at fragment p's start step one average allreduce of
about 1/P of the model (kind ``allreduce_fragment<p>``), asynchronous when tau > 0;
under ``--compress`` the outer gradient theta_p - x_i,p (int8/int4/topk overlapped too).
P = 1, tau = 0, alpha = 0 is ``diloco`` bit for bit. ``state_dict()`` finishes an
exchange in flight and stores its result, so a resumed run equals an uninterrupted one.
Refused under ``--fault-tolerant``. Decisions and the comparison with torchft in full:
docs/algorithms/streaming_diloco.md."""

from __future__ import annotations

from typing import Any

import torch

from ..comm import FlatBuffer, accumulation_dtype, payload_compressor
from ..core import Hyper, StepContext
from . import register
from ._model import ModelAggregator


def layers_of(shapes: list[torch.Size]) -> list[int]:
    """The layer index of each tensor: a tensor of two or more dimensions starts a layer,
    one of fewer dimensions joins the layer before it (the first layer if none)."""
    out, layer = [], -1
    for shape in shapes:
        if len(shape) >= 2 or layer < 0:
            layer += 1
        out.append(layer)
    return out


def fragment_offsets(period: int, fragments: int) -> list[int]:
    """offset_p = floor((p + 1) * H / P): fragment p merges after offset_p steps of each
    period (the last fragment at H)."""
    return [(p + 1) * period // fragments for p in range(fragments)]


@register
class StreamingDiLoCo(ModelAggregator):
    name = "streaming_diloco"
    description = ("Streaming DiLoCo: DiLoCo on P strided fragments synchronised in turn, "
                   "each exchange overlapping `delay` inner steps, merged with mixing `alpha`")
    paper = ("Streaming DiLoCo with overlapping communication: Towards a Distributed Free "
             "Lunch, arXiv 2501.18512")
    compressible = low_rank = True
    ft_refusal = ("an outer exchange stays in flight across steps, so a quorum change between "
                  "its start and its merge would mix two worlds")
    hyperparameters = {
        "period": Hyper(50, int, "inner steps between two syncs of one fragment (H)", low=1),
        "fragments": Hyper(2, int, "number of strided fragments (P), at most period", low=1),
        "delay": Hyper(0, int, "inner steps an exchange overlaps before its merge (tau), "
                       "below period // fragments", low=0),
        "alpha": Hyper(0.0, float, "weight of the local parameters when merging (0: take "
                       "the outer model)", low=0.0, high=1.0),
        "outer_lr": Hyper(0.7, float, "outer learning rate", low=0.0, low_open=True),
        "outer_momentum": Hyper(0.9, float, "outer momentum", low=0.0, high=1.0,
                                high_open=True),
        "nesterov": Hyper(True, bool, "Nesterov form of the outer momentum"),
    }

    @classmethod
    def check(cls, hp, world_size: int) -> None:
        period, fragments, delay = hp["period"], hp["fragments"], hp["delay"]
        if fragments > period:
            raise ValueError(f"hyperparameter 'fragments': got {fragments} with period "
                             f"{period}, allowed: at most period (one sync per step at most)")
        if delay >= period // fragments:
            raise ValueError(f"hyperparameter 'delay': got {delay} with period {period} and "
                             f"{fragments} fragments, allowed: below period // fragments = "
                             f"{period // fragments} (one exchange in flight at a time)")

    def __init__(self, params, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        n_frag = self.hp["fragments"]
        layer = layers_of([p.shape for p in self.params])
        members: list[list[torch.Tensor]] = [[] for _ in range(n_frag)]
        n_params = [0] * n_frag
        for p, layer_index in zip(self.params, layer, strict=True):
            members[layer_index % n_frag].append(p)
            n_params[layer_index % n_frag] += p.numel()
        for j, b in enumerate(self.buffers):
            members[j % n_frag].append(b)
        # the flat state in fragment order, so each fragment is one contiguous slice (the
        # payload of its allreduce); with one fragment this is the layout of ``diloco``
        self.flat = FlatBuffer([t for group in members for t in group])
        self.members = members
        self.n_params = n_params
        self.slices: list[tuple[int, int]] = []  # (start, end) of each fragment in the flat
        self.vel_slices: list[tuple[int, int]] = []  # (start, end) in the velocity
        start = vstart = 0
        for group, n in zip(members, n_params, strict=True):
            end = start + sum(t.numel() for t in group)
            self.slices.append((start, end))
            self.vel_slices.append((vstart, vstart + n))
            start, vstart = end, vstart + n
        self.views = self.flat.views  # per-tensor views, in fragment order
        self.first_view = [0]
        for group in members:
            self.first_view.append(self.first_view[-1] + len(group))
        self.offsets = fragment_offsets(self.hp["period"], n_frag)
        # one counted kind per fragment; a stateful compressor keys its error memory by kind
        # and size, and two fragments of one size must not share one memory
        self.kinds = (["allreduce"] if n_frag == 1
                      else [f"allreduce_fragment{p}" for p in range(n_frag)])
        x = self.load_state()
        self.theta = x.to(accumulation_dtype(x.dtype), copy=True)
        self.velocity = torch.zeros(sum(n_params), dtype=self.theta.dtype,
                                    device=self.theta.device)
        self._delta_norm = self.theta.new_zeros(())
        # the exchange in flight: fragment, future (None once finished), payload, world size
        self._inflight: tuple[int, torch.futures.Future | None, torch.Tensor, int] | None = None

    # -- schedule ------------------------------------------------------------------------
    def _due(self, step: int, shift: int) -> int | None:
        """The fragment whose event falls at ``step`` (``shift`` = tau for starts, 0 for
        merges), or None."""
        period = self.hp["period"]
        for p, offset in enumerate(self.offsets):
            if step + 1 + shift >= offset and (step + 1 + shift - offset) % period == 0:
                return p
        return None

    def _pairs(self, p: int):
        lo, hi = self.first_view[p], self.first_view[p + 1]
        return zip(self.views[lo:hi], self.members[p], strict=True)

    # -- the exchange --------------------------------------------------------------------
    @torch.no_grad()
    def _start(self, p: int) -> None:
        lo, hi = self.slices[p]
        payload = self.flat.buffer[lo:hi]
        for view, t in self._pairs(p):
            view.copy_(t)
        compressor = payload_compressor()
        if compressor is not None:  # send the outer gradient theta - x_i, as codecs expect
            payload.neg_().add_(self.theta[lo:hi].to(payload.dtype))
        # int8/int4/topk codes are gathered in the background like a plain payload; the
        # other codecs reduce in place (their exchange completes now)
        overlap = self.hp["delay"] > 0 and (compressor is None or compressor.gathers(payload))
        if not overlap:
            self.comm.all_reduce_(payload, op="avg", kind=self.kinds[p])
            self._inflight = (p, None, payload, self.comm.world_size)
        else:
            fut = self.comm.all_reduce_async_(payload, op="sum", kind=self.kinds[p],
                                              compressed=compressor is not None)
            self._inflight = (p, fut, payload, self.comm.world_size)

    def _finish(self) -> None:
        """Wait for the exchange in flight (if any) and turn its sum into the mean."""
        if self._inflight is None or self._inflight[1] is None:
            return
        p, fut, payload, world = self._inflight
        fut.wait()
        payload.div_(world)
        self._inflight = (p, None, payload, world)

    @torch.no_grad()
    def _merge(self, p: int) -> None:
        if self._inflight is None or self._inflight[0] != p:
            raise RuntimeError(f"streaming_diloco: fragment {p} is due to merge but its "
                               "exchange was never started (a step was skipped)")
        self._finish()
        mean = self._inflight[2]
        self._inflight = None
        lo, hi = self.slices[p]
        theta = self.theta[lo:hi]
        if payload_compressor() is not None:
            mean.neg_().add_(theta.to(mean.dtype))  # theta - mean_i (theta - x_i)
        k = self.n_params[p]
        vlo, vhi = self.vel_slices[p]
        velocity = self.velocity[vlo:vhi]
        delta = theta[:k] - mean[:k]
        mu, lr = self.hp["outer_momentum"], self.hp["outer_lr"]
        velocity.mul_(mu).add_(delta)
        step = delta.add(velocity, alpha=mu) if self.hp["nesterov"] else velocity
        theta[:k].sub_(step, alpha=lr)
        theta[k:].copy_(mean[k:])
        alpha = self.hp["alpha"]
        thetas = theta.split([t.numel() for t in self.members[p]])
        for outer, t in zip(thetas, self.members[p], strict=True):
            outer = outer.view_as(t)
            if alpha == 0.0:
                t.copy_(outer)
            else:  # the local copy as it is now, tau steps after the payload was taken
                t.copy_(torch.lerp(outer, t.to(outer.dtype), alpha))
        self._delta_norm = torch.linalg.vector_norm(delta)  # a tensor: no host sync

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        p = self._due(ctx.step, self.hp["delay"])
        if p is not None and self.members[p]:
            self._start(p)
        p = self._due(ctx.step, 0)
        if p is not None and self.members[p]:
            self._merge(p)

    def metrics(self) -> dict[str, float]:
        """Norm of the last merged fragment's outer pseudo-gradient (0 before the first)."""
        return {"outer_delta_norm": float(self._delta_norm)}

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self._finish()  # nothing new is sent: every rank issued this allreduce already
        pending = None
        if self._inflight is not None:
            pending = {"fragment": self._inflight[0], "mean": self._inflight[2].clone()}
        return {**super().state_dict(), "theta": self.theta.clone(),
                "velocity": self.velocity.clone(), "pending": pending}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.theta.copy_(state["theta"])
        self.velocity.copy_(state["velocity"])
        self._finish()
        self._inflight = None
        pending = state.get("pending")
        if pending is not None:
            p = int(pending["fragment"])
            lo, hi = self.slices[p]
            payload = self.flat.buffer[lo:hi]
            payload.copy_(pending["mean"])
            self._inflight = (p, None, payload, self.comm.world_size)

    def close(self) -> None:
        """Wait for an exchange still in flight (its result is not merged)."""
        if self._inflight is not None and self._inflight[1] is not None:
            self._inflight[1].wait()
        self._inflight = None
        super().close()
