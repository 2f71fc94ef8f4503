"""AdaSum: the pair rule against an independent float64 NumPy oracle, the reduction tree,
precision at the edges (gradients whose squared norms underflow fp32, Horovod's stability
data, float64 parameters), and one real spawned gloo world of 6 processes.

The world runs the aggregator on the default group (N = 6, not a power of two, two ranks
folded in) and on subgroups of 4, 3, 2 and 1 ranks whose members are not 0..n-1, so the
group-rank to global-rank mapping of the point-to-point calls is exercised too. Each rank
returns its local gradients, the aggregated ones, its parameters and its communication
counters, and the aggregated gradients of crafted precision cases; the parent checks
them against the maths.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from worlds import run_world

import accord
from accord.algorithms import adasum
from accord.algorithms.adasum import (
    adasum_coefficients,
    adasum_pair,
    adasum_tree,
    largest_power_of_two,
)

RTOL = 2e-5
ATOL = 2e-6


# ---------------------------------------------------------------------------------------
# Independent NumPy oracle (float64), written from the paper's pair rule
# ---------------------------------------------------------------------------------------

def np_pair(a, b, sizes=None):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    sizes = [a.size] if sizes is None else sizes
    out = np.empty_like(a)
    start = 0
    for size in sizes:
        x, y = a[start:start + size], b[start:start + size]
        dot, nx, ny = x @ y, x @ x, y @ y
        cx = 1.0 - dot / (2.0 * nx) if nx > 0 else 0.0
        cy = 1.0 - dot / (2.0 * ny) if ny > 0 else 0.0
        out[start:start + size] = cx * x + cy * y
        start += size
    return out


def np_tree(G, sizes=None):
    """The documented nesting in float64: fold ranks >= P into r - P, then recursive
    doubling over the first P ranks with the lower rank first."""
    v = [np.asarray(g, dtype=np.float64) for g in G]
    p = 1
    while 2 * p <= len(v):
        p *= 2
    for r in range(p, len(v)):
        v[r - p] = np_pair(v[r - p], v[r], sizes)
    d = 1
    while d < p:
        v = [np_pair(v[min(r, r ^ d)], v[max(r, r ^ d)], sizes) for r in range(p)]
        d *= 2
    return v[0]


def rel_err(actual, expected) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    a = actual.double().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    e = np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(a - e) / np.linalg.norm(e))


def make_grads(rng: np.random.Generator, n: int, dim: int, noise: float = 1.0) -> np.ndarray:
    """Gradients sharing a signal, each with its own noise and scale, exactly float32."""
    g = rng.standard_normal(dim) + noise * rng.standard_normal((n, dim))
    g *= rng.uniform(0.2, 5.0, size=(n, 1))
    return g.astype(np.float32).astype(np.float64)


def t(x) -> torch.Tensor:
    return torch.tensor(np.asarray(x), dtype=torch.float32)


def close(actual: torch.Tensor, expected, rtol=RTOL, atol=ATOL) -> None:
    np.testing.assert_allclose(actual.double().numpy(), np.asarray(expected), rtol=rtol,
                               atol=atol)


SIZES = [12, 3, 20, 5]  # four "layers", 40 elements


# ---------------------------------------------------------------------------------------
# The pair rule
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("sizes", [None, SIZES], ids=["whole", "per_layer"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pair_matches_numpy_oracle(seed, sizes):
    rng = np.random.default_rng(seed)
    a, b = make_grads(rng, 2, sum(SIZES))
    expected = np_pair(a, b, sizes)
    close(adasum_pair(t(a), t(b), sizes), expected)
    # and the coefficients themselves, per segment
    c_a, c_b = adasum_coefficients(t(a), t(b), sizes)
    bounds = np.cumsum([0, *(sizes or [a.size])])
    for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        x, y = a[lo:hi], b[lo:hi]
        assert float(c_a[k]) == pytest.approx(1 - (x @ y) / (2 * (x @ x)), rel=1e-5)
        assert float(c_b[k]) == pytest.approx(1 - (x @ y) / (2 * (y @ y)), rel=1e-5)


def test_pair_of_parallel_gradients_is_their_mean():
    a = t(np.random.default_rng(3).standard_normal(50))
    close(adasum_pair(a, 3.0 * a), (2.0 * a).double().numpy())
    # anti-parallel gradients of equal norm cancel
    close(adasum_pair(a, -a), np.zeros(50))


@pytest.mark.parametrize("sizes", [None, SIZES], ids=["whole", "per_layer"])
def test_identical_gradients_give_exactly_that_gradient(sizes):
    g = t(np.random.default_rng(4).standard_normal(40) * 3.0)
    assert torch.equal(adasum_pair(g, g.clone(), sizes), g)
    for n in range(1, 8):
        assert torch.equal(adasum_tree(g.repeat(n, 1), sizes), g), n


@pytest.mark.parametrize("sizes", [None, SIZES], ids=["whole", "per_layer"])
def test_orthogonal_gradients_give_their_sum(sizes):
    # disjoint supports, and overlapping supports with a zero dot product
    a = torch.zeros(40)
    b = torch.zeros(40)
    a[:12] = torch.linspace(-1.0, 2.0, 12)
    b[12:] = 0.5
    assert torch.equal(adasum_pair(a, b, sizes), a + b)
    a, b = torch.zeros(40), torch.zeros(40)
    a[:2] = torch.tensor([1.0, 1.0])
    b[:2] = torch.tensor([3.0, -3.0])
    assert torch.equal(adasum_pair(a, b, sizes), a + b)
    # one-hot directions with scales and signs, any number of workers
    for n in range(1, 8):
        grads = torch.zeros(n, 40)
        for i in range(n):
            grads[i, (7 * i) % 40] = (i + 1.0) * (-1) ** i
        assert torch.equal(adasum_tree(grads, sizes), grads.sum(0)), n


def test_zero_vector_contributes_nothing():
    b = t(np.random.default_rng(5).standard_normal(40))
    z = torch.zeros(40)
    for sizes in (None, SIZES):
        assert torch.equal(adasum_pair(z, b, sizes), b)
        assert torch.equal(adasum_pair(b, z, sizes), b)
        out = adasum_pair(z, z.clone(), sizes)
        assert torch.equal(out, z) and not out.isnan().any()
    # per layer: a zero in one tensor of a only; that tensor passes b through
    a = t(np.random.default_rng(6).standard_normal(40))
    a[12:15] = 0.0
    got = adasum_pair(a, b, SIZES)
    assert torch.equal(got[12:15], b[12:15])
    close(got, np_pair(a.double().numpy(), b.double().numpy(), SIZES))
    c_a, c_b = adasum_coefficients(a, b, SIZES)
    assert float(c_a[1]) == 1.0 and float(c_b[1]) == 1.0
    # a piece whose squared norm underflows fp32 is combined like any other (identical
    # pieces give themselves), not treated as a zero piece and added
    tiny = torch.full((4,), 1e-24)
    assert float(adasum_coefficients(tiny, tiny)[0]) == 0.5
    assert torch.equal(adasum_pair(tiny, tiny.clone()), tiny)


def test_per_layer_and_whole_vector_differ_when_layers_disagree():
    # layer 1 identical, layer 2 opposite: per layer that is (mean, cancel); the whole
    # vectors are orthogonal, so whole-vector AdaSum sums them
    a = torch.tensor([1.0, 0.0, 1.0, 0.0])
    b = torch.tensor([1.0, 0.0, -1.0, 0.0])
    assert torch.equal(adasum_pair(a, b, [2, 2]), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert torch.equal(adasum_pair(a, b), torch.tensor([2.0, 0.0, 0.0, 0.0]))
    rng = np.random.default_rng(7)
    x, y = make_grads(rng, 2, 40)
    y[12:15] = -x[12:15]  # one layer disagreeing with the rest
    whole, layered = adasum_pair(t(x), t(y)), adasum_pair(t(x), t(y), SIZES)
    assert (whole - layered).abs().max() > 0.1


def test_pair_is_bit_reproducible_across_alignment_threads_and_order():
    # torch.dot (MKL) changes its last bits with the memory alignment and the thread count;
    # both partners of an exchange must compute identical bits
    n = 200_003
    rng = np.random.default_rng(8)
    x, y = (t(v) for v in make_grads(rng, 2, n))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = adasum_pair(x, y)
        ref_layers = adasum_pair(x, y, [100_000, 3, 100_000])
        torch.set_num_threads(max(2, threads))
        for off in (1, 2, 3, 5):
            bx = torch.empty(n + 8)
            by = torch.empty(n + 8)
            xs, ys = bx[off:off + n], by[8 - off:8 - off + n]
            xs.copy_(x)
            ys.copy_(y)
            assert torch.equal(adasum_pair(xs, ys), ref), off
            assert torch.equal(adasum_pair(ys, xs), ref), off
            assert torch.equal(adasum_pair(xs, ys, [100_000, 3, 100_000]), ref_layers), off
    finally:
        torch.set_num_threads(threads)


def test_pair_out_may_alias_either_input_and_keeps_dtype():
    rng = np.random.default_rng(9)
    a, b = (t(v) for v in make_grads(rng, 2, 40))
    ref = adasum_pair(a, b, SIZES)
    a1, b1 = a.clone(), b.clone()
    adasum_pair(a1, b1, SIZES, out=a1)
    a2, b2 = a.clone(), b.clone()
    adasum_pair(a2, b2, SIZES, out=b2)
    assert torch.equal(a1, ref) and torch.equal(b2, ref)
    half = adasum_pair(a.bfloat16(), b.bfloat16(), SIZES)
    assert half.dtype == torch.bfloat16
    expected = np_pair(a.bfloat16().double().numpy(), b.bfloat16().double().numpy(), SIZES)
    close(half, expected, rtol=1e-2, atol=1e-2)


def test_segments_must_cover_the_vector():
    with pytest.raises(ValueError, match="segments"):
        adasum_pair(torch.ones(5), torch.ones(5), [2, 2])
    with pytest.raises(ValueError, match="shapes"):
        adasum_pair(torch.ones(5), torch.ones(4))


# ---------------------------------------------------------------------------------------
# The tree
# ---------------------------------------------------------------------------------------

def test_largest_power_of_two():
    assert [largest_power_of_two(n) for n in range(1, 10)] == [1, 2, 2, 4, 4, 4, 4, 8, 8]
    with pytest.raises(ValueError):
        largest_power_of_two(0)


def test_tree_nesting_matches_hand_written_oracle():
    """The documented nesting, written out by hand for each N, in float64."""
    rng = np.random.default_rng(10)
    g = make_grads(rng, 7, 40)

    def P(a, b):
        return np_pair(a, b, SIZES)

    expected = {
        1: g[0],
        2: P(g[0], g[1]),
        3: P(P(g[0], g[2]), g[1]),
        4: P(P(g[0], g[1]), P(g[2], g[3])),
        5: P(P(P(g[0], g[4]), g[1]), P(g[2], g[3])),
        6: P(P(P(g[0], g[4]), P(g[1], g[5])), P(g[2], g[3])),
        7: P(P(P(g[0], g[4]), P(g[1], g[5])), P(P(g[2], g[6]), g[3])),
    }
    for n, want in expected.items():
        close(adasum_tree(t(g[:n]), SIZES), want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np_tree(g[:n], SIZES), want, rtol=1e-12, atol=0)
    # the remainder makes the tree unbalanced: a different nesting gives another result
    balanced_3 = P(P(g[0], g[1]), g[2])
    assert np.abs(expected[3] - balanced_3).max() > 1e-2


def test_registered_with_per_layer_default_true():
    assert "adasum" in accord.algorithms.list_algorithms()
    assert accord.algorithms.validate("adasum", {}) == {"per_layer": True}
    assert accord.algorithms.validate("adasum", {"per_layer": "false"}) == {"per_layer": False}
    with pytest.raises(ValueError, match="per_layer"):
        accord.algorithms.validate("adasum", {"per_layer": "maybe"})


# ---------------------------------------------------------------------------------------
# Precision: tiny gradients, Horovod's stability data, float64 parameters
# ---------------------------------------------------------------------------------------

def stability_grads(n: int, dtype: np.dtype) -> np.ndarray:
    """Horovod's AdaSum stability data (test_stability in its PyTorch AdaSum tests): 1024
    elements per rank, one vector a ~ Normal(0, smallest normal of the dtype) scaled by a
    factor r_i ~ Normal(0, 1) per rank (parallel or anti-parallel gradients), rounded to
    the dtype. Returned (n, 1024) in float64, exactly representable in the dtype."""
    rng = np.random.RandomState(2)
    a = rng.normal(0.0, np.finfo(dtype).tiny, (1024, 1))
    r = rng.normal(0.0, 1.0, (n, 1))
    return (r @ a.T).astype(dtype).astype(np.float64)


STABILITY_SHAPES = [(16, 32), (512,)]
STABILITY_SIZES = [512, 512]
DTYPES = {"float32": (np.float32, torch.float32), "float16": (np.float16, torch.float16)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [2, 3, 4, 5, 8])
def test_horovod_stability_data(n, dtype):
    np_dtype, torch_dtype = DTYPES[dtype]
    G = stability_grads(n, np_dtype)
    assert np.abs(G).max() < 8 * np.finfo(np_dtype).tiny  # around the smallest normal
    bound = 100 * np.finfo(np_dtype).eps  # Horovod's criterion: 100 eps of the dtype
    for sizes in (None, STABILITY_SIZES):
        got = adasum_tree(torch.tensor(G, dtype=torch_dtype), sizes)
        assert got.dtype == torch_dtype
        want = np_tree(G, sizes)
        assert rel_err(got, want) < bound, sizes
        if n in (2, 4, 8):
            # parallel vectors: every pair is their mean, so the balanced tree too (up to
            # the rounding of the data to the dtype, which bends them slightly)
            assert rel_err(want, G.mean(axis=0)) < bound
            assert rel_err(got, G.mean(axis=0)) < bound
            assert rel_err(got, G.sum(axis=0)) > 0.1  # not the sum


def tiny_grads(n: int, which: str, dtype=np.float32, dim: int = 17, seed: int = 0):
    """Gradients sharing a signal; ``which`` = "all": every rank's scaled to about 1e-24
    (squared norms around 1e-47 underflow fp32), "one": rank 0's only."""
    rng = np.random.default_rng(seed)
    G = rng.standard_normal(dim) + 0.7 * rng.standard_normal((n, dim))
    if which == "all":
        G *= 1e-24
    else:
        G[0] *= 1e-24
    return G.astype(dtype).astype(np.float64)


