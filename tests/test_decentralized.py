"""gossip (pull and push-sum), elastic_gossip and dpsgd on real gloo worlds of 2, 3 and 4.

Three worlds in all (one per size, shared by the tests through module fixtures). Every rank
starts from its own perturbation of the task's model, so the mixes move real differences,
and records its model before and after each mix; the parent checks identities between the
algorithms, sum preservation and in-process oracles of the mixing rules.
"""

from __future__ import annotations

import pytest
import torch
from worlds import run_world

import accord
from accord.algorithms import validate
from accord.algorithms.elastic_gossip import elastic_peers
from accord.algorithms.gossip import exponential_peers, random_pulls
from accord.tasks import get_task

SEED = 7
BATCH = 8
LR = 0.1
STEPS = 4
TOL = {"rtol": 1e-6, "atol": 1e-6}


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _trace(rank, world, configs):
    """configs: name -> (algorithm, hyperparameters, options); options: ``lr``, ``steps``,
    ``spread`` (std of the per-rank perturbation of the initial model)."""
    task = get_task("digits")(SEED)
    out = {}
    for name, (algo, hp, opts) in configs.items():
        lr, steps = opts.get("lr", LR), opts.get("steps", STEPS)
        model = task.build_model()
        gen = torch.Generator().manual_seed(100 + rank)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(opts.get("spread", 0.1) * torch.randn(p.shape, generator=gen))
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        agg = accord.build(algo, model.parameters(), broadcast=False, **hp)
        stream = task.train_stream(rank, BATCH)
        push = algo == "gossip" and hp.get("variant") == "push_sum"
        tr = {k: [] for k in ("pre", "grad", "mixed", "post_opt", "after", "metrics", "x",
                              "w")}
        if push:
            tr["x0"] = agg.x[:-1].clone()
        for step in range(steps):
            opt.zero_grad()
            task.loss(model, next(stream)).backward()
            tr["grad"].append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
            tr["pre"].append(_flat(model))
            agg.after_backward(accord.StepContext(step))
            tr["mixed"].append(_flat(model))
            opt.step()
            tr["post_opt"].append(_flat(model))
            agg.after_step(accord.StepContext(step))
            tr["after"].append(_flat(model))
            tr["metrics"].append(agg.metrics())
            if push:
                tr["x"].append(agg.x[:-1].clone())
                tr["w"].append(float(agg.x[-1]))
        tr["comm"] = agg.comm.stats.as_dict()
        tr["numel"] = agg.flat.numel
        agg.close()
        out[name] = tr
    return out


MIX_ONLY = {"lr": 0.0, "spread": 1.0}
WORLDS = {
    2: {"pull": ("gossip", {}, {}), "dpsgd": ("dpsgd", {}, {}),
        "elastic": ("elastic_gossip", {"alpha": 0.5}, {}),
        "wagma": ("wagma", {"group_size": 2, "wait_avoiding": False, "self_weight": "mean",
                            "period": 100}, {})},
    3: {"dpsgd": ("dpsgd", {}, {}),
        "push1": ("gossip", {"variant": "push_sum"}, {}),
        "push1_mix": ("gossip", {"variant": "push_sum"}, {**MIX_ONLY, "steps": 20}),
        "push2_mix": ("gossip", {"variant": "push_sum", "peers": 2}, {**MIX_ONLY, "steps": 2})},
    4: {"dpsgd": ("dpsgd", {}, {}),
        "elastic": ("elastic_gossip", {"alpha": 0.3, "seed": 3}, {}),
        "pull_p": ("gossip", {"p": 0.5, "seed": 1}, {}),
        "push1": ("gossip", {"variant": "push_sum"}, {}),
        "push2": ("gossip", {"variant": "push_sum", "peers": 2}, {}),
        "push1_mix": ("gossip", {"variant": "push_sum"}, {**MIX_ONLY, "steps": 2})},
}


@pytest.fixture(scope="module")
def two():
    return run_world(_trace, 2, WORLDS[2])


@pytest.fixture(scope="module")
def three():
    return run_world(_trace, 3, WORLDS[3])


@pytest.fixture(scope="module")
def four():
    return run_world(_trace, 4, WORLDS[4])


def _steps(traces, name):
    return range(len(traces[0][name]["pre"]))


