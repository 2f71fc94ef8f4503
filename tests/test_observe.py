"""Observing a run does not change it: records of asynchronous algorithms add no global
wait (accord.observe), and the same seed gives the same run bit for bit, whatever draws
from the global generators (AdaHessian's Hutchinson probes, dropout)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from worlds import run_world

from accord import algorithms
from accord.comm import Communicator
from accord.observe import SNAPSHOTS, AsyncObserver, ConsensusProbe
from accord.run.config import TrainConfig


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train_world(rank, world, cfg_kwargs):
    from accord.run.train import run_worker

    return run_worker(TrainConfig(**cfg_kwargs))


SLOW = ["delay:rank=2,seconds=0.05", "delay:rank=3,seconds=0.05"]


@pytest.mark.parametrize("algo,sets", [
    ("wagma", {"group_size": 2, "period": 1000}),  # ranks 2 and 3 form one group
    ("easgd", {"asynchronous": True}),
])
def test_records_at_the_default_log_every_do_not_make_fast_ranks_wait(tmp_path, algo, sets):
    out = tmp_path / algo
    cfg = dict(algo=algo, task="digits", workers=4, steps=40, out=str(out), progress=False,
               hyperparameters=sets, faults=SLOW, timeout=30)
    assert TrainConfig(**cfg).log_every == 10  # the default, 4 records
    summary = run_world(_train_world, 4, cfg)[0]
    assert summary["status"] == "ok"
    fast, slow = summary["worker_time_s"][:2], summary["worker_time_s"][2:]
    # before: every record was a global barrier, so the fast ranks ran at the slow pace
    assert max(fast) < 0.5 * min(slow), summary["worker_time_s"]
    steps = [r for r in _records(out) if r["type"] == "step"]
    assert [r["step"] for r in steps] == [10, 20, 30, 40]
    for r in steps:
        lo, hi = r["consensus_steps"]
        # each snapshot was taken at the record's step, or later when a fast rank's pool
        # of snapshots ran out; the record says which
        assert r["step"] <= lo <= hi <= 40
        assert r["eval_loss"] is not None and r["consensus_distance"] >= 0
        assert r["record_lag_s"] >= 0
    assert steps[-1]["consensus_steps"] == [40, 40]
    assert summary["eval_loss"] == steps[-1]["eval_loss"]


class _Centre:
    """An aggregator stand-in: the consensus model is a given centre (as EASGD's)."""

    name = "fake"

    def __init__(self, centre):
        self.centre = centre

    def consensus_params(self):
        return self.centre


def _observer_vs_probe(rank, world):
    """The asynchronous observer's numbers equal the inline probe's on the same replicas,
    and a rank far ahead keeps at most SNAPSHOTS snapshots, saying which step it used."""
    torch.manual_seed(rank)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4))
    with torch.no_grad():
        model[1].running_mean.add_(rank)  # a float buffer is part of the consensus
    probe = ConsensusProbe(model, Communicator())
    centre = [torch.full_like(t, 0.5) for t in [*model.parameters(),
                                                 *(b for b in model.buffers()
                                                   if b.is_floating_point())]]
    inline_model, inline_distance = probe.measure(_Centre(None))
    inline = None
    if rank == 0:
        inline = [t.clone() for t in inline_model.state_dict().values()]
    loss = torch.tensor(float(rank + 1))
    inline_loss = Communicator().all_reduce_(loss.reshape(1).clone(), op="avg")
    got = []

    def write(obs, result):
        got.append({"step": obs.step, "loss": result["loss"], "distance": result["distance"],
                    "mean": result["mean"].clone(), "centre": result["centre"],
                    "steps": result["consensus_steps"], "events": result["events"]})
        return {"eval_loss": 1.0}

    obs = AsyncObserver(model, _Centre(centre), world, rank, 30.0, write)
    obs.submit(1, loss, [{"step": 0, "rank": rank, "kind": "probe"}], {} if rank == 0 else None)
    obs.flush()
    # rank 1 runs far ahead: 8 more records while rank 0 has not submitted one
    if rank == 1:
        for step in range(2, 10):
            with torch.no_grad():
                model[0].weight.add_(1.0)
            obs.submit(step, loss, [], None)
        assert sum(s.users > 0 for s in obs.pool) <= SNAPSHOTS
    else:
        time.sleep(1.0)
        for step in range(2, 10):
            obs.submit(step, loss, [], {})
    obs.flush()
    obs.close()
    out = {"inline_distance": inline_distance, "inline_loss": float(inline_loss), "got": got}
    if rank == 0:
        out["inline"] = inline
    return out