@pytest.mark.parametrize("sizes", [None, [12, 5]], ids=["whole", "per_layer"])
@pytest.mark.parametrize("n", [2, 4])
def test_tiny_gradients_are_combined_not_added(n, sizes):
    G = tiny_grads(n, "all")
    got = adasum_tree(t(G), sizes)
    want = np_tree(G, sizes)
    assert rel_err(got, want) < 1e-5
    assert rel_err(got, G.sum(axis=0)) > 0.2  # what adding them would give
    # identical tiny gradients give that gradient, not n times it
    same = t(np.tile(G[0], (n, 1)))
    assert rel_err(adasum_tree(same, sizes), G[0]) < 1e-6
    # one tiny gradient among normal ones: it still removes half of the others' component
    # along it, unlike a zero (or added) vector
    G = tiny_grads(n, "one")
    got = adasum_tree(t(G), sizes)
    want = np_tree(G, sizes)
    assert rel_err(got, want) < 1e-5
    without = G.copy()
    without[0] = 0.0
    assert rel_err(got, np_tree(without, sizes)) > 0.05


@pytest.mark.parametrize("sizes", [None, SIZES], ids=["whole", "per_layer"])
def test_float64_vectors_give_float64_results(sizes):
    rng = np.random.default_rng(12)
    g = rng.standard_normal((7, 40)) * rng.uniform(0.1, 10.0, (7, 1))  # not fp32-exact
    a, b = torch.tensor(g[0]), torch.tensor(g[1])
    got = adasum_pair(a, b, sizes)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), np_pair(g[0], g[1], sizes), rtol=1e-12,
                               atol=1e-13)
    for n in range(1, 8):
        got = adasum_tree(torch.tensor(g[:n]), sizes)
        assert got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), np_tree(g[:n], sizes), rtol=1e-12,
                                   atol=1e-13)
    # an fp32 computation would be off by far more than that
    assert rel_err(adasum_pair(a.float(), b.float(), sizes), np_pair(g[0], g[1], sizes)) > 1e-12


