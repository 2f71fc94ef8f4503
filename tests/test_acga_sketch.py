"""ACGA's coefficient routes: ``sketch``, ``gather`` and the default ``auto``.

The sketch's Gram estimate is unbiased, its error is that of independent random signs per
element (the formula, checked on coherent rows) and shrinks as k grows; in a gloo world
the sketched coefficients converge to the exact ones, are bit-identical on every rank, and
the written gradient is exactly the combination of the true gradients with them.
``gather`` gives the exact coefficients in one all-gather; ``auto`` is bit for bit the route
it picks, on either side of its threshold.
"""

from __future__ import annotations

import pytest
import torch
from worlds import run_world

import accord
from accord.algorithms import acga as acga_module
from accord.algorithms.acga import (
    GramSketch,
    consensus_coefficients,
    normalize_coefficients,
    sketch_coefficients,
)


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


def _sketch_by_definition(sk: GramSketch, tensors, count: int) -> torch.Tensor:
    """y = sum_r tau_r (sigma_r * x_r) of each segment from the docstring's formula, with
    sigma_r the table window at the row's shift (an oracle for ``fill_``)."""
    tau, shifts = sk.row_signs(count)
    xs = [torch.zeros(n) if t is None else t.reshape(-1).float()
          for n, t in zip(sk.sizes, tensors, strict=True)]
    segments = [torch.cat(xs)] if sk.segments == 1 and len(xs) > 1 else xs
    out, row_at = [], 0
    for x, rows in zip(segments, sk.rows, strict=True):
        if rows == 0:
            out.append(x)
            continue
        padded = torch.zeros(rows * sk.k)
        padded[: x.numel()] = x
        y = torch.zeros(sk.k)
        for r, chunk in enumerate(padded.view(rows, sk.k)):
            sigma = sk.table[shifts[row_at + r]: shifts[row_at + r] + sk.k]
            y += tau[row_at + r] * sigma * chunk
        out.append(y)
        row_at += rows
    return torch.cat(out)


@pytest.mark.parametrize("joined", [True, False])
def test_fill_is_the_formula_and_the_cpu_foreach_path_is_the_per_piece_path_bit_for_bit(
        monkeypatch, joined):
    from accord.algorithms import _gram_sketch

    gen = torch.Generator().manual_seed(4)
    # tensors straddling row boundaries, one shorter than k, one empty, one not given
    sizes = [700, 3, 1500, 0, 260, 90]
    tensors = [torch.randn(n, generator=gen) for n in sizes]
    tensors[4] = None
    sk = GramSketch(sizes, k=256, seed=2, device="cpu", joined=joined)
    runs = {}
    for fused in (True, False):
        monkeypatch.setattr(_gram_sketch, "FOREACH_ON_CPU", fused)
        out = torch.full((sk.width + sk.segments,), 7.0)  # stale numbers are overwritten
        runs[fused] = sk.fill_(tensors, 11, out).clone()
        assert torch.equal(sk.fill_(tensors, 11, out), runs[fused])  # the kept views
    assert torch.equal(runs[True], runs[False])
    torch.testing.assert_close(runs[True][: sk.width],
                               _sketch_by_definition(sk, tensors, 11), rtol=1e-5, atol=1e-5)
    given = [torch.zeros(n) if t is None else t for n, t in zip(sizes, tensors, strict=True)]
    norms = ([torch.cat(given).norm()] if joined else [t.norm() for t in given])
    torch.testing.assert_close(runs[True][sk.width:], torch.stack(norms))


