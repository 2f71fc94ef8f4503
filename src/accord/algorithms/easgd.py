"""EASGD: elastic averaging SGD, synchronous, with the centre replicated on every rank.

Paper: Zhang, Choromanska, LeCun, "Deep learning with Elastic Averaging SGD",
NeurIPS 2015, arXiv 1412.6651.

Update rule (N workers, centre c identical on every rank, alpha = beta / N)::

    every step:             x_i <- local_optimizer_step(x_i, g_i)
    every `period` steps:   m   = mean_j x_j                       (one allreduce)
                            x_i <- x_i - alpha (x_i - c)           (old centre)
                            c   <- c + beta (m - c)                (old x_j)

Both updates use the values from before the exchange. EAMSGD is this algorithm with a
Nesterov-momentum local optimizer (``--optimizer nesterov --set momentum=0.99``). Give
``alpha`` or ``beta`` (default beta 0.9). The evaluation model is the centre.

Hook: ``after_step``. Communication: one model-size allreduce every ``period`` steps.
Float buffers follow the elastic rule; optimizer state stays local.

Decisions (in full: docs/algorithms/easgd.md): ``asynchronous=True`` runs the exchanges on
:mod:`accord.exchange.background`, each worker at its own pace, the centre moving
identically on every rank (equal to the synchronous rule when every deposit is fresh);
``weighting=dynamic`` (after Xu and Carr, arXiv 2409.09242; the rule is designed here)
weighs worker j by 2 ** (-(s_j / half_life) ** 2), s_j the steps since its last fresh
progress, 0 if not finite, renormalised (one 4-number all-gather per exchange); under
``--fault-tolerant`` the weights are over the participants and a joiner fades in
(:meth:`ElasticAveraging.fade`)."""

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