def test_large_pieces_are_blocked_without_changing_the_bits():
    # a piece longer than one block of float64 products, against an unblocked oracle
    n = 3 * adasum._BLOCK + 1234
    rng = np.random.default_rng(13)
    x, y = make_grads(rng, 2, n)
    c_a, c_b = adasum_coefficients(t(x), t(y))
    dot, nx, ny = x @ y, x @ x, y @ y
    assert float(c_a[0]) == pytest.approx(1 - dot / (2 * nx), rel=1e-12)
    assert float(c_b[0]) == pytest.approx(1 - dot / (2 * ny), rel=1e-12)
    prods = torch.tensor(np.stack([x * y, x * x, y * y]))
    assert torch.equal(torch.stack([c_a, c_b]).reshape(-1),
                       torch.stack(adasum._coefficients(*adasum._row_sums(prods))).reshape(-1))


# ---------------------------------------------------------------------------------------
# One real world of 6 processes
# ---------------------------------------------------------------------------------------

WORLD = 6
# name -> global ranks (None: the default group); members deliberately not 0..n-1
GROUPS = {"n6": None, "n4": [0, 2, 3, 5], "n3": [1, 3, 4], "n2": [2, 5], "n1": [4]}
STEPS = 2
BATCH = 4
LR = 0.1
SEED = 5
SHAPES = [(3, 4), (5,)]  # synthetic parameters for the crafted gradients (17 elements)
ONE_HOT = [0, 13, 5, 16, 2, 9]  # one position per group rank, over both tensors


