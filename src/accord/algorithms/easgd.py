"""EASGD: elastic averaging SGD, synchronous, with the centre replicated on every rank.

Paper: Zhang, Choromanska, LeCun, "Deep learning with Elastic Averaging SGD",
NeurIPS 2015, arXiv 1412.6651.

Update rule (N workers, centre c identical on every rank, alpha = beta / N)::

    every step:             x_i <- local_optimizer_step(x_i, g_i)
    every `period` steps:   m   = mean_j x_j                       (one allreduce)
                            x_i <- x_i - alpha (x_i - c)           (old centre)
                            c   <- c + beta (m - c)                (old x_j)

so the centre moves by alpha sum_j (x_j - c).

Both updates use the values from before the exchange. EAMSGD, the momentum variant, is
this algorithm with a local Nesterov-momentum optimizer: ``--optimizer nesterov
--set momentum=0.99`` (the paper's delta). Give ``alpha`` or ``beta`` (default beta 0.9,
the paper's choice, so the centre's step does not depend on N). The evaluation model of a
run is the centre.

Hook: ``after_step``. Communication: one model-size allreduce every ``period`` steps.
Float buffers follow the same elastic rule; optimizer state stays local.

``asynchronous=True``: the exchanges run on the background engine
(:mod:`accord.exchange.background`), each worker at its own pace. At each of its communication
points (every ``period`` of its own steps) a worker deposits x_i and activates round c_i
(its communication count); the engines of all workers then run the round with the model
each last deposited, so a slow worker's stale model takes part without being waited for.
Every engine applies the same centre update c <- c + beta sum_j w_j (d_j - c) (the centre
stays replicated and identical on every rank), and the worker pulls itself toward the
centre the newest completed round started from: x_i <- x_i - alpha (x_i - c). A worker
waits only for the communication of its own round, never for another's compute. With
every worker on time the rounds and values are exactly the synchronous ones.

``weighting=dynamic`` (the failure mitigation of Xu and Carr, arXiv 2409.09242; their
formula is not available, the rule here is designed for this library): the centre update
weighs worker j by w_j proportional to 2 ** (-(s_j / half_life) ** 2), where s_j is the
number of steps since j's last *fresh progress*: a contribution that differs from j's
previous one and follows at least one healthy step (a step whose gradient the loop did
not exclude as non-finite, ``StepContext.healthy``); 0 if its model is not finite;
weights are renormalised over the survivors (see :mod:`accord.exchange.background`). Staleness
is counted in exchanges times ``period``. A frozen worker (same model every exchange), a
worker whose gradients are all excluded, and, asynchronously, one whose deposit stops
being renewed all fade, whatever the local optimizer (momentum, Nesterov, Adam and weight
decay move a failed worker's model, which is why health is reported, not inferred).
Uniform weights w_j = 1/N are the paper's EASGD. Dynamic weighting costs one extra
4-number all-gather per exchange and, synchronously, one model-size copy to tell whether
the model changed. A crashed worker ends the run in both modes (the launcher stops the
world and names the rank); a frozen or slow one is what the weighting is for. Under
``accord train --fault-tolerant`` (synchronous only) a crashed worker leaves the quorum
instead: the weights are computed over the participants of each exchange, so they are
renormalised over the survivors, and a worker that joins the running job (``--respawn``)
starts with a live peer's state and fades in: its raw weight is multiplied by
min(1, (steps since it joined + 1) / half_life) (:meth:`ElasticAveraging.fade`), since
its first models are copies of that peer's.

Memory, asynchronous: the engine keeps no per-round results (the centre moves on the
runner thread), so a persistently slow worker costs nothing that grows.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import torch

from ..core import Hyper, StepContext, due
from ..exchange.background import ExchangeEngine, Progress, RoundResult, Weighting, group_round
from . import register
from ._model import ModelAggregator

DEFAULT_BETA = 0.9


def elastic_exchange(
    x: torch.Tensor, centre: torch.Tensor, mean: torch.Tensor, alpha: float, beta: float
) -> torch.Tensor:
    """In place, both from the old values: x -= alpha (x - c); c += beta (mean - c).
    Returns ||x - c|| before the exchange (a tensor)."""
    diff = x - centre
    centre.add_(mean - centre, alpha=beta)
    x.sub_(diff, alpha=alpha)
    return diff.norm()


@register
class ElasticAveraging(ModelAggregator):
    name = "easgd"
    description = "elastic averaging SGD: workers and a replicated centre pull on each other"
    paper = "Deep learning with Elastic Averaging SGD, arXiv 1412.6651"
    compressible = True
    fault_tolerant = ("beta is kept and alpha = beta / N follows N; the centre is replicated "
                      "(rolled back with a discarded step, sent to a joiner); dynamic weights "
                      "renormalise over the participants, a joiner's fades in")
    hyperparameters = {
        "alpha": Hyper(None, float, "elastic pull of a worker toward the centre (beta / N)",
                       low=0.0, high=1.0),
        "beta": Hyper(None, float, f"centre's moving rate N alpha (default {DEFAULT_BETA})",
                      low=0.0, high=1.0),
        "period": Hyper(4, int, "local steps between elastic exchanges", low=1),
        "asynchronous": Hyper(False, bool, "exchange through the background engine, each "
                              "worker at its own pace"),
        "weighting": Hyper("uniform", str, "weights of the workers in the centre update",
                           choices=("uniform", "dynamic")),
        "half_life": Hyper(None, float, "dynamic weighting: staleness (steps) that halves "
                           "a worker's weight (default: 2 period)", low=0.0, low_open=True),
        "timeout": Hyper(60.0, float, "asynchronous: seconds an exchange round may take",
                         low=0.0, low_open=True),
    }

    def on_world_change(self, launch_world_size: int) -> None:
        # beta (the centre's moving rate) is kept and alpha = beta / N follows N; a given
        # alpha meant beta = alpha * N at launch
        if self.hp.get("alpha") is not None:
            self.beta = min(1.0, self.hp["alpha"] * launch_world_size)
        self.alpha = self.beta / self.world_size

    @classmethod
    def check_fault_tolerant(cls, hp: Mapping[str, Any]) -> None:
        if hp.get("asynchronous"):
            raise ValueError("--fault-tolerant: easgd asynchronous=true is refused: its "
                             "background engine has fixed ranks and its own store")

    @classmethod
    def check(cls, hp: Mapping[str, Any], world_size: int) -> None:
        if hp["alpha"] is not None and hp["beta"] is not None:
            raise ValueError("easgd: give alpha or beta, not both (beta = N alpha)")
        if hp["alpha"] is not None and hp["alpha"] * world_size > 1.0:
            raise ValueError(f"easgd: beta = N alpha = {hp['alpha'] * world_size:g} with "
                             f"N = {world_size}; allowed: alpha <= {1 / world_size:g}")

    def __init__(self, params, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        n = self.world_size
        if self.hp["alpha"] is not None:
            self.alpha, self.beta = self.hp["alpha"], self.hp["alpha"] * n
        else:
            self.beta = DEFAULT_BETA if self.hp["beta"] is None else self.hp["beta"]
            self.alpha = self.beta / n
        self.centre = self.load_state().clone()
        self.mean = self.flat.new_buffer()
        self._distance = self.centre.new_zeros(())  # read in metrics(), not per exchange
        half_life = self.hp["half_life"] or 2.0 * self.hp["period"]
        self.weighting = Weighting(self.hp["weighting"], half_life,
                                   steps_per_round=self.hp["period"])
        self.progress: Progress | None = None
        self.exchanges = 0
        self._last: RoundResult | None = None
        self.engine: ExchangeEngine | None = None
        # the engine thread moves the centre; everything reading it takes this lock
        self._centre_lock = threading.Lock()
        if self.hp["asynchronous"] and n > 1:
            # the centre the newest completed round started from
            self._round_centre = self.centre.clone()
            self.engine = self._make_engine(0)
        elif self.hp["weighting"] == "dynamic":
            # also with one worker: a fault-tolerant run builds it in a world of one
            self.progress = Progress(self.centre, track=True)
        #: fault-tolerant runs: the step at which this worker joined a running job (its
        #: weight then fades in, see :meth:`note_join`); None: it did not join late
        self.joined_at: int | None = None

    @property
    def avoids_waits(self) -> bool:
        return self.engine is not None

    def _make_engine(self, first_round: int) -> ExchangeEngine:
        everyone = [self.comm.global_rank(r) for r in range(self.world_size)]
        return ExchangeEngine(self.centre, lambda k: everyone, [everyone], self.weighting,
                              self.comm.stats, timeout=self.hp["timeout"],
                              on_round=self._move_centre, first_round=first_round)

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        if self.engine is not None:
            self.engine.note(ctx.healthy)
        elif self.progress is not None:
            self.progress.note(ctx.healthy)
        if not due(ctx.step, self.hp["period"]):
            return
        x = self.load_state()
        if self.engine is not None:
            self._exchange_async(x, ctx.step)
        elif self.hp["weighting"] == "uniform":
            self.mean.copy_(x)
            self.comm.all_reduce_(self.mean, op="avg")
            self._distance = elastic_exchange(x, self.centre, self.mean, self.alpha,
                                              self.beta)
        else:
            k = self.exchanges
            result = group_round(self.comm, x, ctx.step, self.progress.observe(x, k),
                                 self.comm.global_rank(self.rank), self.weighting, k,
                                 trust=self.fade(ctx.step))
            self._last = result.light()
            # no surviving contribution (every model non-finite): the centre stays put
            mean = torch.where(result.valid, result.mean, self.centre)
            self._distance = elastic_exchange(x, self.centre, mean, self.alpha, self.beta)
        self.exchanges += 1
        self.store_state(x)

    def note_join(self, step: int) -> None:
        """Fault-tolerant runs: this worker joined the running job at ``step`` (with a
        live peer's model, optimizer and algorithm state). Under dynamic weighting its
        contribution then fades in (:meth:`fade`) instead of counting the peer's model
        twice at full weight."""
        self.joined_at = int(step)

    def fade(self, step: int) -> float:
        """The fade-in factor of this worker's raw dynamic weight at ``step``: 1 unless
        it joined late; after joining at step j it is min(1, (step - j + 1) / half_life),
        the share of a half-life it has trained on its own (steps j..step)."""
        if self.joined_at is None:
            return 1.0
        return min(1.0, (step - self.joined_at + 1) / self.weighting.half_life)

    def _move_centre(self, result: RoundResult) -> None:
        """On the engine thread after each round: c <- c + beta (weighted mean - c).
        Keeps nothing for the compute thread (it reads the centre the round started from)."""
        with self._centre_lock:
            self._round_centre.copy_(self.centre)
            # the round's mean is in host memory; no surviving contribution: no move
            mean = result.mean.to(self.centre.device)
            valid = result.valid.to(self.centre.device)
            self.centre.add_(torch.where(valid, mean, self.centre) - self.centre,
                             alpha=self.beta)
            self._last = result.light()
        return None

    def _exchange_async(self, x: torch.Tensor, step: int) -> None:
        engine = self.engine
        engine.deposit(x, version=step)
        engine.request(self.exchanges)
        engine.wait(self.exchanges)  # our round's communication only
        with self._centre_lock:
            centre = self._round_centre  # the newest round, which may be later than ours
            diff = x - centre
            self._distance = diff.norm()
            x.sub_(diff, alpha=self.alpha)

    def consensus_params(self) -> list[torch.Tensor]:
        with self._centre_lock:
            return self.flat.split(self.centre.clone())

    def metrics(self) -> dict[str, float]:
        out = {"alpha": self.alpha, "beta": self.beta, "distance_to_centre": float(self._distance),
               "exchanges": float(self.exchanges)}
        with self._centre_lock:
            last = self._last
        if last is not None:
            out["weight_min"] = float(min(last.weights))
            # this worker's own weight relative to uniform (1: uniform; 0: faded out)
            out["weight_own_rel"] = last.own_weight * len(last.ranks)
            out["staleness_max"] = float(max(last.staleness))
        if self.engine is not None:
            out.update(self.engine.metrics())
        return out


    def state_dict(self) -> dict[str, Any]:
        with self._centre_lock:
            last = None if self._last is None else self._last.state_dict()
            return {**super().state_dict(), "centre": self.centre.clone(),
                    "exchanges": self.exchanges, "distance": self._distance.clone(),
                    "last_round": last,
                    "progress": None if self.progress is None else self.progress.state_dict()}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        with self._centre_lock:
            self.centre.copy_(state["centre"])
            self.exchanges = int(state.get("exchanges", 0))
            if "distance" in state:
                self._distance = state["distance"].to(self.centre.device).clone()
            self._last = RoundResult.from_state(state.get("last_round"))
            if self.engine is not None:
                self._round_centre.copy_(self.centre)
        if self.engine is not None:
            # a new engine numbered from the checkpoint's round (collective: every rank
            # loads its state at the same point); the old one never ran a round
            self.engine.close()
            self.engine = self._make_engine(self.exchanges)
        if self.progress is not None and state.get("progress") is not None:
            self.progress.load_state_dict(state["progress"])
