"""Fault and straggler injection and the non-finite gradient guard.

Parsing and the seeded draws are checked directly; behaviour is checked through the real
training loop (``run_worker``) on gloo worlds of 2, reading what rank 0 logged.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from worlds import run_world

from accord import cli
from accord.run import faults
from accord.run.config import ConfigError, TrainConfig
from accord.run.metrics import read_metrics
from accord.run.train import nonfinite_grads, run_worker
from accord.run.validation import validate


@pytest.mark.parametrize("spec", [
    "crash:rank=1,step=3", "kill:rank=0,step=0", "hang:rank=1,step=4", "nan:rank=1,step=2",
    "nan:rank=1,step=2,value=inf",
    "freeze:rank=1,start=2,end=5", "delay:rank=1,seconds=0.5", "delay:rank=random,seconds=0",
    "delay:rank=all,seconds=0.01,start=1,end=3", "delay:rank=0,median=0.1,sigma=0.5",
    "slow:rank=random,factor=4", "slow:rank=1,factor=1,start=0,end=10",
])
def test_every_kind_parses(spec):
    f = faults.parse(spec, workers=2, steps=10)
    assert f.spec == spec and f.kind == spec.split(":")[0]


@pytest.mark.parametrize("spec,needle", [
    ("boom:rank=0,step=1", "unknown kind 'boom'"),
    ("crash:rank=2,step=1", "rank must be in [0, 1]"),
    ("crash:rank=0", "missing step; crash needs rank, step"),
    ("hang:rank=1", "missing step; hang needs rank, step"),
    ("crash:rank=0,step=1,step=2", "step given twice"),
    ("freeze:rank=0,start=1", "missing end"),
    ("crash:rank=0,step=10", "step must be in [0, 9]"),
    ("crash:rank=0,step=x", "step must be an integer"),
    ("freeze:rank=0,start=5,end=5", "start < end"),
    ("freeze:rank=0,start=0,end=11", "end <= 10"),
    ("slow:rank=0,factor=0.5", "factor must be a number >= 1"),
    ("delay:rank=0", "give seconds=X"),
    ("delay:rank=0,seconds=1,median=1,sigma=1", "give seconds=X"),
    ("delay:rank=0,median=1", "needs both median and sigma"),
    ("delay:rank=0,seconds=-1", "seconds must be a number >= 0"),
    ("nan:rank=0,step=1,value=zero", "value must be 'nan' or 'inf'"),
    ("slow:rank=all,factor=2", "rank must be in"),
    ("crash:rank=random,step=1", "rank must be in"),
    ("delay:rank=0,seconds=1,speed=2", "bad item 'speed=2'"),
])
def test_bad_specs_are_one_line_errors(spec, needle):
    with pytest.raises(ValueError) as err:
        faults.parse(spec, workers=2, steps=10)
    message = str(err.value)
    assert needle in message and spec in message and "\n" not in message


def test_random_rank_is_shared_reproducible_and_covers_the_ranks():
    picks = [faults.random_rank(3, 1, step, 8) for step in range(400)]
    assert picks == [faults.random_rank(3, 1, step, 8) for step in range(400)]
    assert picks != [faults.random_rank(4, 1, step, 8) for step in range(400)]
    counts = [picks.count(r) for r in range(8)]
    assert min(counts) > 25 and max(counts) < 80  # 50 expected each
    # every rank's injector agrees on who is slow at each step
    spec = faults.parse("delay:rank=random,seconds=0.5", 8, 400)
    owed = [[bool(faults.Injector([spec], r, 8, seed=3).delay_seconds(s, 0.0))
             for r in range(8)] for s in range(50)]
    assert all(sum(row) == 1 for row in owed)
    assert [row.index(True) for row in owed] == [faults.random_rank(3, 0, s, 8)
                                                 for s in range(50)]


def test_lognormal_delays_have_the_requested_median_and_reproduce():
    f = faults.parse("delay:rank=0,median=0.2,sigma=0.5", 2, 4000)
    draws = [faults.lognormal_delay(f, 9, 0, 0, s) for s in range(4000)]
    assert draws == [faults.lognormal_delay(f, 9, 0, 0, s) for s in range(4000)]
    assert statistics.median(draws) == pytest.approx(0.2, rel=0.05)
    logs = [math.log(d) for d in draws]
    assert statistics.stdev(logs) == pytest.approx(0.5, rel=0.05)


def test_injector_sleeps_and_records_delays_in_their_window():
    slept = []
    specs = [faults.parse(s, 2, 10) for s in ("delay:rank=1,seconds=0.25,start=2,end=4",
                                              "slow:rank=1,factor=3", "delay:rank=all,seconds=0.1")]
    inj = faults.Injector(specs, 1, 2, seed=0, sleep=slept.append)
    totals = [inj.after_compute(step, compute_s=0.01) for step in range(5)]
    assert totals == pytest.approx([0.12, 0.12, 0.37, 0.37, 0.12])
    assert slept == pytest.approx([0.02, 0.1, 0.02, 0.1, 0.25, 0.02, 0.1, 0.25, 0.02, 0.1,
                                   0.02, 0.1])
    kinds = [(e["step"], e["kind"]) for e in inj.drain()]
    # the every-rank delay is emulated compute, not an event
    assert kinds == [(0, "slow"), (1, "slow"), (2, "delay"), (2, "slow"), (3, "delay"),
                     (3, "slow"), (4, "slow")]
    assert faults.Injector(specs, 0, 2, sleep=slept.append).after_compute(0, 0.01) == \
        pytest.approx(0.1)


def test_nonfinite_grads_is_exact():
    a, b, c = (torch.zeros(3, requires_grad=True) for _ in range(3))
    assert not nonfinite_grads([a, b]) and not nonfinite_grads([])  # no gradients at all
    a.grad, b.grad = torch.full((3,), 3e38), torch.full((3,), -3e38)
    assert not nonfinite_grads([a, b, c])  # huge but finite: no overflow, c has no grad
    for bad in (float("nan"), float("inf"), -float("inf")):
        b.grad = torch.tensor([0.0, bad, 0.0])
        assert nonfinite_grads([a, b, c])


def test_freeze_restores_parameters_and_buffers_every_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    state = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    inj = faults.Injector([faults.parse("freeze:rank=1,start=1,end=3", 2, 5)], 1, 2)
    seen = []
    for step in range(5):
        frozen = inj.freeze_active(step)
        if frozen:
            inj.freeze_snapshot(step, state)
        opt.zero_grad()
        model(torch.randn(8, 3)).pow(2).sum().backward()  # updates the BN statistics too
        if frozen:
            inj.freeze_grads(step, state, params)
            assert all(float(p.grad.abs().sum()) == 0 for p in params)
            seen.append([t.clone() for t in state])  # what the aggregator would see
        opt.step()  # momentum from step 0 still moves a zero-gradient model
        if frozen:
            inj.restore(step, state)
        seen.append([t.clone() for t in state])
    # seen: after 0, [offered 1, after 1, offered 2, after 2], after 3, after 4
    snapshot = seen[0]
    for later in seen[1:5]:
        assert all(torch.equal(x, y) for x, y in zip(snapshot, later, strict=True))
    assert not torch.equal(seen[5][0], snapshot[0])  # learns again at step 3
    assert [(e["step"], e["kind"]) for e in inj.drain()] == [(1, "freeze"), (2, "unfreeze")]
    assert not faults.Injector(inj.all, 0, 2).freeze_active(1)  # only rank 1 is frozen


def test_nonfinite_setting_is_validated_and_reaches_the_workers(tmp_path):
    cfg = TrainConfig(out=str(tmp_path), nonfinite="sometimes")
    with pytest.raises(ConfigError, match=r"^nonfinite: got 'sometimes', allowed: exclude, "
                                          r"skip, off$"):
        validate(cfg)
    cfg = TrainConfig(out=str(tmp_path), nonfinite="skip", steps=20,
                      faults=["delay:rank=random,median=0.01,sigma=1,start=3,end=9",
                              "nan:rank=1,step=4,value=inf"])
    validate(cfg)
    args = cli.build_parser().parse_args(["train", *cfg.to_argv()])
    again = cli._config_from_args(args)
    assert again.nonfinite == "skip" and again.faults == cfg.faults


def _runs(rank, world, base, runs):
    out = {}
    for name, (algo, hp, extra) in runs.items():
        settings = {"steps": 8, "seed": 1, "log_every": 1, "lr": 0.05, **extra}
        cfg = TrainConfig(algo=algo, task="digits", workers=world, out=f"{base}/{name}",
                          progress=False, hyperparameters=dict(hp), **settings)
        run_worker(cfg)
        if rank == 0:
            out[name] = read_metrics(f"{base}/{name}/metrics.jsonl")
    return out


RUNS = {
    "off_allreduce": ("allreduce", {}, {"faults": ["nan:rank=1,step=2"], "nonfinite": "off"}),
    "exclude_allreduce": ("allreduce", {}, {"faults": ["nan:rank=1,step=2"]}),
    "skip_allreduce": ("allreduce", {}, {"faults": ["nan:rank=1,step=2,value=inf"],
                                         "nonfinite": "skip"}),
    "off_local": ("local_sgd", {"period": 2}, {"faults": ["nan:rank=1,step=2"],
                                               "nonfinite": "off"}),
    "exclude_local": ("local_sgd", {"period": 2}, {"faults": ["nan:rank=1,step=2"]}),
    "skip_local": ("local_sgd", {"period": 2}, {"faults": ["nan:rank=1,step=2"],
                                                "nonfinite": "skip"}),
    "exclude_wagma": ("wagma", {"period": 3}, {"faults": ["nan:rank=1,step=2"]}),
    "clean_allreduce": ("allreduce", {}, {}),
    "clean_local": ("local_sgd", {"period": 2}, {}),
    # no collective before the last step's record: each rank's wall time is its own
    "straggler": ("local_sgd", {"period": 100}, {"log_every": 8, "faults": [
        "delay:rank=1,seconds=0.05", "slow:rank=random,factor=2"]}),
    "freeze": ("local_sgd", {"period": 100}, {"faults": ["freeze:rank=0,start=3,end=6",
                                                         "delay:rank=1,seconds=0.01",
                                                         "slow:rank=0,factor=2,start=7"]}),
}


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    return run_world(_runs, 2, str(base), RUNS)[0]


def _steps(records):
    return [r for r in records if r["type"] == "step"]


def test_nan_reaches_the_other_rank_only_without_the_guard(logged):
    for algo in ("allreduce", "local"):
        off = _steps(logged[f"off_{algo}"])
        # the NaN of rank 1 at step 2 poisons rank 0's replica through the average
        assert all(r["rank0_eval_loss"] is not None for r in off[:2])
        assert all(r["rank0_eval_loss"] is None for r in off[4:])
        for mode in ("exclude", "skip"):
            records = logged[f"{mode}_{algo}"]
            steps = _steps(records)
            assert all(r["rank0_eval_loss"] is not None and r["eval_loss"] is not None
                       and r["loss"] is not None for r in steps)
            events = [r for r in records if r["type"] == "event"]
            assert [(e["step"], e["rank"], e["kind"]) for e in events] == \
                [(2, 1, "nan"), (2, 1, "nonfinite_grad")]
            assert records[-1]["events"] == {"nan": 1, "nonfinite_grad": 1}
    assert all(r["eval_loss"] is not None for r in _steps(logged["exclude_wagma"]))


def test_skip_mode_skips_the_step_on_every_rank(logged):
    keys = ("rank0_eval_loss", "eval_loss", "consensus_distance")
    for algo in ("allreduce", "local"):
        skip = _steps(logged[f"skip_{algo}"])
        clean = _steps(logged[f"clean_{algo}"])
        exclude = _steps(logged[f"exclude_{algo}"])
        # records are after steps 0..7; before the fault the run is the clean run
        for i in (0, 1):
            assert all(skip[i][k] == clean[i][k] for k in keys)
        # step 2 is skipped on both ranks: rank 0's model and the mean of both unchanged
        assert all(skip[2][k] == clean[1][k] for k in keys)
        assert clean[2]["rank0_eval_loss"] != clean[1]["rank0_eval_loss"]
        assert exclude[2]["rank0_eval_loss"] != exclude[1]["rank0_eval_loss"]
        # and only step 2: training goes on from step 3
        assert all(skip[i + 1]["rank0_eval_loss"] != skip[i]["rank0_eval_loss"]
                   for i in range(2, 7))
        assert skip[3]["rank0_eval_loss"] != clean[3]["rank0_eval_loss"]
    assert all(r["consensus_distance"] == 0 for r in _steps(logged["skip_allreduce"]))
    events = [r for r in logged["skip_allreduce"] if r["type"] == "event"]
    assert events[1] == {"type": "event", "step": 2, "rank": 1, "kind": "nonfinite_grad",
                         "action": "skipped step"}
    assert [r["events"] for r in _steps(logged["skip_allreduce"])] == [0, 0, 2, 0, 0, 0, 0, 0]


def test_delays_hit_exactly_the_configured_rank_and_steps(logged):
    records = logged["straggler"]
    events = [r for r in records if r["type"] == "event"]
    assert {e["kind"] for e in events} == {"delay", "slow"}

    def slept(kind, rank):
        """(step, seconds) of every ``kind`` event of ``rank``, duplicates kept."""
        return sorted((e["step"], e["seconds"]) for e in events
                      if e["kind"] == kind and e["rank"] == rank)

    # delay:rank=1,seconds=0.05 -- rank 1 sleeps 0.05 s once at each of the 8 steps,
    # rank 0 never
    assert slept("delay", 1) == [(s, 0.05) for s in range(8)]
    assert slept("delay", 0) == []
    # slow:rank=random -- at every step exactly the rank all ranks' generators pick (fault
    # index 1, seed 1) sleeps, once, a positive time; the other rank does not
    chosen = {r: [s for s in range(8) if faults.random_rank(1, 1, s, 2) == r] for r in (0, 1)}
    assert chosen[0] and chosen[1]  # the draw exercises both ranks
    for r in (0, 1):
        assert [s for s, _ in slept("slow", r)] == chosen[r]
        assert all(seconds > 0 for _, seconds in slept("slow", r))
    summary = records[-1]
    assert summary["events"] == {"delay": 8, "slow": 8}
    assert len(summary["worker_time_s"]) == 2


def test_frozen_rank_keeps_its_snapshot_for_the_window(logged):
    records = logged["freeze"]
    losses = [r["rank0_eval_loss"] for r in _steps(records)]
    # snapshot = the model after step 2 (record 2); steps 3, 4, 5 are frozen
    assert losses[2] == losses[3] == losses[4] == losses[5]
    assert losses[6] != losses[5] and losses[1] != losses[2]
    events = [(e["step"], e["rank"], e["kind"]) for e in records if e["type"] == "event"]
    assert (3, 0, "freeze") in events and (5, 0, "unfreeze") in events
    delays = [e for e in records if e["type"] == "event" and e["kind"] == "delay"]
    assert [e["step"] for e in delays] == list(range(8))
    assert all(e["rank"] == 1 and e["seconds"] == 0.01 for e in delays)
    slow = [e for e in records if e["type"] == "event" and e["kind"] == "slow"]
    assert [e["step"] for e in slow] == [7] and slow[0]["seconds"] > 0
    summary = records[-1]
    assert summary["events"]["delay"] == 8 and len(summary["worker_time_s"]) == 2


def _every_algorithm_with_a_nan(rank, world, base):
    from accord import algorithms

    variants = {algo: {"period": 2} if "period" in cls.hyperparameters else {}
                for algo, cls in algorithms.REGISTRY.items()}
    variants["easgd"]["asynchronous"] = True
    out = {}
    for algo, hp in variants.items():
        cfg = TrainConfig(algo=algo, task="digits", workers=world, steps=6, log_every=1,
                          out=f"{base}/{algo}", progress=False, hyperparameters=hp,
                          faults=[f"nan:rank={world - 1},step=1"])
        run_worker(cfg)
        if rank == 0:
            out[algo] = read_metrics(f"{base}/{algo}/metrics.jsonl")
    return out


def test_a_nan_gradient_never_reaches_another_rank_under_any_algorithm(tmp_path):
    from accord import algorithms

    logged = run_world(_every_algorithm_with_a_nan, 2, str(tmp_path))[0]
    assert set(logged) == set(algorithms.REGISTRY)
    for algo, records in logged.items():
        steps = _steps(records)
        assert len(steps) == 6, algo
        for r in steps:  # rank 0's own replica and the consensus stay finite
            assert r["rank0_eval_loss"] is not None and r["eval_loss"] is not None, algo
        assert records[-1]["events"] == {"nan": 1, "nonfinite_grad": 1}, algo