def test_two_workers_pull_gossip_dpsgd_elastic_and_wagma_are_model_averaging(two):
    for step in range(STEPS):
        mean = (two[0]["pull"]["pre"][step] + two[1]["pull"]["pre"][step]) / 2
        for r in range(2):
            t = two[r]["pull"]
            assert not torch.equal(two[0]["pull"]["pre"][step], two[1]["pull"]["pre"][step])
            torch.testing.assert_close(t["mixed"][step], mean, **TOL)
            # D-PSGD order: the gradient was computed at the unmixed model, applied after
            torch.testing.assert_close(t["after"][step], mean - LR * t["grad"][step], **TOL)
            for other in ("dpsgd", "elastic", "wagma"):
                torch.testing.assert_close(two[r][other]["after"][step], t["after"][step],
                                           **TOL)
            assert t["metrics"][step]["sent"] == 1 and t["metrics"][step]["received"] == 1
    # pull on 2: each rank sends its model once per step, in one batched call per step
    numel = two[0]["pull"]["numel"]
    assert two[0]["pull"]["comm"]["gossip"] == {**two[0]["pull"]["comm"]["gossip"],
                                                "calls": STEPS, "bytes": STEPS * numel * 4}


def _ring_oracle(pre):
    world = len(pre)
    return [(pre[(i - 1) % world] + pre[i] + pre[(i + 1) % world]) / 3 for i in range(world)]


def test_dpsgd_ring_of_three_is_the_full_mean_and_ring_of_four_has_weights_one_third(
        three, four):
    for traces in (three, four):
        for step in range(STEPS):
            pre = [t["dpsgd"]["pre"][step] for t in traces]
            for i, expect in enumerate(_ring_oracle(pre)):
                t = traces[i]["dpsgd"]
                torch.testing.assert_close(t["mixed"][step], expect, **TOL)
                torch.testing.assert_close(t["after"][step],
                                           expect - LR * t["grad"][step], **TOL)
                assert t["metrics"][step] == {"exchanges": 2.0, "peers": 2.0}
            if len(traces) == 3:  # the ring of 3 is everyone: every rank has the mean
                for t in traces:
                    torch.testing.assert_close(t["dpsgd"]["mixed"][step],
                                               torch.stack(pre).mean(0), **TOL)
            else:  # on 4 the opposite rank is not mixed in: replicas still differ
                assert not torch.allclose(traces[0]["dpsgd"]["mixed"][step],
                                          traces[1]["dpsgd"]["mixed"][step])
    numel = four[0]["dpsgd"]["numel"]
    assert four[0]["dpsgd"]["comm"]["ring"]["bytes"] == STEPS * 2 * numel * 4


def test_elastic_gossip_preserves_the_sum_and_follows_the_pull_rule(four):
    pair_seen = 0
    for step in range(STEPS):
        pre = [t["elastic"]["pre"][step] for t in four]
        mixed = [t["elastic"]["mixed"][step] for t in four]
        torch.testing.assert_close(sum(mixed), sum(pre), rtol=0, atol=1e-5)
        pulls = random_pulls(4, 1.0, 3, step)
        for i in range(4):
            peers = elastic_peers(pulls, i)
            # every rank derived the same picks: its peer count is the parent's
            assert four[i]["elastic"]["metrics"][step]["peers"] == len(peers)
            expect = pre[i] - 0.3 * sum(pre[i] - pre[j] for j in peers)
            torch.testing.assert_close(mixed[i], expect, **TOL)
            for j in peers:  # a pair that only met each other keeps its mean
                if elastic_peers(pulls, j) == [i] and peers == [j]:
                    pair_seen += 1
                    torch.testing.assert_close(mixed[i] + mixed[j], pre[i] + pre[j], **TOL)
    assert pair_seen > 0  # seed 3 has isolated mutual pairs in these steps


def test_pull_gossip_with_probability_leaves_idle_ranks_alone_and_counts_bytes(four):
    idle_seen = pulled_seen = 0
    for step in range(STEPS):
        pulls = random_pulls(4, 0.5, 1, step)
        pre = [t["pull_p"]["pre"][step] for t in four]
        for i in range(4):
            mixed = four[i]["pull_p"]["mixed"][step]
            if pulls[i] is None:  # did not initiate: unchanged, even if it was pulled
                idle_seen += 1
                pulled_seen += i in pulls
                assert torch.equal(mixed, pre[i])
            else:
                torch.testing.assert_close(mixed, (pre[i] + pre[pulls[i]]) / 2, **TOL)
    assert idle_seen > 0 and pulled_seen > 0
    numel = four[0]["pull_p"]["numel"]
    for i in range(4):
        sends = sum(1 for s in range(STEPS) for peer in random_pulls(4, 0.5, 1, s)
                    if peer == i)
        assert four[i]["pull_p"]["comm"]["gossip"]["bytes"] == sends * numel * 4
        assert four[i]["pull_p"]["comm"]["gossip"]["calls"] == STEPS


