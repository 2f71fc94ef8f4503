"""ACGA with sketched coefficients (``coefficients=sketch``).

The sketch's Gram estimate is unbiased and its error shrinks as k grows; in a gloo world
the sketched coefficients converge to the exact ones, are bit-identical on every rank, and
the written gradient is exactly the combination of the true gradients with them.
"""

from __future__ import annotations

import pytest
import torch
from worlds import run_world

import accord
from accord.algorithms.acga import GramSketch, consensus_coefficients, sketch_coefficients


def _gradients(n: int = 4, dim: int = 3000, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(dim, generator=gen)
    # correlated workers with structure along the layout (blocks of different scale)
    scale = torch.linspace(0.1, 3.0, dim)
    return torch.stack([(0.5 * common + torch.randn(dim, generator=gen)) * scale
                        for _ in range(n)])


def _gram_error(g: torch.Tensor, k: int, counts: range) -> tuple[float, torch.Tensor]:
    sk = GramSketch([g.shape[1]], k, seed=3, device="cpu")
    exact = g @ g.T
    errors, mean = [], torch.zeros_like(exact)
    for c in counts:
        est = sk.gram(torch.stack([sk.apply([row], c) for row in g]), g.norm(dim=1)[None])[0]
        errors.append(float((est - exact).abs().max() / exact.abs().max()))
        mean += est / len(counts)
    return sum(errors) / len(errors), mean


def test_segments_no_longer_than_k_are_sent_exactly():
    g = _gradients(dim=500)
    sk = GramSketch([200, 300], k=300, seed=0, device="cpu")
    assert sk.rows == [0, 0] and sk.width == 500
    y = torch.stack([sk.apply(list(row.split([200, 300])), 5) for row in g])
    torch.testing.assert_close(y, g)
    gram = sk.gram(y, torch.stack([g[:, :200].norm(dim=1), g[:, 200:].norm(dim=1)]))
    torch.testing.assert_close(gram[0] + gram[1], g @ g.T, rtol=1e-5, atol=1e-3)


def test_gram_error_shrinks_with_k_and_the_estimate_is_unbiased():
    g = _gradients()
    errors = [_gram_error(g, k, range(20))[0] for k in (16, 64, 256, 1024)]
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < 0.5 * errors[0] and errors[-1] < 0.1, errors
    # unbiased over the fresh row signs: the mean of 400 steps' estimates is 10x closer
    # than one estimate (the error of a mean of independent estimates falls as 1/sqrt(400))
    single, mean = _gram_error(g, 64, range(400))
    exact = g @ g.T
    assert float((mean - exact).abs().max() / exact.abs().max()) < 0.2 * single


def test_diagonal_is_exact_and_coefficients_match_exact_formula_for_exact_gram():
    g = _gradients(n=3, dim=100)
    norms = g.norm(dim=1)
    a = sketch_coefficients((g @ g.T)[None], norms[None])[0]
    torch.testing.assert_close(a, consensus_coefficients(g @ g.sum(0), norms, 3))


def test_bad_sketch_size_is_one_line():
    with pytest.raises(ValueError, match="sketch_size.*allowed: an integer >= 1"):
        accord.algorithms.resolve_hyperparameters(
            "acga", accord.algorithms.get("acga").hyperparameters, {"sketch_size": 0})


# -- in a gloo world ---------------------------------------------------------------------

SIZES = (16, 64, 256, 1024)  # the model below has 1190 parameters; 2048 is exact


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 40), torch.nn.Tanh(),
                               torch.nn.Linear(40, 8), torch.nn.Tanh(), torch.nn.Linear(8, 30))


def _world(rank: int, world: int) -> dict:
    model = _model()
    params = list(model.parameters())
    variants = {"exact": {}, **{k: {"coefficients": "sketch", "sketch_size": k}
                                for k in (*SIZES, 2048)}}
    aggs = {name: accord.build("acga", params, broadcast=False, momentum=0.0, **hp)
            for name, hp in variants.items()}
    out: dict = {name: [] for name in variants}
    out["local"] = []
    for step in range(4):
        gen = torch.Generator().manual_seed(100 * step + rank)
        x = torch.randn(16, 20, generator=gen) + 0.3 * rank
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        local = [p.grad.clone() for p in params]
        out["local"].append(torch.cat([v.reshape(-1) for v in local]))
        for name, agg in aggs.items():
            for p, v in zip(params, local, strict=True):
                p.grad = v.clone()
            agg.after_backward(accord.StepContext(step=step))
            out[name].append((agg._coefficients.clone(),
                              torch.cat([p.grad.reshape(-1) for p in params])))
    out["stats"] = {name: agg.comm.stats.as_dict() for name, agg in aggs.items()}
    out["paths"] = {name: (agg.sketch is not None, agg.total is not None)
                    for name, agg in aggs.items()}
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"world{n}")
def results(request):
    return request.param, run_world(_world, request.param)


def test_sketched_coefficients_converge_to_exact(results):
    world, per_rank = results
    out = per_rank[0]
    errors = []
    for k in SIZES:
        err = max(float((out[k][s][0] - out["exact"][s][0]).norm()
                        / out["exact"][s][0].norm()) for s in range(4))
        errors.append(err)
    assert errors[-1] < errors[0] / 3, errors
    assert errors[-1] < 0.02, errors  # k = 1024 of 1190: two rows, nearly exact
    # a gradient no longer than sketch_size uses the exact path: same bits as exact
    assert out["paths"][2048] == (False, True) and out["paths"][64] == (True, False)
    for s in range(4):
        assert torch.equal(out[2048][s][1], out["exact"][s][1])


def test_sketched_coefficients_bit_identical_across_ranks(results):
    world, per_rank = results
    for k in SIZES:
        for s in range(4):
            for r in range(1, world):
                assert torch.equal(per_rank[r][k][s][0], per_rank[0][k][s][0]), (k, s, r)
                assert torch.equal(per_rank[r][k][s][1], per_rank[0][k][s][1]), (k, s, r)


def test_written_gradient_is_the_exact_combination_with_sketched_coefficients(results):
    world, per_rank = results
    for s in range(4):
        g = torch.stack([per_rank[r]["local"][s] for r in range(world)])  # (N, D)
        for k in SIZES:
            c = per_rank[0][k][s][0][0]  # (N,)
            d = (c / (g.norm(dim=1) + 1e-8)) @ g
            d = d / d.norm().clamp(min=1.0)
            torch.testing.assert_close(per_rank[0][k][s][1], d, rtol=1e-5, atol=1e-7)


def test_sketch_sends_one_allreduce_and_k_plus_one_numbers(results):
    world, per_rank = results
    stats = per_rank[0]["stats"]
    dim = sum(p.numel() for p in _model().parameters())
    for k in SIZES:
        assert stats[k]["allreduce"] == pytest.approx(
            {"calls": 4, "bytes": 4 * 4 * dim, "seconds": stats[k]["allreduce"]["seconds"]})
        assert stats[k]["allgather"]["calls"] == 4
        assert stats[k]["allgather"]["bytes"] == 4 * 4 * (k + 1)
    assert stats["exact"]["allreduce"]["bytes"] == 2 * 4 * 4 * dim