def _flat(tensors):
    return torch.cat([x.detach().reshape(-1) for x in tensors]).clone()


def _model() -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                   torch.nn.Linear(16, 3))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(BATCH, 8, generator=gen)
    return x, torch.randint(0, 3, (BATCH,), generator=gen)


def _real(group, per_layer, rank):
    """A small MLP, identical start on every rank, own data per rank, a few SGD steps."""
    model = _model()
    agg = accord.build("adasum", model.parameters(), group=group, per_layer=per_layer,
                       broadcast=False)
    trace = {"local": [], "agg": [], "params": [], "metrics": []}
    for step in range(STEPS):
        model.zero_grad(set_to_none=True)
        x, y = _batch(rank, step)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        trace["local"].append(_flat(p.grad for p in model.parameters()))
        agg.after_backward(accord.StepContext(step=step))
        trace["agg"].append(_flat(p.grad for p in model.parameters()))
        with torch.no_grad():  # plain SGD; torch.optim's first step costs seconds of imports
            for p in model.parameters():
                p.sub_(p.grad, alpha=LR)
        trace["params"].append(_flat(model.parameters()))
        trace["metrics"].append(agg.metrics())
    trace["comm"] = agg.comm.stats.as_dict()
    trace["sizes"] = [p.numel() for p in model.parameters()]
    agg.close()
    return trace