@pytest.mark.parametrize("world,name,k", [(4, "push1", 1), (4, "push2", 2), (3, "push1", 1),
                                          (3, "push2_mix", 2), (4, "push1_mix", 1)])
def test_push_sum_mixes_by_the_graph_and_preserves_numerators_and_weights(
        world, name, k, three, four):
    traces = three if world == 3 else four
    xs = [t[name]["x0"] for t in traces]
    ws = [1.0] * world
    for step in _steps(traces, name):
        # numerator before mixing: the previous one plus this step's optimizer step on z
        zs = [x / w for x, w in zip(xs, ws, strict=True)]
        pre = [x + t[name]["post_opt"][step] - z
               for x, z, t in zip(xs, zs, traces, strict=True)]
        offsets = exponential_peers(world, step, k)
        assert len(offsets) == k
        for i, t in enumerate(traces):  # x_i <- (x_i + sum of in-peers' x) / (k + 1)
            expect = (pre[i] + sum(pre[(i - o) % world] for o in offsets)) / (k + 1)
            torch.testing.assert_close(t[name]["x"][step], expect, **TOL)
            torch.testing.assert_close(t[name]["after"][step],
                                       t[name]["x"][step] / t[name]["w"][step])
            assert t[name]["metrics"][step]["sent"] == k
        xs = [t[name]["x"][step] for t in traces]
        ws = [t[name]["w"][step] for t in traces]
        torch.testing.assert_close(sum(xs), sum(pre), rtol=0, atol=1e-5)
        assert sum(ws) == pytest.approx(world, abs=1e-6)


def _spread(models, centre):
    return max(float((m - centre).abs().max()) for m in models)


def test_push_sum_mixing_alone_reaches_the_initial_mean(three, four):
    for traces, name in ((three, "push1_mix"), (three, "push2_mix"), (four, "push1_mix")):
        start = torch.stack([t[name]["pre"][0] for t in traces]).mean(0)
        assert _spread([t[name]["pre"][0] for t in traces], start) > 1.0
        spreads = []
        for step in _steps(traces, name):
            after = [t[name]["after"][step] for t in traces]
            torch.testing.assert_close(torch.stack(after).mean(0), start, rtol=0, atol=1e-5)
            spreads.append(_spread(after, start))
        if name == "push1_mix" and len(traces) == 3:
            # two mixes contract the disagreement by 1/4 on the 3-cycle: geometric decay
            assert all(b < a for a, b in zip(spreads, spreads[1:], strict=False))
            assert spreads[-1] < 1e-4
        else:  # 2 peers on 3, and 1 peer for log2 4 = 2 mixes on 4: the exact mean
            assert spreads[-1] < 1e-5


def test_peer_choices_are_shared_and_uniform():
    a = [random_pulls(6, 1.0, 0, s) for s in range(300)]
    assert a == [random_pulls(6, 1.0, 0, s) for s in range(300)]
    counts = torch.zeros(6, 6)
    for pulls in a:
        for i, j in enumerate(pulls):
            assert j is not None and j != i
            counts[i, j] += 1
    off = counts[~torch.eye(6, dtype=torch.bool)]
    assert off.min() > 35 and off.max() < 85  # 60 expected each
    assert random_pulls(1, 1.0, 0, 0) == [None]
    assert random_pulls(4, 0.0, 0, 0) == [None] * 4
    assert exponential_peers(8, 0, 1) == [1] and exponential_peers(8, 2, 1) == [4]
    assert exponential_peers(8, 2, 2) == [4, 1] and exponential_peers(2, 5, 1) == [1]
    assert exponential_peers(5, 1, 2) == [2, 4] and exponential_peers(3, 1, 2) == [2, 1]


@pytest.mark.parametrize("name,hp,world,needle", [
    ("gossip", {"variant": "broadcast"}, 4, "'variant'"),
    ("gossip", {"variant": "push_sum", "peers": 2}, 2, "peers=2 needs at least 3"),
    ("gossip", {"p": 1.5}, 4, "'p'"),
    ("gossip", {"p": -0.1}, 4, "'p'"),
    ("elastic_gossip", {"alpha": 0.0}, 4, "'alpha'"),
    ("elastic_gossip", {"p": 2}, 4, "'p'"),
    ("dpsgd", {"period": 0}, 4, "'period'"),
])
def test_bad_hyperparameters_are_one_line_errors(name, hp, world, needle):
    with pytest.raises(ValueError) as err:
        validate(name, hp, world)
    assert needle in str(err.value) and "\n" not in str(err.value)