@pytest.mark.parametrize("joined", [True, False])
def test_the_native_kernel_gives_the_torch_paths_sketch_bit_for_bit(joined, monkeypatch):
    from accord.algorithms import _sketch_native

    if _sketch_native.kernel() is None:
        pytest.skip("the native sketch kernel does not build here (ACCORD_NATIVE, compiler)")
    gen = torch.Generator().manual_seed(5)
    sizes = [700, 3, 1500, 0, 260, 90]
    # every tensor given, one not given; tiles across a row and pieces (100), and the
    # default (a row of k = 256 in one tile)
    for missing, tile in ((None, 100), (4, 100), (None, _sketch_native.TILE), (4, 7)):
        monkeypatch.setattr(_sketch_native, "TILE", tile)
        tensors = [torch.randn(n, generator=gen) for n in sizes]
        if missing is not None:
            tensors[missing] = None
        sk = GramSketch(sizes, k=256, seed=2, device="cpu", joined=joined)
        assert sk.native is not None
        runs = []
        for native in (sk.native, None):
            sk.native = native
            runs.append(sk.fill_(tensors, 11, torch.full((sk.width + sk.segments,), 7.0)))
        assert torch.equal(runs[0][: sk.width], runs[1][: sk.width])
        torch.testing.assert_close(runs[0][sk.width:], runs[1][sk.width:], rtol=1e-6, atol=0)
    # a bf16 gradient is not the kernel's: it takes the torch path, the same numbers
    half = [None if t is None else t.to(torch.bfloat16) for t in tensors]
    sk.native = _sketch_native.kernel()
    got = sk.fill_(half, 3, torch.zeros(sk.width + sk.segments))
    sk.native = None
    torch.testing.assert_close(got, sk.fill_(half, 3, torch.zeros(sk.width + sk.segments)),
                               rtol=0, atol=0)
    assert torch.count_nonzero(got) > 0


def test_accord_native_chooses_the_kernel_and_a_bad_value_is_one_line(monkeypatch):
    from accord.algorithms import _sketch_native

    monkeypatch.setenv("ACCORD_NATIVE", "off")
    assert _sketch_native.kernel() is None
    assert GramSketch([5000], k=256, seed=0, device="cpu").native is None
    monkeypatch.setenv("ACCORD_NATIVE", "fast")
    with pytest.raises(ValueError, match=r"^ACCORD_NATIVE: got 'fast'; allowed: auto, off, on$"):
        _sketch_native.kernel()


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