def _crafted(group, per_layer, grad, shapes=SHAPES):
    """One ``after_backward`` on parameters of ``shapes`` in ``grad``'s dtype whose
    gradients are ``grad``; returns the aggregated gradient (flat)."""
    params = [torch.nn.Parameter(torch.zeros(s, dtype=grad.dtype)) for s in shapes]
    agg = accord.build("adasum", params, group=group, per_layer=per_layer)
    for p, v in zip(params, grad.split([p.numel() for p in params]), strict=True):
        p.grad = v.view_as(p).clone()
    agg.after_backward(accord.StepContext(step=0))
    return _flat(p.grad for p in params)


def precision_cases(n: int) -> dict[str, tuple[np.ndarray, torch.dtype, list]]:
    """Per case, every group rank's gradient (n, D) in float64, the parameter dtype and
    the shapes: tiny gradients on all ranks or on rank 0, Horovod's stability data, and
    float64 gradients that fp32 cannot represent."""
    f64 = np.random.default_rng(21).standard_normal((n, 17)) * np.linspace(0.5, 4.0, n)[:, None]
    return {
        "tiny_all": (tiny_grads(n, "all", seed=n), torch.float32, SHAPES),
        "tiny_one": (tiny_grads(n, "one", seed=n), torch.float32, SHAPES),
        "stability": (stability_grads(n, np.float32), torch.float32, STABILITY_SHAPES),
        "float64": (f64, torch.float64, SHAPES),
    }


