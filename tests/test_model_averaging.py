"""Equivalences and invariants of the model-averaging family on real gloo worlds.

Every rank trains a few steps of each configuration and returns its parameters before and
after each ``after_step`` (and what else a check needs); the parent compares them with
identities between algorithms and with in-process oracles.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from worlds import run_world

import accord
from accord.comm import Communicator
from accord.run.train import ConsensusProbe
from accord.tasks import get_task

STEPS = 6
BATCH = 8
LR = 0.1
SEED = 11

CONFIGS = {
    "allreduce": ("allreduce", {}),
    "local1": ("local_sgd", {"period": 1}),
    "local3": ("local_sgd", {"period": 3}),
    "diloco3": ("diloco", {"period": 3, "outer_lr": 1.0, "outer_momentum": 0.0}),
    "diloco_nesterov": ("diloco", {"period": 3}),
    "easgd0": ("easgd", {"alpha": 0.0, "period": 2}),
    "easgd": ("easgd", {"beta": 0.5, "period": 2}),
    "lsgd": ("lsgd", {"period": 2, "pull": 0.3}),
    "grawa": ("grawa", {"period": 2, "pull": 0.5}),
    "grawa_layer": ("grawa", {"period": 2, "pull": 0.5, "per_layer": True}),
}


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _trace(rank, world, extra_configs):
    task = get_task("digits")(SEED)
    out = {}
    for name, (algo, hp) in {**CONFIGS, **extra_configs}.items():
        model = task.build_model()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        agg = accord.build(algo, model.parameters(), **hp)
        stream = task.train_stream(rank, BATCH)
        tr = {k: [] for k in ("before", "after", "metrics", "grad_norm", "layer_norms", "loss",
                              "centre", "weights")}
        for step in range(STEPS):
            opt.zero_grad(set_to_none=True)
            loss = task.loss(model, next(stream))
            loss.backward()
            tr["grad_norm"].append(float(torch.cat([p.grad.reshape(-1)
                                                    for p in model.parameters()]).norm()))
            tr["layer_norms"].append(torch.stack([p.grad.double().norm()
                                                  for p in model.parameters()]))
            tr["loss"].append(float(loss))
            ctx = accord.StepContext(step=step, loss=loss.detach())
            agg.after_backward(ctx)
            opt.step()
            tr["before"].append(_flat(model))
            if algo == "easgd":
                tr["centre"].append(agg.centre.clone())
            agg.after_step(ctx)
            tr["after"].append(_flat(model))
            tr["metrics"].append(agg.metrics())
            if algo == "grawa":
                tr["weights"].append(agg.weights.clone())
        tr["comm"] = agg.comm.stats.as_dict()
        tr["sizes"] = [p.numel() for p in model.parameters()]
        out[name] = tr
    # consensus probe on a local_sgd run between syncs
    model = task.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    agg = accord.build("local_sgd", model.parameters(), period=100, broadcast=False)
    stream = task.train_stream(rank, BATCH)
    for step in range(2):
        opt.zero_grad()
        task.loss(model, next(stream)).backward()
        opt.step()
        agg.after_step(accord.StepContext(step=step))
    probe_comm = Communicator()
    consensus, distance = ConsensusProbe(model, probe_comm).measure(agg)
    out["probe"] = {"x": _flat(model), "distance": distance,
                    "consensus": None if consensus is None else _flat(consensus),
                    "algo_bytes": agg.comm.stats.bytes}
    # BatchNorm statistics follow the averaging when passed as buffers
    torch.manual_seed(0)
    bn = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    agg = accord.build("local_sgd", bn.parameters(), buffers=bn.buffers(), period=2)
    opt = torch.optim.SGD(bn.parameters(), lr=LR)
    stream = task.train_stream(rank, BATCH)
    stats = []
    for step in range(2):
        opt.zero_grad()
        task.loss(bn, next(stream)).backward()
        opt.step()
        stats.append(bn[1].running_mean.clone())
        agg.after_step(accord.StepContext(step=step))
    out["bn"] = {"before": stats[-1], "after": bn[1].running_mean.clone()}
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"world{n}")
def traces(request):
    world = request.param
    extra = {"lsgd_multi": ("lsgd", {"period": 2, "group_size": 2, "global_period": 4})} \
        if world == 4 else {}
    return world, run_world(_trace, world, extra)


def _close(a, b):
    torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def test_local_sgd_period_1_equals_allreduce(traces):
    world, ranks = traces
    for r in range(world):
        for step in range(STEPS):
            _close(ranks[r]["local1"]["after"][step], ranks[r]["allreduce"]["after"][step])


def test_diloco_outer_lr_1_no_momentum_equals_local_sgd(traces):
    world, ranks = traces
    for r in range(world):
        for step in range(STEPS):
            _close(ranks[r]["diloco3"]["after"][step], ranks[r]["local3"]["after"][step])
    # with the default outer Nesterov step the two differ after the first outer step
    assert not torch.allclose(ranks[0]["diloco_nesterov"]["after"][2],
                              ranks[0]["local3"]["after"][2])


def test_local_sgd_replicas_identical_exactly_after_sync(traces):
    world, ranks = traces
    for step in (2, 5):  # syncs at steps 2 and 5 with period 3
        for r in range(1, world):
            assert torch.equal(ranks[r]["local3"]["after"][step], ranks[0]["local3"]["after"][step])
    assert not torch.equal(ranks[0]["local3"]["after"][0], ranks[1]["local3"]["after"][0])


def test_easgd_alpha_0_is_independent_local_training(traces):
    world, ranks = traces
    task = get_task("digits")(SEED)
    for r in range(world):
        model = task.build_model()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        stream = task.train_stream(r, BATCH)
        for step in range(STEPS):
            opt.zero_grad()
            task.loss(model, next(stream)).backward()
            opt.step()
            _close(ranks[r]["easgd0"]["after"][step], _flat(model))  # threads differ: not bitwise


def test_easgd_exchange_uses_old_values(traces):
    world, ranks = traces
    beta = 0.5
    alpha = beta / world
    for step in range(STEPS):
        mean = torch.stack([ranks[r]["easgd"]["before"][step] for r in range(world)]).mean(0)
        centre = ranks[0]["easgd"]["centre"][step]
        for r in range(world):
            assert torch.equal(ranks[r]["easgd"]["centre"][step], centre)  # replicated
            x = ranks[r]["easgd"]["before"][step]
            expected = x - alpha * (x - centre) if step % 2 == 1 else x
            _close(ranks[r]["easgd"]["after"][step], expected)
        if step % 2 == 1 and step + 1 < STEPS:
            # the centre moves by beta (mean - centre), seen at the next step
            _close(ranks[0]["easgd"]["centre"][step + 1], centre + beta * (mean - centre))
    assert ranks[0]["easgd"]["metrics"][-1]["alpha"] == pytest.approx(alpha)


def _running_losses(ranks, name, step, window):
    return torch.tensor([sum(r[name]["loss"][step - window + 1: step + 1]) / window
                         for r in ranks])


def test_lsgd_leader_agreed_and_unchanged_by_own_pull(traces):
    world, ranks = traces
    for step in (1, 3, 5):  # period 2
        leaders = {r["lsgd"]["metrics"][step]["leader"] for r in ranks}
        assert len(leaders) == 1
        leader = int(leaders.pop())
        assert leader == int(torch.argmin(_running_losses(ranks, "lsgd", step, 2)))
        lead = ranks[leader]["lsgd"]
        assert torch.equal(lead["after"][step], lead["before"][step])
        x_leader = lead["before"][step]
        for r in range(world):
            if r != leader:
                before = ranks[r]["lsgd"]["before"][step]
                after = ranks[r]["lsgd"]["after"][step]
                # pull 0.3 then proximal 0.1/2 toward the same leader copy
                expected = before + 0.3 * (x_leader - before)
                expected = expected + 0.05 * (x_leader - expected)
                _close(after, expected)


def test_lsgd_multi_leader_groups(traces):
    world, ranks = traces
    if world != 4:
        pytest.skip("multi-leader runs at world size 4")
    for step in (1, 3, 5):
        losses = _running_losses(ranks, "lsgd_multi", step, 2)
        m = [r["lsgd_multi"]["metrics"][step] for r in ranks]
        for group in ([0, 1], [2, 3]):
            expected = group[int(torch.argmin(losses[group]))]
            assert {m[r]["leader"] for r in group} == {expected}
        if step == 3:  # global communication every 4 steps
            assert {x["global_leader"] for x in m} == {int(torch.argmin(losses))}


def _inverse_norm_weights(norms: torch.Tensor) -> torch.Tensor:
    """Oracle: column-wise w_i = (1/n_i) / sum_j (1/n_j) over the non-zero norms n (N, L);
    a zero norm gets 0, an all-zero column 1/N."""
    norms = norms.double()
    out = torch.empty_like(norms)
    for col in range(norms.shape[1]):
        inv = [0.0 if n == 0 else 1.0 / float(n) for n in norms[:, col]]
        total = sum(inv)
        out[:, col] = torch.tensor([v / total if total > 0 else 1.0 / len(inv) for v in inv],
                                   dtype=torch.float64)
    return out


def _weighted_centre(xs: torch.Tensor, weights: torch.Tensor, sizes) -> torch.Tensor:
    """sum_i w_i x_i per segment: xs (N, D), weights (N, L) with L = 1 (one segment) or
    one column per segment of ``sizes``."""
    sizes = [sum(sizes)] if weights.shape[1] == 1 else sizes
    pieces = [(weights[:, l, None] * part.double()).sum(0)
              for l, part in enumerate(xs.split(sizes, dim=1))]
    return torch.cat(pieces)


@pytest.mark.parametrize("name", ["grawa", "grawa_layer"])
def test_grawa_weights_sum_to_one_and_favour_small_gradients(traces, name):
    world, ranks = traces
    tr = [r[name] for r in ranks]
    sizes = tr[0]["sizes"]
    for step in (1, 3, 5):
        if name == "grawa":
            norms = torch.tensor([[t["grad_norm"][step]] for t in tr], dtype=torch.float64)
        else:
            norms = torch.stack([t["layer_norms"][step] for t in tr])  # (N, tensors)
        weights = torch.stack([t["weights"][step] for t in tr]).double()  # (N, L), per rank
        assert weights.shape == norms.shape
        torch.testing.assert_close(weights.sum(0), torch.ones(norms.shape[1], dtype=weights.dtype))
        assert torch.equal(weights.argmax(0), norms.argmin(0))
        torch.testing.assert_close(weights, _inverse_norm_weights(norms), atol=1e-6, rtol=1e-5)
        for r, t in enumerate(tr):
            assert t["metrics"][step]["weight"] == pytest.approx(float(weights[r].mean()))
        xs = torch.stack([t["before"][step] for t in tr])
        centre = _weighted_centre(xs, weights, sizes).float()
        for t in tr:
            x = t["before"][step]
            _close(t["after"][step], x + 0.5 * (centre - x))
        if name == "grawa_layer":  # not vacuous: the tensors' weights differ from each other
            assert (weights - weights[:, :1]).abs().max() > 1e-3
    # no pull between the due steps
    for t in tr:
        assert torch.equal(t["after"][2], t["before"][2])


GRAWA_SHAPES = [(3, 4), (5,), (2,)]


def _grawa_zero_gradient(rank, world):
    """One pull (period 1, pull 0.5) from crafted parameters and gradients: rank 2's
    gradient is zero (its first tensor's .grad is None), rank 1's second tensor is zero,
    the third tensor is zero on every rank; and a run where every gradient is zero."""
    gen = torch.Generator().manual_seed(100 + rank)
    values = [torch.randn(s, generator=gen) for s in GRAWA_SHAPES]
    grads = [torch.randn(s, generator=gen) * (rank + 1.0) for s in GRAWA_SHAPES]
    grads[2].zero_()
    if rank == 1:
        grads[1].zero_()
    if rank == 2:
        grads = [None] + [g.zero_() for g in grads[1:]]
    out = {}
    for name, per_layer, zero_all in (("whole", False, False), ("layer", True, False),
                                      ("all_zero", False, True)):
        params = [torch.nn.Parameter(v.clone()) for v in values]
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else (torch.zeros_like(g) if zero_all else g.clone())
        agg = accord.build("grawa", params, period=1, pull=0.5, per_layer=per_layer,
                           broadcast=False)
        agg.after_backward(accord.StepContext(step=0))
        agg.after_step(accord.StepContext(step=0))
        out[name] = {"before": torch.cat([v.reshape(-1) for v in values]),
                     "grad": torch.cat([torch.zeros(p.numel()) if p.grad is None
                                        else p.grad.reshape(-1) for p in params]),
                     "after": _flat(torch.nn.ParameterList(params)),
                     "weights": agg.weights.clone(), "metrics": agg.metrics()}
    return out


@pytest.fixture(scope="module")
def grawa_zero():
    return run_world(_grawa_zero_gradient, 3)


@pytest.mark.parametrize("name", ["whole", "layer", "all_zero"])
def test_grawa_zero_gradient_gets_weight_zero(grawa_zero, name):
    runs = [r[name] for r in grawa_zero]
    sizes = [torch.Size(s).numel() for s in GRAWA_SHAPES]
    grads = torch.stack([r["grad"] for r in runs]).double()
    if name == "layer":
        norms = torch.stack([part.norm(dim=1) for part in grads.split(sizes, dim=1)], dim=1)
    else:
        norms = grads.norm(dim=1, keepdim=True)
    expected = _inverse_norm_weights(norms)
    weights = torch.stack([r["weights"] for r in runs]).double()
    torch.testing.assert_close(weights, expected, atol=1e-12, rtol=1e-12)
    if name == "whole":
        assert weights[2, 0] == 0 and weights[0, 0] > weights[1, 0] > 0
        assert runs[2]["metrics"]["weight"] == 0.0
    elif name == "layer":
        # tensor 0: rank 2 (None) gets 0; tensor 1: only rank 0 has a gradient;
        # tensor 2: no rank has one, so uniform
        assert weights[2, 0] == 0 and weights[0, 0] > weights[1, 0] > 0
        assert weights[:, 1].tolist() == [1.0, 0.0, 0.0]
        torch.testing.assert_close(weights[:, 2], torch.full((3,), 1 / 3, dtype=torch.float64))
    else:
        torch.testing.assert_close(weights, torch.full((3, 1), 1 / 3, dtype=torch.float64))
    xs = torch.stack([r["before"] for r in runs])
    centre = _weighted_centre(xs, expected, sizes).float()
    for r in runs:
        _close(r["after"], r["before"] + 0.5 * (centre - r["before"]))


def test_consensus_probe(traces):
    world, ranks = traces
    xs = torch.stack([r["probe"]["x"] for r in ranks])
    mean = xs.mean(0)
    expected = float(((xs - mean) ** 2).sum(1).mean())
    assert expected > 0
    for r in ranks:
        assert r["probe"]["distance"] == pytest.approx(expected, rel=1e-5)
        assert r["probe"]["algo_bytes"] == 0  # the probe's traffic is not the algorithm's
    _close(ranks[0]["probe"]["consensus"], mean)


def test_batchnorm_statistics_are_averaged(traces):
    world, ranks = traces
    mean = torch.stack([r["bn"]["before"] for r in ranks]).mean(0)
    assert not torch.equal(ranks[0]["bn"]["before"], ranks[1]["bn"]["before"])
    for r in ranks:
        _close(r["bn"]["after"], mean)


def test_model_phase_bytes(traces):
    world, ranks = traces
    numel = ranks[0]["allreduce"]["after"][0].numel()
    assert ranks[0]["local3"]["comm"]["allreduce"]["bytes"] == 2 * numel * 4  # 2 syncs
    assert ranks[0]["easgd"]["comm"]["allreduce"]["calls"] == 3
    lsgd = ranks[0]["lsgd"]["comm"]
    assert lsgd["allgather"]["calls"] == 3
    # broadcast bytes count on the sender (the leader) only
    sent = sum(r["lsgd"]["comm"]["broadcast"]["bytes"] for r in ranks)
    assert sent == 3 * numel * 4
