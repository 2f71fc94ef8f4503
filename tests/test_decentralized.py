"""gossip (pull and push-sum), elastic_gossip and dpsgd on real gloo worlds of 2, 3 and 4.

Every rank records its model before and after each mix; the parent checks identities
between the algorithms, mean/sum preservation and in-process oracles of the mixing rules.
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


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _trace(rank, world, configs, seeds_differ=False, lr=LR, steps=STEPS):
    task = get_task("digits")(SEED)
    out = {}
    for name, (algo, hp) in configs.items():
        if seeds_differ:
            torch.manual_seed(100 + rank)
            model = task.build_model()
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
        else:
            model = task.build_model()
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        agg = accord.build(algo, model.parameters(), **hp)
        stream = task.train_stream(rank, BATCH)
        tr = {"pre": [], "mixed": [], "post_opt": [], "after": [], "grad": [], "metrics": [],
              "x": [], "w": []}
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
            if algo == "gossip" and hp.get("variant") == "push_sum":
                tr["x"].append(agg.x[:-1].clone())
                tr["w"].append(float(agg.x[-1]))
        tr["comm"] = agg.comm.stats.as_dict()
        tr["numel"] = agg.flat.numel
        agg.close()
        out[name] = tr
    return out


TWO = {"pull": ("gossip", {}), "dpsgd": ("dpsgd", {}),
       "elastic": ("elastic_gossip", {"alpha": 0.5}),
       "wagma": ("wagma", {"group_size": 2, "wait_avoiding": False, "self_weight": "mean",
                           "period": 100})}


def test_two_workers_pull_gossip_dpsgd_elastic_and_wagma_are_model_averaging():
    traces = run_world(_trace, 2, TWO)
    for step in range(STEPS):
        mean = (traces[0]["pull"]["pre"][step] + traces[1]["pull"]["pre"][step]) / 2
        for r in range(2):
            t = traces[r]["pull"]
            torch.testing.assert_close(t["mixed"][step], mean, rtol=0, atol=1e-6)
            torch.testing.assert_close(t["after"][step], mean - LR * t["grad"][step],
                                       rtol=0, atol=1e-6)
            for other in ("dpsgd", "elastic", "wagma"):
                torch.testing.assert_close(traces[r][other]["after"][step], t["after"][step],
                                           rtol=0, atol=1e-6)
    # pull on 2: each rank sends its model once and receives once per step
    numel = traces[0]["pull"]["numel"]
    assert traces[0]["pull"]["comm"]["gossip"]["bytes"] == STEPS * numel * 4


def _ring_oracle(pre, world):
    out = []
    for i in range(world):
        if world == 2:
            out.append((pre[0] + pre[1]) / 2)
        else:
            out.append((pre[(i - 1) % world] + pre[i] + pre[(i + 1) % world]) / 3)
    return out


@pytest.mark.parametrize("world", [3, 4])
def test_dpsgd_ring_mixing_matches_the_oracle(world):
    traces = run_world(_trace, world, {"dpsgd": ("dpsgd", {})})
    for step in range(STEPS):
        pre = [t["dpsgd"]["pre"][step] for t in traces]
        for i, expect in enumerate(_ring_oracle(pre, world)):
            torch.testing.assert_close(traces[i]["dpsgd"]["mixed"][step], expect,
                                       rtol=0, atol=1e-6)
        if world == 3:  # the ring of 3 is everyone: identical mixed models
            mean = torch.stack(pre).mean(0)
            for t in traces:
                torch.testing.assert_close(t["dpsgd"]["mixed"][step], mean, rtol=0, atol=1e-6)


FOUR = {
    "elastic": ("elastic_gossip", {"alpha": 0.3, "seed": 3}),
    "pull_p": ("gossip", {"p": 0.5, "seed": 1}),
    "push1": ("gossip", {"variant": "push_sum"}),
    "push2": ("gossip", {"variant": "push_sum", "peers": 2}),
}


@pytest.fixture(scope="module")
def four():
    return run_world(_trace, 4, FOUR)


def test_elastic_gossip_preserves_the_sum_and_follows_the_pull_rule(four):
    for step in range(STEPS):
        pre = [t["elastic"]["pre"][step] for t in four]
        mixed = [t["elastic"]["mixed"][step] for t in four]
        torch.testing.assert_close(sum(mixed), sum(pre), rtol=0, atol=1e-5)
        pulls = random_pulls(4, 1.0, 3, step)
        for i in range(4):
            peers = elastic_peers(pulls, i)
            assert four[i]["elastic"]["metrics"][step]["peers"] == len(peers)
            expect = pre[i] - 0.3 * sum(pre[i] - pre[j] for j in peers)
            torch.testing.assert_close(mixed[i], expect, rtol=0, atol=1e-6)
            for j in peers:  # a pair that only met each other keeps its mean
                if elastic_peers(pulls, j) == [i] and peers == [j]:
                    torch.testing.assert_close(mixed[i] + mixed[j], pre[i] + pre[j],
                                               rtol=0, atol=1e-6)


def test_pull_gossip_with_probability_leaves_idle_ranks_alone_and_counts_bytes(four):
    idle_seen = 0
    for step in range(STEPS):
        pulls = random_pulls(4, 0.5, 1, step)
        pre = [t["pull_p"]["pre"][step] for t in four]
        for i in range(4):
            mixed = four[i]["pull_p"]["mixed"][step]
            if pulls[i] is None:
                idle_seen += 1
                assert torch.equal(mixed, pre[i])
            else:
                torch.testing.assert_close(mixed, (pre[i] + pre[pulls[i]]) / 2, rtol=0,
                                           atol=1e-6)
    assert idle_seen > 0
    numel = four[0]["pull_p"]["numel"]
    for i in range(4):
        sends = sum(1 for s in range(STEPS) for peer in random_pulls(4, 0.5, 1, s)
                    if peer == i)
        assert four[i]["pull_p"]["comm"].get("gossip", {"bytes": 0})["bytes"] == \
            sends * numel * 4


def test_push_sum_preserves_the_numerator_sum_and_weights(four):
    for name, k in (("push1", 1), ("push2", 2)):
        for step in range(STEPS):
            # sum of numerators after mixing == sum of (pre-mix numerator + optimizer step)
            post = sum(t[name]["post_opt"][step] for t in four)  # w == 1: x == z before mix
            after = sum(t[name]["x"][step] for t in four)
            torch.testing.assert_close(after, post, rtol=0, atol=1e-5)
            assert sum(t[name]["w"][step] for t in four) == pytest.approx(4.0, abs=1e-6)
            for t in four:
                torch.testing.assert_close(t[name]["after"][step],
                                           t[name]["x"][step] / t[name]["w"][step])
            assert len(exponential_peers(4, step, k)) == k
            assert all(t[name]["metrics"][step]["sent"] == k for t in four)


def test_push_sum_mixing_alone_reaches_the_initial_mean():
    steps = 12
    traces = run_world(_trace, 3, {"push": ("gossip", {"variant": "push_sum", "peers": 2})},
                       True, 0.0, steps)
    start = torch.stack([t["push"]["pre"][0] for t in traces]).mean(0)
    spread0 = max(float((t["push"]["pre"][0] - start).abs().max()) for t in traces)
    for step in range(steps):
        mean = torch.stack([t["push"]["after"][step] for t in traces]).mean(0)
        torch.testing.assert_close(mean, start, rtol=0, atol=1e-5)
    spread = max(float((t["push"]["after"][-1] - start).abs().max()) for t in traces)
    assert spread0 > 1.0 and spread < 1e-4  # a 3-ring with two peers is the full mean


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
    assert exponential_peers(8, 0, 1) == [1] and exponential_peers(8, 2, 1) == [4]
    assert exponential_peers(8, 2, 2) == [4, 1] and exponential_peers(2, 5, 1) == [1]


@pytest.mark.parametrize("name,hp,world,needle", [
    ("gossip", {"variant": "broadcast"}, 4, "variant"),
    ("gossip", {"variant": "push_sum", "peers": 2}, 2, "peers=2 needs at least 3"),
    ("gossip", {"p": 1.5}, 4, "'p'"),
    ("elastic_gossip", {"alpha": 0.0}, 4, "'alpha'"),
    ("dpsgd", {"period": 0}, 4, "'period'"),
])
def test_bad_hyperparameters_are_one_line_errors(name, hp, world, needle):
    with pytest.raises(ValueError) as err:
        validate(name, hp, world)
    assert needle in str(err.value) and "\n" not in str(err.value)