def _adasum_world(rank, world):
    groups = {name: None if ranks is None else dist.new_group(ranks)
              for name, ranks in GROUPS.items()}  # collective: every rank, same order
    same = torch.randn(17, generator=torch.Generator().manual_seed(99))
    out = {}
    for name, ranks in GROUPS.items():
        members = list(range(world)) if ranks is None else ranks
        if rank not in members:
            continue
        group, grank = groups[name], members.index(rank)
        one_hot = torch.zeros(17)
        one_hot[ONE_HOT[grank]] = (grank + 1.0) * (-1) ** grank
        res = {"group_rank": grank}
        for per_layer in (True, False):
            res[per_layer] = {
                "real": _real(group, per_layer, rank),
                "same": _crafted(group, per_layer, same),
                "one_hot": (one_hot, _crafted(group, per_layer, one_hot)),
            }
            for case, (G, dtype, shapes) in precision_cases(len(members)).items():
                grad = torch.tensor(G[grank], dtype=dtype)
                res[per_layer][case] = _crafted(group, per_layer, grad, shapes)
        out[name] = res
    return out


@pytest.fixture(scope="module")
def world():
    per_rank = run_world(_adasum_world, WORLD)
    groups = {}
    for name, ranks in GROUPS.items():
        members = list(range(WORLD)) if ranks is None else ranks
        traces = [per_rank[r][name] for r in members]
        assert [tr["group_rank"] for tr in traces] == list(range(len(members)))
        groups[name] = traces  # in group-rank order
    return groups


LAYERS = pytest.mark.parametrize("per_layer", [True, False], ids=["per_layer", "whole"])


@LAYERS
def test_world_two_workers_equal_the_pair_formula(world, per_layer):
    r0, r1 = (tr[per_layer]["real"] for tr in world["n2"])
    sizes = r0["sizes"] if per_layer else None
    for step in range(STEPS):
        g0, g1 = r0["local"][step], r1["local"][step]
        assert torch.equal(r0["agg"][step], r1["agg"][step])
        assert torch.equal(r0["agg"][step], adasum_pair(g0, g1, sizes))
        close(r0["agg"][step], np_pair(g0.double().numpy(), g1.double().numpy(), sizes),
              rtol=1e-4, atol=1e-6)


@LAYERS
def test_world_identical_gradients_give_that_gradient(world, per_layer):
    same = torch.randn(17, generator=torch.Generator().manual_seed(99))
    for name, traces in world.items():
        for r, tr in enumerate(traces):
            assert torch.equal(tr[per_layer]["same"], same), (name, r)


@LAYERS
def test_world_orthogonal_gradients_give_their_sum(world, per_layer):
    for name, traces in world.items():
        total = torch.stack([tr[per_layer]["one_hot"][0] for tr in traces]).sum(0)
        assert int((total != 0).sum()) == len(traces)
        for r, tr in enumerate(traces):
            assert torch.equal(tr[per_layer]["one_hot"][1], total), (name, r)


def _rank0_coefficients(local: torch.Tensor, sizes) -> torch.Tensor:
    """Every pair coefficient rank 0 computes: the fold of rank P, then one pair per level
    with the reduction of the block [d, 2d) (reduced here block by block)."""
    n = local.shape[0]
    p = largest_power_of_two(n)
    v = [g.clone() for g in local]
    coefs = []
    for r in range(p, n):
        if r == p:
            coefs += adasum_coefficients(v[0], v[r], sizes)
        v[r - p] = adasum_pair(v[r - p], v[r], sizes)
    d = 1
    while d < p:
        coefs += adasum_coefficients(v[0], v[d], sizes)
        for r in range(0, p, 2 * d):
            v[r] = adasum_pair(v[r], v[r + d], sizes)
        d *= 2
    return torch.cat(coefs)


