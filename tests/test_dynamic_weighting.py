"""Dynamic weighting through the real training loop (``run_worker``) on a gloo world of 3:
a frozen worker, or one whose every gradient is non-finite and excluded, fades out of the
consensus under every local optimizer, for synchronous and asynchronous EASGD and for
wait-avoiding WAGMA. Rank 0 is the failed worker, so its own weight relative to uniform
(``weight_own_rel``) is in the records rank 0 writes.
"""

from __future__ import annotations

import pytest
from worlds import run_world

from accord.run.config import TrainConfig
from accord.run.metrics import read_metrics
from accord.run.train import run_worker

HALF_LIFE = 4.0
START = 2  # the failure starts at this step and lasts to the end
PERIOD = 2  # easgd's exchange period
STEPS = START + int(3 * HALF_LIFE) + 2 * PERIOD
OPTIMIZERS = {
    "sgd": {"optimizer": "sgd", "lr": 0.05},
    "momentum": {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 1e-3, "lr": 0.05},
    "nesterov": {"optimizer": "nesterov", "momentum": 0.9, "lr": 0.05},
    "adam": {"optimizer": "adam", "lr": 3e-3},
    "adamw": {"optimizer": "adamw", "weight_decay": 0.01, "lr": 3e-3},
}
ALGOS = {
    "easgd_sync": ("easgd", {"period": PERIOD, "weighting": "dynamic",
                             "half_life": HALF_LIFE}),
    "easgd_async": ("easgd", {"period": PERIOD, "weighting": "dynamic", "half_life": HALF_LIFE,
                              "asynchronous": True}),
    "wagma": ("wagma", {"period": 100, "weighting": "dynamic", "half_life": HALF_LIFE}),
}
FREEZE = [f"freeze:rank=0,start={START},end={STEPS}"]
NAN = [f"nan:rank=0,step={s}" for s in range(START, STEPS)]


def _runs():
    runs = {}
    for algo_name, (algo, hp) in ALGOS.items():
        for opt_name, opt in OPTIMIZERS.items():
            runs[f"freeze/{algo_name}/{opt_name}"] = (algo, hp, {**opt, "faults": FREEZE})
        runs[f"nan/{algo_name}/adam"] = (algo, hp, {**OPTIMIZERS["adam"], "faults": NAN})
        runs[f"clean/{algo_name}/adam"] = (algo, hp, dict(OPTIMIZERS["adam"]))
    return runs


def _world(rank, world, base):
    out = {}
    for name, (algo, hp, settings) in _runs().items():
        cfg = TrainConfig(algo=algo, task="digits", workers=world, steps=STEPS, seed=2,
                          log_every=2, out=f"{base}/{name.replace('/', '_')}",
                          progress=False, hyperparameters=dict(hp), **settings)
        run_worker(cfg)
        if rank == 0:
            out[name] = [r for r in read_metrics(f"{base}/{name.replace('/', '_')}/"
                                                 "metrics.jsonl") if r["type"] == "step"]
    return out


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return run_world(_world, 3, str(tmp_path_factory.mktemp("dynamic")))[0]


@pytest.mark.parametrize("algo", sorted(ALGOS))
@pytest.mark.parametrize("failure", ["freeze", "nan"])
def test_a_failed_worker_fades_below_a_tenth_of_uniform_within_three_half_lives(
        records, algo, failure):
    optimizers = OPTIMIZERS if failure == "freeze" else ["adam"]
    for opt in optimizers:
        steps = records[f"{failure}/{algo}/{opt}"]
        rel = {r["step"]: r["algo"]["weight_own_rel"] for r in steps}
        # asynchronous rounds may take a contribution one exchange later, and one round of
        # lateness also lowers the healthy workers' weights a little: one period of grace
        grace = PERIOD if algo == "easgd_async" else 0
        late = [w for s, w in rel.items() if s >= START + 3 * HALF_LIFE + grace]
        assert late and max(late) < 0.1, (opt, rel)
        # and it was not faded before the failure had time to show
        assert rel[2] > 0.5, (opt, rel)


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_a_healthy_worker_keeps_about_uniform_weight(records, algo):
    steps = records[f"clean/{algo}/adam"]
    assert min(r["algo"]["weight_own_rel"] for r in steps) > 0.5


def _trusted_round(rank, world):
    import torch

    from accord.comm import Communicator
    from accord.exchange.background import Weighting, group_round

    deposit = torch.full((3,), float(rank + 1))
    trust = 0.25 if rank == 1 else 1.0
    result = group_round(Communicator(), deposit, 0, 0, rank, Weighting("dynamic", 4.0), 0,
                         trust=trust)
    return result.weight.tolist(), result.mean.tolist()


def test_trust_scales_a_members_raw_weight_before_renormalising():
    """A joiner's fade-in factor multiplies its raw weight: trust 1 and 0.25 at equal
    staleness give weights 0.8 and 0.2 on both ranks, and the mean 0.8 * 1 + 0.2 * 2."""
    for weight, mean in run_world(_trusted_round, 2):
        assert weight == pytest.approx([0.8, 0.2], abs=1e-12)
        assert mean == pytest.approx([1.2] * 3, abs=1e-6)


def _fades(rank, world):
    import torch

    from accord.algorithms import build
    from accord.core import StepContext

    model = torch.nn.Linear(3, 2)
    agg = build("easgd", model.parameters(), broadcast=False, period=2,
                weighting="dynamic", half_life=8.0)
    fades = [agg.fade(5)]  # launched with the job: no fade
    agg.note_join(10)
    fades += [agg.fade(s) for s in (10, 13, 17, 40)]
    # a world of one (how a fault-tolerant worker builds it) exchanges: centre -> model
    with torch.no_grad():
        model.weight.add_(1.0)
    agg.after_step(StepContext(step=11, loss=torch.zeros(()), healthy=True))
    moved = (agg.centre - torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    agg.close()
    return fades, float(moved.abs().max())


def test_a_joiner_fades_in_over_a_half_life():
    [(fades, gap)] = run_world(_fades, 1)
    assert fades == [1.0, 1 / 8, 0.5, 1.0, 1.0]
    # alone, weight 1: c += 0.9 (x - c), x -= 0.9 (x - c), from a gap of 1 on the weights
    assert gap == pytest.approx(0.8, abs=1e-6)
