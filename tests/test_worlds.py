"""Real spawned gloo worlds of 2 and 4 processes running the gradient-phase algorithms.

Each rank returns its local gradients, the aggregated gradients and its parameters after
every step; the parent checks them against single-process oracles.
"""

from __future__ import annotations

import pytest
import torch
from worlds import run_world

import accord
from accord.algorithms.acga import acga_combine
from accord.tasks import get_task

STEPS = 4
BATCH = 8
LR = 0.1
SEED = 3
VARIANTS = {
    "allreduce": {},
    "normalized": {},
    "acga": {},  # the default on this model: coefficients from the all-gathered gradients
    "acga_ref": {"reference_order": True, "momentum": 0.9, "coefficients": "exact"},
    "acga_layer": {"per_layer": True},
}


def _flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _flat_grads(model):
    return torch.cat([p.grad.detach().reshape(-1) for p in model.parameters()]).clone()


def _train_trace(rank, world):
    task = get_task("digits")(SEED)
    out = {}
    for variant, hp in VARIANTS.items():
        algo = variant.split("_")[0]
        model = task.build_model()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        agg = accord.build(algo, model.parameters(), broadcast=False, **hp)
        stream = task.train_stream(rank, BATCH)
        trace = {"local": [], "agg": [], "params": [], "momentum": []}
        for step in range(STEPS):
            opt.zero_grad(set_to_none=True)
            loss = task.loss(model, next(stream))
            loss.backward()
            trace["local"].append(_flat_grads(model))
            ctx = accord.StepContext(step=step, loss=loss.detach())
            agg.after_backward(ctx)
            trace["agg"].append(_flat_grads(model))
            opt.step()
            agg.after_step(ctx)
            trace["params"].append(_flat_params(model))
            if algo == "acga":
                trace["momentum"].append(agg.momentum.clone())
        trace["comm"] = agg.comm.stats.as_dict()
        agg.close()
        out[variant] = trace
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"world{n}")
def traces(request):
    return request.param, run_world(_train_trace, request.param)


def test_replicas_identical_after_every_step(traces):
    world, per_rank = traces
    for variant in VARIANTS:
        for step in range(STEPS):
            ref = per_rank[0][variant]["params"][step]
            for r in range(1, world):
                assert torch.equal(per_rank[r][variant]["params"][step], ref), (variant, step, r)


def test_allreduce_equals_single_process_sgd_on_union_of_batches(traces):
    world, per_rank = traces
    task = get_task("digits")(SEED)
    model = task.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    streams = [task.train_stream(r, BATCH) for r in range(world)]
    for step in range(STEPS):
        batches = [next(s) for s in streams]
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        opt.zero_grad()
        task.loss(model, (x, y)).backward()
        opt.step()
        got = per_rank[0]["allreduce"]["params"][step]
        torch.testing.assert_close(got, _flat_params(model), atol=1e-6, rtol=1e-5)
    # and the run moved away from the start, so the comparison is not vacuous
    assert not torch.allclose(_flat_params(model), _flat_params(task.build_model()))