def test_the_observer_measures_what_the_inline_probe_does():
    r0, _ = run_world(_observer_vs_probe, 2)
    first = r0["got"][0]
    assert first["loss"] == pytest.approx(r0["inline_loss"], abs=0)
    assert first["distance"] == pytest.approx(r0["inline_distance"], rel=1e-12)
    flat = torch.cat([t.reshape(-1) for t in r0["inline"] if t.is_floating_point()])
    assert torch.allclose(first["mean"], flat, rtol=0, atol=1e-7)
    assert torch.equal(first["centre"], torch.full_like(first["centre"], 0.5))
    assert first["steps"] == [1, 1]
    assert [e["rank"] for e in first["events"]] == [0, 1]
    # records 2..9 in order; rank 1's exhausted pool made some use a later model of it
    got = r0["got"][1:]
    assert [g["step"] for g in got] == list(range(2, 10))
    assert all(g["step"] <= g["steps"][0] <= g["steps"][1] <= 9 for g in got)
    assert any(g["steps"][1] > g["step"] for g in got)


def _diverging(tmp_path: Path, algo: str, sets: dict) -> dict:
    out = tmp_path / algo
    cfg = dict(algo=algo, task="digits", workers=2, steps=60, out=str(out), progress=False,
               hyperparameters=sets, faults=["nan:rank=1,step=3"], nonfinite="off", timeout=30)
    return run_world(_train_world, 2, cfg)[0]


def test_an_asynchronous_run_that_diverges_is_marked_and_stops_where_ranks_meet(tmp_path):
    # wait-avoiding WAGMA stops at a global average after the record that showed it
    summary = _diverging(tmp_path, "wagma", {"period": 5})
    assert summary["status"] == "diverged" and summary["diverged_step"] == 10
    assert summary["steps"] < 60 and summary["steps"] % 5 == 0
    # asynchronous EASGD has no step where all ranks meet: it runs to the end, marked
    summary = _diverging(tmp_path, "easgd", {"asynchronous": True})
    assert summary["status"] == "diverged" and summary["diverged_step"] == 10
    assert summary["steps"] == 60


# -- the same seed, the same run ----------------------------------------------------------

def _dropout_task():
    from accord.tasks import register_task
    from accord.tasks.digits import Digits

    @register_task
    class DigitsDropout(Digits):
        name = "digits-dropout"

        def _model(self):
            return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                       torch.nn.Dropout(0.3), torch.nn.Linear(32, 10))

    return DigitsDropout


SYNCHRONOUS = {"wagma": {"wait_avoiding": False}}


def _twice(rank, world, root, names):
    _dropout_task()
    from accord.run.train import run_worker

    results = {}
    for name in names:
        sets = SYNCHRONOUS.get(name, {})
        for label, task, optimizer, lr in (("adahessian", "digits", "adahessian", 0.05),
                                           ("dropout", "digits-dropout", "sgd", 0.1)):
            runs = []
            for attempt in range(2):
                out = Path(root) / f"{name}-{label}-{attempt}"
                cfg = TrainConfig(algo=name, task=task, workers=world, steps=6, log_every=3,
                                  out=str(out), progress=False, lr=lr, optimizer=optimizer,
                                  hyperparameters=dict(sets), timeout=30)
                if optimizer == "adahessian" and not _allowed(cfg):
                    break  # refused in one line before any worker starts
                run_worker(cfg)
                if rank == 0:
                    runs.append([{k: v for k, v in r.items()
                                  if k in ("step", "loss", "eval_loss", "rank0_eval_loss",
                                           "consensus_distance")}
                                 for r in _records(out) if r["type"] == "step"])
            if rank == 0 and runs:
                results[name, label] = runs
    return results


def _allowed(cfg: TrainConfig) -> bool:
    from accord.run.config import ConfigError
    from accord.run.validation import validate

    try:
        validate(cfg, check_out=False)
    except ConfigError:
        return False
    return True


def test_the_same_seed_gives_the_same_run_bit_for_bit(tmp_path):
    names = sorted(algorithms.REGISTRY)
    results = run_world(_twice, 2, str(tmp_path), names)[0]
    assert len([k for k in results if k[1] == "dropout"]) == len(names)
    # AdaHessian: every model-phase algorithm that does not mix before the step
    assert {k[0] for k in results if k[1] == "adahessian"} >= {"diloco", "easgd", "grawa",
                                                              "local_sgd", "lsgd"}
    for key, (a, b) in results.items():
        assert len(a) == 2 and a == b, key  # every number of every record, exactly