@pytest.mark.parametrize("name", ["n3", "n4", "n6"])
@LAYERS
def test_world_result_identical_on_all_ranks_and_equal_to_the_tree(world, name, per_layer):
    traces = [tr[per_layer]["real"] for tr in world[name]]
    sizes = traces[0]["sizes"] if per_layer else None
    for step in range(STEPS):
        ref = traces[0]["agg"][step]
        for r, tr in enumerate(traces):
            assert torch.equal(tr["agg"][step], ref), (step, r)
            assert torch.equal(tr["params"][step], traces[0]["params"][step]), (step, r)
        local = torch.stack([tr["local"][step] for tr in traces])
        assert torch.equal(ref, adasum_tree(local, sizes))
        # not vacuous: the workers' gradients differ, and AdaSum is neither mean nor sum
        assert not torch.allclose(local[0], local[1])
        assert (ref - local.mean(0)).abs().max() > 1e-3
        assert (ref - local.sum(0)).abs().max() > 1e-3
        m = traces[0]["metrics"][step]
        assert m["grad_norm"] == pytest.approx(float(ref.norm()), rel=1e-6)
        coefs = _rank0_coefficients(local, sizes)
        assert m["coef_min"] == float(coefs.min()) and m["coef_max"] == float(coefs.max())


@LAYERS
def test_world_of_one_leaves_the_gradient_unchanged(world, per_layer):
    (tr,) = world["n1"]
    real = tr[per_layer]["real"]
    for step in range(STEPS):
        assert torch.equal(real["agg"][step], real["local"][step])
    assert real["comm"] == {}


@pytest.mark.parametrize("case", ["tiny_all", "tiny_one", "stability", "float64"])
@LAYERS
def test_world_precision_cases_match_the_float64_oracle(world, case, per_layer):
    for name, traces in world.items():
        n = len(traces)
        G, dtype, shapes = precision_cases(n)[case]
        sizes = [torch.Size(s).numel() for s in shapes] if per_layer else None
        want = np_tree(G, sizes)
        got = [tr[per_layer][case] for tr in traces]
        assert got[0].dtype == dtype
        for r in range(1, n):
            assert torch.equal(got[r], got[0]), (name, r)
        if case == "float64":
            np.testing.assert_allclose(got[0].numpy(), want, rtol=1e-12,
                                       atol=1e-12 * np.abs(want).max())
        else:
            bound = 100 * np.finfo(np.float32).eps if case == "stability" else 1e-5
            assert rel_err(got[0], want) < bound, name
        if n == 1:
            continue
        if case == "tiny_all" or (case == "stability" and n in (2, 4)):
            assert rel_err(got[0], G.sum(axis=0)) > 0.2, name  # combined, not added
        if case == "tiny_one":
            without = G.copy()
            without[0] = 0.0
            assert rel_err(got[0], np_tree(without, sizes)) > 0.05, name


def _expected_comm(n: int, r: int, nbytes: int) -> dict[str, tuple[int, int]]:
    """(calls, bytes) per kind over STEPS steps, from the schedule in the docstring."""
    p = 1
    while 2 * p <= n:
        p *= 2
    rounds = p.bit_length() - 1
    out = {}
    if r < p and rounds:
        out["exchange"] = (STEPS * rounds, STEPS * rounds * nbytes)
    if r < n - p or r >= p:
        out["send"] = (STEPS, STEPS * nbytes)
        out["recv"] = (STEPS, 0)
    return out


@LAYERS
def test_world_communication_accounting_follows_the_schedule(world, per_layer):
    for name, traces in world.items():
        n = len(traces)
        for r, tr in enumerate(traces):
            real = tr[per_layer]["real"]
            nbytes = sum(real["sizes"]) * 4
            got = {k: (v["calls"], v["bytes"]) for k, v in real["comm"].items()}
            assert got == _expected_comm(n, r, nbytes), (name, r)
    # e.g. rank 1 of 6 (folds rank 5 in): 2 exchanges, one recv and one send per step
    assert _expected_comm(6, 1, 4) == {"exchange": (2 * STEPS, 8 * STEPS),
                                       "send": (STEPS, 4 * STEPS), "recv": (STEPS, 0)}