def test_normalized_is_mean_of_unit_gradients(traces):
    world, per_rank = traces
    for step in range(STEPS):
        units = [r["normalized"]["local"][step] / r["normalized"]["local"][step].norm()
                 for r in per_rank]
        expected = torch.stack(units).mean(0)
        torch.testing.assert_close(per_rank[0]["normalized"]["agg"][step], expected,
                                   atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", ["acga", "acga_ref"])
def test_acga_matches_in_process_oracle(traces, variant):
    world, per_rank = traces
    hp = {**accord.algorithms.validate("acga", {}), **VARIANTS[variant]}
    m = None
    for step in range(STEPS):
        grads = torch.stack([r[variant]["local"][step] for r in per_rank])
        d, _, m = acga_combine(grads, m, hp["momentum"], reference_order=hp["reference_order"])
        for r in range(world):
            torch.testing.assert_close(per_rank[r][variant]["agg"][step], d,
                                       atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(per_rank[r][variant]["momentum"][step][0], m)


def test_acga_per_layer_matches_oracle_per_tensor(traces):
    world, per_rank = traces
    model = get_task("digits")(SEED).build_model()
    sizes = [p.numel() for p in model.parameters()]
    beta = accord.algorithms.validate("acga", {})["momentum"]
    moms = [None] * len(sizes)
    for step in range(STEPS):
        grads = torch.stack([r["acga_layer"]["local"][step] for r in per_rank])
        expected = []
        for l, seg in enumerate(grads.split(sizes, dim=1)):
            d, _, moms[l] = acga_combine(seg, moms[l], beta)
            expected.append(d)
        torch.testing.assert_close(per_rank[0]["acga_layer"]["agg"][step], torch.cat(expected),
                                   atol=1e-6, rtol=1e-4)
        momentum = per_rank[0]["acga_layer"]["momentum"][step]
        assert momentum.shape == (len(sizes), world)


def test_acga_momentum_identical_on_all_ranks(traces):
    world, per_rank = traces
    for variant in ("acga", "acga_ref", "acga_layer"):
        for step in range(STEPS):
            ref = per_rank[0][variant]["momentum"][step]
            for r in range(1, world):
                assert torch.equal(per_rank[r][variant]["momentum"][step], ref)


def test_communication_accounting(traces):
    world, per_rank = traces
    numel = per_rank[0]["allreduce"]["params"][0].numel()
    assert per_rank[0]["allreduce"]["comm"] == {
        "allreduce": {"calls": STEPS, "bytes": STEPS * numel * 4,
                      "seconds": pytest.approx(per_rank[0]["allreduce"]["comm"]["allreduce"]
                                               ["seconds"])}}
    exact = per_rank[0]["acga_ref"]["comm"]
    assert exact["allreduce"]["calls"] == 2 * STEPS
    assert exact["allreduce"]["bytes"] == 2 * STEPS * numel * 4
    assert exact["allgather"]["calls"] == STEPS
    assert exact["allgather"]["bytes"] == STEPS * 2 * 4  # (a_i, ||g_i||) in fp32
    for variant in ("acga", "acga_layer"):  # one all-gather of the gradient per step
        gather = per_rank[0][variant]["comm"]
        assert set(gather) == {"allgather"}
        assert gather["allgather"]["calls"] == STEPS
        assert gather["allgather"]["bytes"] == STEPS * numel * 4


def test_every_communicator_has_the_protocol(world_of_one):
    """The library's communicators are one interface (accord.comm.Collectives): the
    counted Communicator (with point-to-point calls) and the torchft quorum's, whose
    collectives an algorithm calls the same way."""
    from accord.comm import Collectives, Communicator, PointToPoint
    from accord.ft.membership import FTCommunicator

    comm = Communicator()
    assert isinstance(comm, PointToPoint) and isinstance(comm, Collectives)
    methods = [n for n, v in vars(Collectives).items() if callable(v) and not n.startswith("_")]
    assert sorted(methods) == ["all_gather", "all_reduce_", "all_reduce_async_", "broadcast_",
                               "global_rank"]
    for name in methods:  # the same parameters, in the same order, with the same defaults
        import inspect

        want = inspect.signature(getattr(Collectives, name)).parameters
        for cls in (Communicator, FTCommunicator):
            got = inspect.signature(getattr(cls, name)).parameters
            assert [(p.name, p.default) for p in got.values()][:len(want)] == \
                [(p.name, p.default) for p in want.values()], (cls.__name__, name)
    for name in ("rank", "world_size", "native_avg", "emulated"):
        assert hasattr(FTCommunicator, name)  # properties or class attributes
    # point-to-point calls exist only to refuse in one line: no peer schedule survives a
    # change of quorum
    assert FTCommunicator.send is FTCommunicator.exchange_ is FTCommunicator._p2p
