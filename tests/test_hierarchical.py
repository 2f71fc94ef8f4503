"""Two-level sync (``hierarchical``): its degenerate forms are the algorithms it combines,
bit for bit; in between, islands stay identical, only leaders cross the slow links, and
its state resumes bit for bit."""

from __future__ import annotations

import pytest
import torch
from worlds import run_world

import accord
from accord.algorithms import validate

STEPS = 6
LR = 0.1


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(6, 5, generator=gen) + 0.5 * rank, torch.randn(6, 2, generator=gen)


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _train(rank: int, algo: str, hp: dict, momentum: float = 0.0, steps=range(STEPS),
           model=None, agg=None, opt=None):
    model = model if model is not None else _model()
    agg = agg if agg is not None else accord.build(algo, model.parameters(), **hp)
    opt = opt if opt is not None else torch.optim.SGD(model.parameters(), lr=LR,
                                                      momentum=momentum)
    trace = []
    for step in steps:
        x, y = _batch(rank, step)
        opt.zero_grad(set_to_none=False)
        torch.nn.functional.mse_loss(model(x), y).backward()
        ctx = accord.StepContext(step=step)
        agg.after_backward(ctx)
        opt.step()
        agg.after_step(ctx)
        trace.append(_flat(model).clone())
    return model, agg, opt, trace


def _pairs(rank: int, world: int, cases: list) -> dict:
    out = {}
    for label, (algo, hp, momentum) in cases:
        model, agg, opt, trace = _train(rank, algo, hp, momentum)
        out[label] = {"trace": trace, "comm": agg.comm.stats.as_dict()}
        agg.close()
    return out


def test_one_rank_per_island_is_the_outer_algorithm_and_one_island_is_allreduce():
    cases = [
        ("local_sgd", ("local_sgd", {"period": 2}, 0.9)),
        ("islands_of_one", ("hierarchical", {"island_size": 1, "outer": "local_sgd",
                                             "outer_hp": "period=2"}, 0.9)),
        ("allreduce", ("allreduce", {}, 0.9)),
        ("one_island", ("hierarchical", {"island_size": 2, "outer": "diloco"}, 0.9)),
    ]
    for rank in run_world(_pairs, 2, cases):
        for a, b in (("local_sgd", "islands_of_one"), ("allreduce", "one_island")):
            for x, y in zip(rank[a]["trace"], rank[b]["trace"], strict=True):
                assert torch.equal(x, y), (a, b)
        # one island: its average is the only traffic (no flag, no outer call)
        assert set(rank["one_island"]["comm"]) == {"initial_broadcast", "island_allreduce"}


def _islands(rank: int, world: int) -> dict:
    hp = {"island_size": 2, "outer": "local_sgd", "outer_hp": "period=1"}
    _, agg, _, trace = _train(rank, "hierarchical", hp)
    comm = agg.comm.stats.as_dict()
    leader = agg.leader
    agg.close()
    _, ref, _, ref_trace = _train(rank, "allreduce", {})
    ref.close()
    # resume: K steps, state_dict, a fresh model/optimizer/aggregator, the rest
    hp = {"island_size": 2, "outer": "diloco", "outer_hp": "period=2,outer_momentum=0.9"}
    straight = _train(rank, "hierarchical", hp)[3][-1]
    model, agg, opt, _ = _train(rank, "hierarchical", hp, steps=range(3))
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "agg": agg.state_dict()}
    agg.close()
    model = _model()
    model.load_state_dict(state["model"])
    agg = accord.build("hierarchical", model.parameters(), broadcast=False, **hp)
    agg.load_state_dict(state["agg"])
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    opt.load_state_dict(state["opt"])
    resumed = _train(rank, "hierarchical", hp, steps=range(3, STEPS), model=model, agg=agg,
                     opt=opt)[3][-1]
    agg.close()
    return {"trace": trace, "ref": ref_trace, "comm": comm, "leader": leader,
            "straight": straight, "resumed": resumed, "state_keys": sorted(state["agg"])}


@pytest.fixture(scope="module")
def four():
    return run_world(_islands, 4)


def test_islands_stay_identical_and_sgd_matches_global_averaging(four):
    """4 ranks, islands of 2, local SGD with period 1 across leaders and plain SGD: the
    island average then the leaders' model average is the global gradient average up to
    float rounding; inside an island the replicas are equal exactly at every step."""
    for step in range(STEPS):
        assert torch.equal(four[0]["trace"][step], four[1]["trace"][step])
        assert torch.equal(four[2]["trace"][step], four[3]["trace"][step])
        for r in range(4):
            assert torch.allclose(four[r]["trace"][step], four[r]["ref"][step], atol=1e-6)
    assert [r["leader"] for r in four] == [True, False, True, False]


def test_only_leaders_cross_the_slow_links_and_both_levels_are_counted(four):
    numel = four[0]["trace"][0].numel()
    for res in four:
        comm = res["comm"]
        assert comm["island_allreduce"]["calls"] == STEPS
        assert comm["island_allreduce"]["bytes"] == STEPS * numel * 4
        assert comm["island_flag"]["calls"] == STEPS
        if res["leader"]:  # the outer average every step, then the model to the island
            assert comm["allreduce"]["calls"] == STEPS
            assert comm["allreduce"]["bytes"] == STEPS * numel * 4
            assert comm["island_broadcast"]["bytes"] == STEPS * numel * 4
        else:  # never on a slow link; receives the model (0 bytes sent)
            assert "allreduce" not in comm
            assert comm["island_broadcast"]["calls"] == STEPS
            assert comm["island_broadcast"]["bytes"] == 0


def test_a_resumed_run_equals_the_uninterrupted_one(four):
    for res in four:
        assert torch.equal(res["straight"], res["resumed"])
    assert "outer" in four[0]["state_keys"] and "outer" not in four[1]["state_keys"]


@pytest.mark.parametrize("hp, world, says", [
    ({"island_size": 3}, 4, "'island_size': got 3, allowed: a divisor of the world size 4"),
    ({"outer": "lsgd"}, 2, "refused: it pulls toward its leader copy"),
    ({"outer": "allreduce"}, 2, "allowed: a model-phase algorithm"),
    ({"outer": "hierarchical"}, 2, "cannot nest itself"),
    ({"outer": "nope"}, 2, "unknown algorithm 'nope'"),
    ({"outer": "easgd", "outer_hp": "asynchronous=true"}, 2, "with a background engine"),
    ({"outer": "wagma", "island_size": 1}, 4, "with a background engine"),
    ({"outer_hp": "period"}, 2, "item 'period', allowed: KEY=VALUE"),
    ({"outer_hp": "period=0"}, 2, "hyperparameter 'period': got '0'"),
])
def test_bad_settings_are_one_line_before_any_process(hp, world, says):
    with pytest.raises(ValueError) as e:
        validate("hierarchical", hp, world)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_its_capabilities_refuse_what_it_cannot_do():
    cls = accord.REGISTRY["hierarchical"]
    assert cls.rewrites_gradients({}) and cls.phase == "model"  # AdaHessian refused
    assert not cls.compressible and cls.fault_tolerant is None
    assert cls.ddp_hook_form is None
