"""A plugin algorithm: relaxed model averaging, defined outside accord.

Every ``period`` steps each worker moves its parameters a fraction ``gamma`` of the way to
the mean of all workers' parameters::

    x_i <- x_i + gamma * (mean_j x_j - x_i)

``gamma = 1`` is local SGD (a full average); a smaller ``gamma`` keeps some diversity
between the replicas. One average allreduce of the model per period.

Use it from the command line (the file is imported by the launcher and every worker)::

    accord train --plugin examples/plugin_algorithm.py --algo relaxed_avg --set gamma=0.5
    accord bench --plugin examples/plugin_algorithm.py --algos relaxed_avg,local_sgd \\
        --tasks digits --workers 2 --seeds 0 --fault slow:rank=1,factor=3 --out runs/plugin

or from an installed package, through an entry point in its ``pyproject.toml``::

    [project.entry-points."accord.algorithms"]
    relaxed_avg = "my_package.relaxed:RelaxedAveraging"

Everything accord asks about the algorithm is declared on the class below: it acts on
the model (``phase``), its payload is an average allreduce of parameters (so ``--compress
bf16|fp16`` may round it, but low-rank PowerSGD may not), and its membership rule under
``--fault-tolerant``.
"""

from __future__ import annotations

from typing import Any

import torch

import accord
from accord import FlatBuffer, Hyper, StepContext, due


@accord.register
class RelaxedAveraging(accord.Aggregator):
    name = "relaxed_avg"
    description = "relaxed model averaging: move a fraction gamma toward the mean every period"
    paper = "example plugin (gamma = 1 is local SGD)"
    hyperparameters = {
        "period": Hyper(4, int, "local steps between averages", low=1),
        "gamma": Hyper(0.5, float, "fraction of the way to the mean", low=0.0, high=1.0,
                       low_open=True),
    }
    phase = "model"
    compressible = True  # one average allreduce of the parameters
    fault_tolerant = "the mean over the participants; the period counts committed steps"

    def __init__(self, params, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        # parameters, then floating-point buffers (BatchNorm statistics) follow one rule
        self.flat = FlatBuffer(self.params + self.buffers)
        self.syncs = 0

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        if not due(ctx.step, self.hp["period"]):
            return
        mine = self.flat.load_values()
        mean = mine.clone()
        self.comm.all_reduce_(mean, op="avg")
        mine.add_(mean - mine, alpha=self.hp["gamma"])
        self.flat.store_values(mine)
        self.syncs += 1

    def metrics(self) -> dict[str, float]:
        return {"syncs": float(self.syncs)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "syncs": self.syncs}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.syncs = int(state.get("syncs", 0))