def _coherent_pair(k: int = 512, rows: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Two vectors of ``rows`` rows of k whose rows are nearly parallel, as a layer's weight
    gradient laid out in rows: every row a multiple of one non-negative pattern."""
    gen = torch.Generator().manual_seed(0)
    u, v = torch.randn(k, generator=gen).abs(), torch.randn(k, generator=gen).abs()
    a = torch.randn(rows, generator=gen)
    b = a + 0.5 * torch.randn(rows, generator=gen)
    x = a[:, None] * u + 0.1 * torch.randn(rows, k, generator=gen)
    z = b[:, None] * (u + 0.3 * v) + 0.1 * torch.randn(rows, k, generator=gen)
    return x.reshape(-1), z.reshape(-1)


def test_sketch_error_is_that_of_independent_random_signs_on_coherent_rows():
    """The variance of <y(x), y(z)> - <x, z> over steps is the formula for independent
    random signs per element, sum_{r<r'} sum_l (x_rl z_r'l + x_r'l z_rl)^2, although the
    signs are windows of one table of k; summing the rows without signs would be 160 times
    worse on these rows."""
    k = 512
    x, z = _coherent_pair(k)
    X, Z = x.view(-1, k), z.view(-1, k)
    sq_x, sq_z, cross = X.square().sum(0), Z.square().sum(0), (X * Z).sum(0)
    signs = float((sq_x * sq_z + cross.square()
                   - 2 * (X.square() * Z.square()).sum(0)).sum())
    pairs = X @ Z.T
    no_signs = float((pairs + pairs.T).triu(1).square().sum())
    assert no_signs > 100 * signs
    sk = GramSketch([x.numel()], k, seed=1, device="cpu")
    errors = torch.tensor([float(sk.apply([x], c) @ sk.apply([z], c)) for c in range(400)])
    errors -= float(x @ z)
    assert 0.8 < float(errors.square().mean()) / signs < 1.25
    assert abs(float(errors.mean())) < 0.2 * signs ** 0.5  # unbiased: 400 steps average out


def test_sketched_coefficient_error_on_a_seeded_case():
    """N = 4 correlated workers, 40k numbers: the normalised coefficients' relative error
    against the exact ones falls as 1/sqrt(k) (0.8% at k = 4096)."""
    gen = torch.Generator().manual_seed(0)
    n, dim = 4, 40_000
    scale = torch.linspace(0.1, 3.0, dim)
    sketches = {k: GramSketch([dim], k, seed=0, device="cpu") for k in (256, 4096)}
    errors: dict[int, list[float]] = {k: [] for k in sketches}
    for step in range(16):
        common = torch.randn(dim, generator=gen)
        g = torch.stack([(0.5 * common + torch.randn(dim, generator=gen)) * scale
                         for _ in range(n)])
        norms = g.norm(dim=1)
        c = normalize_coefficients(consensus_coefficients(g @ g.sum(0), norms, n))[0]
        for k, sk in sketches.items():
            gram = sk.gram(torch.stack([sk.apply([row], step) for row in g]), norms[None])
            c_k = normalize_coefficients(sketch_coefficients(gram, norms[None]))[0][0]
            errors[k].append(float((c_k - c).norm() / c.norm()))
    median = {k: sorted(e)[len(e) // 2] for k, e in errors.items()}
    assert 0.004 < median[4096] < 0.016, median
    assert 2.5 < median[256] / median[4096] < 8, median  # sqrt(16) = 4


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
    variants = {"exact": {"coefficients": "exact"}, "gather": {"coefficients": "gather"},
                **{k: {"coefficients": "sketch", "sketch_size": k} for k in (*SIZES, 2048)}}
    aggs = {name: accord.build("acga", params, broadcast=False, momentum=0.0, **hp)
            for name, hp in variants.items()}
    # auto on either side of its all-gather threshold (N x D numbers): at it, the gather;
    # one below, the sketch when it is at most half the gradient (k = 256), else exact
    dim = sum(p.numel() for p in params)
    for name, limit, hp in (("auto_at", world * dim, {}),
                            ("auto_sketch", world * dim - 1, {"sketch_size": 256}),
                            ("auto_exact", world * dim - 1, {"sketch_size": 1024})):
        acga_module.GATHER_LIMIT, saved = limit, acga_module.GATHER_LIMIT
        try:
            aggs[name] = accord.build("acga", params, broadcast=False, momentum=0.0, **hp)
        finally:
            acga_module.GATHER_LIMIT = saved
    out: dict = {name: [] for name in aggs}
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
    out["modes"] = {name: agg.mode for name, agg in aggs.items()}
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


def test_gather_gives_the_exact_coefficients_in_one_all_gather(results):
    world, per_rank = results
    dim = sum(p.numel() for p in _model().parameters())
    for r in range(world):
        out = per_rank[r]
        assert out["modes"]["gather"] == "gather"
        for s in range(4):
            for i in (0, 1):  # coefficients, written gradient
                torch.testing.assert_close(out["gather"][s][i], out["exact"][s][i],
                                           rtol=1e-5, atol=1e-7)
                assert torch.equal(out["gather"][s][i], per_rank[0]["gather"][s][i])
    stats = per_rank[0]["stats"]["gather"]
    assert set(stats) == {"allgather"}
    assert stats["allgather"]["calls"] == 4 and stats["allgather"]["bytes"] == 4 * 4 * dim


def test_auto_is_the_route_it_picks_on_either_side_of_its_threshold(results):
    world, per_rank = results
    out = per_rank[0]
    assert out["modes"] == {**out["modes"], "auto_at": "gather", "auto_sketch": "sketch",
                            "auto_exact": "exact"}
    for auto, route in (("auto_at", "gather"), ("auto_sketch", 256), ("auto_exact", "exact")):
        for s in range(4):
            for i in (0, 1):
                assert torch.equal(out[auto][s][i], out[route][s][i]), (auto, s, i)
        assert out["stats"][auto].keys() == out["stats"][route].keys()


def test_auto_leaves_the_gather_out_under_a_payload_compressor(world_of_one):
    """The compressor acts on allreduces; the gather would send the gradient past it."""
    from accord import comm as comm_module
    from accord.comm.compress import Compressor

    params = list(_model().parameters())
    assert accord.build("acga", params, broadcast=False).mode == "gather"
    comm_module.compress_payloads(Compressor.from_spec("bf16"))
    try:
        assert accord.build("acga", params, broadcast=False).mode == "exact"
        assert accord.build("acga", params, broadcast=False,
                            coefficients="gather").mode == "gather"  # asked for: kept
    finally:
        comm_module.compress_payloads(None)
