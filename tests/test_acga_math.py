"""ACGA / AdaCons maths checked against an independent float64 NumPy oracle.

The oracle below is written from the pseudo-code of the spec (shared/specs/algorithms.md,
section 1 (c)) and the fallback and norm-limit rules of the module docstring; it
deliberately does not call any accord function. The pure functions at the top of
``accord.algorithms.acga`` are tested directly, without a process group; one real gloo
world then checks that the distributed class computes what ``acga_combine`` computes on
nearly cancelling and adversarial gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from worlds import run_world

import accord
from accord.algorithms.acga import (
    acga_combine,
    consensus_coefficients,
    normalize_coefficients,
    sorted_momentum,
)

EPS = 1e-8
# float32 implementation vs float64 oracle: a few hundred ulps of slack.
RTOL = 2e-5
ATOL = 2e-6


# ---------------------------------------------------------------------------------------
# Independent NumPy oracle (float64), straight from the spec's pseudo-code
# ---------------------------------------------------------------------------------------

def np_normalize(c: np.ndarray, guard: str = "uniform"):
    """Row-wise: apply the guard, then divide by the sum; 1/N when the negative mass is at
    least half the positive mass (nearly cancelling, all-zero or all-negative rows).

    Returns (coefficients, number of rows that fell back to 1/N).
    """
    c = np.array(c, dtype=np.float64)
    rows = c.reshape(-1, c.shape[-1])
    out = np.empty_like(rows)
    hits = 0
    for r, row in enumerate(rows):
        row = row.copy()
        if guard == "shift" and row.min() < 0:
            row = row - row.min()
        elif guard == "clamp":
            row = np.where(row < 0, 0.0, row)
        positive = row[row > 0].sum()
        negative = -row[row < 0].sum()
        if negative >= 0.5 * positive:
            out[r] = 1.0 / row.size
            hits += 1
        else:
            out[r] = row / row.sum()
    return out.reshape(c.shape), hits


def np_acga_row(G, m, beta, reference_order=False, guard="uniform", eps=EPS):
    """One ACGA step on stacked gradients G (N, D) taken as one piece.
    Returns (d, c, m_new, a, perm, hits)."""
    G = np.asarray(G, dtype=np.float64)
    n_workers = G.shape[0]
    s = G.sum(axis=0)                                    # C1: allreduce-sum
    n = np.sqrt((G * G).sum(axis=1))                     # ||g_i||
    a = (G @ s) / (n_workers * (n + eps))                # consensus coefficients
    perm = np.argsort(a, kind="stable")
    sorted_a = a[perm]
    m_new = sorted_a.copy() if m is None else beta * m + (1.0 - beta) * sorted_a
    if reference_order:
        c = m_new[perm]                                  # what Main.py does
    else:
        c = np.empty(n_workers)
        c[perm] = m_new                                  # c[perm[k]] = m[k]
    c = np.where(n > 0, c, 0.0)                          # zero gradient: no direction
    c, hits = np_normalize(c, guard)
    w = c / (n + eps)
    d = (w[:, None] * G).sum(axis=0)                     # C3: allreduce-sum
    d = d / max(1.0, np.linalg.norm(d))                  # ||d|| <= 1
    return d, c, m_new, a, perm, hits


def np_acga_step(G, m, beta, reference_order=False, guard="uniform", eps=EPS, sizes=None):
    """np_acga_row on the whole vector, or on each piece of ``sizes`` (per-layer form:
    c, m, a, perm then have one row per piece, d is concatenated)."""
    if sizes is None:
        return np_acga_row(G, m, beta, reference_order, guard, eps)
    G = np.asarray(G, dtype=np.float64)
    bounds = np.cumsum([0, *sizes])
    rows = [np_acga_row(G[:, lo:hi], None if m is None else m[l], beta, reference_order,
                        guard, eps)
            for l, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))]
    d = np.concatenate([r[0] for r in rows])
    c, m_new, a, perm = (np.stack([r[k] for r in rows]) for k in (1, 2, 3, 4))
    return d, c, m_new, a, perm, sum(r[5] for r in rows)


def make_grads(rng: np.random.Generator, n_workers: int, dim: int = 48, noise: float = 1.2):
    """Worker gradients sharing a common signal, each with its own noise and scale.

    Rounded to float32 so the oracle and the implementation see identical inputs.
    """
    common = rng.standard_normal(dim)
    G = common + noise * rng.standard_normal((n_workers, dim))
    G *= rng.uniform(0.1, 10.0, size=(n_workers, 1))     # coefficients must be scale-free
    return G.astype(np.float32).astype(np.float64)


def t(x) -> torch.Tensor:
    return torch.tensor(np.asarray(x), dtype=torch.float32)


def close(actual: torch.Tensor, expected, rtol=RTOL, atol=ATOL) -> None:
    np.testing.assert_allclose(actual.double().numpy(), np.asarray(expected), rtol=rtol,
                               atol=atol)


# ---------------------------------------------------------------------------------------
# acga_combine vs the oracle
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.0, 0.9, 0.99])
@pytest.mark.parametrize("n_workers", [2, 3, 4, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("reference_order", [False, True])
def test_acga_combine_matches_oracle_over_steps(seed, n_workers, beta, reference_order):
    rng = np.random.default_rng(1000 * seed + n_workers)
    m_impl = None
    m_ref = None
    for _ in range(6):
        G = make_grads(rng, n_workers)
        d_ref, c_ref, m_ref, _, _, hits = np_acga_step(G, m_ref, beta, reference_order)
        assert hits == 0  # the data is meant to exercise the unguarded path
        d, c, m_impl = acga_combine(t(G), m_impl, beta, reference_order=reference_order)
        assert d.shape == (G.shape[1],) and c.shape == (n_workers,)
        assert m_impl.shape == (n_workers,)
        close(m_impl, m_ref)
        close(c, c_ref)
        close(d, d_ref)
        assert float(c.sum()) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("guard", ["uniform", "shift", "clamp"])
@pytest.mark.parametrize("seed", [3, 4])
def test_acga_combine_matches_oracle_with_guards_and_disagreeing_workers(guard, seed):
    # No common signal: coefficients have mixed signs, so the guards actually act.
    rng = np.random.default_rng(seed)
    m_impl = m_ref = None
    for _ in range(5):
        G = rng.standard_normal((5, 32))
        G[0] = -G.sum(axis=0)  # one worker opposing the others
        G = G.astype(np.float32).astype(np.float64)
        d_ref, c_ref, m_ref, _, _, _ = np_acga_step(G, m_ref, 0.5, guard=guard)
        d, c, m_impl = acga_combine(t(G), m_impl, 0.5, guard=guard)
        close(m_impl, m_ref, rtol=1e-4, atol=1e-5)
        close(c, c_ref, rtol=1e-4, atol=1e-5)
        close(d, d_ref, rtol=1e-4, atol=1e-5)


def test_consensus_coefficients_formula():
    rng = np.random.default_rng(7)
    G = make_grads(rng, 4)
    s = G.sum(axis=0)
    dots = G @ s
    norms = np.linalg.norm(G, axis=1)
    got = consensus_coefficients(t(dots), t(norms), 4)
    mean_g = G.mean(axis=0)
    expected = np.array([g @ mean_g / np.linalg.norm(g) for g in G])  # <u_i, mean g>
    close(got, expected)


# ---------------------------------------------------------------------------------------
# sorted_momentum: un-sorting and the reference script's order
# ---------------------------------------------------------------------------------------

A4 = (0.3, 0.1, 0.5, 0.2)


def test_sorted_momentum_first_step_inverse_scatter():
    m, c = sorted_momentum(t(A4), None, 0.9)
    close(m, [0.1, 0.2, 0.3, 0.5], atol=0)
    close(c, [0.3, 0.1, 0.5, 0.2], atol=0)


def test_sorted_momentum_first_step_reference_order():
    m, c = sorted_momentum(t(A4), None, 0.9, reference_order=True)
    close(m, [0.1, 0.2, 0.3, 0.5], atol=0)
    close(c, [0.2, 0.5, 0.1, 0.3], atol=0)


@pytest.mark.parametrize("reference_order", [False, True])
def test_sorted_momentum_ema_on_sorted_vector(reference_order):
    m0 = np.array([0.0, 0.1, 0.2, 0.7])
    a = np.array([0.4, 0.1, 0.6, 0.3])
    beta = 0.75
    m, c = sorted_momentum(t(a), t(m0), beta, reference_order=reference_order)
    m_expected = beta * m0 + (1 - beta) * np.sort(a)
    close(m, m_expected)
    perm = np.argsort(a)
    if reference_order:
        c_expected = m_expected[perm]
    else:
        c_expected = np.empty(4)
        c_expected[perm] = m_expected
    close(c, c_expected)


def test_sorted_momentum_rows_are_independent():
    rng = np.random.default_rng(11)
    a = rng.standard_normal((3, 5))
    m0 = np.sort(rng.standard_normal((3, 5)), axis=1)
    for ref in (False, True):
        m, c = sorted_momentum(t(a), t(m0), 0.6, reference_order=ref)
        assert m.shape == c.shape == (3, 5)
        for r in range(3):
            m_r, c_r = sorted_momentum(t(a[r]), t(m0[r]), 0.6, reference_order=ref)
            close(m[r], m_r.double().numpy(), atol=0, rtol=0)
            close(c[r], c_r.double().numpy(), atol=0, rtol=0)


def test_inverse_scatter_and_reference_order_differ_in_acga_combine():
    """N = 4 over several steps: the two un-sortings give different coefficients, and the
    default gives the worker holding the k-th smallest a the k-th smoothed value."""
    rng = np.random.default_rng(5)
    beta = 0.9
    m_def = m_ref = None
    n_differ = 0
    n_non_involution = 0
    for _ in range(6):
        G = make_grads(rng, 4, noise=2.0)
        perm = np_acga_step(G, None, beta)[4]  # stable argsort of the consensus values a
        d1, c1, m_def = acga_combine(t(G), m_def, beta)
        d2, c2, m_ref = acga_combine(t(G), m_ref, beta, reference_order=True)
        # both modes share the same sorted momentum
        close(m_def, m_ref.double().numpy(), atol=0, rtol=0)
        # default: c[perm[k]] = m[k] / sum(m)
        m_np = m_def.double().numpy()
        for k in range(4):
            assert float(c1[perm[k]]) == pytest.approx(m_np[k] / m_np.sum(), rel=1e-5)
        # so the coefficients are ranked exactly like the consensus values a
        assert np.array_equal(np.argsort(c1.numpy(), kind="stable"), perm)
        if not np.array_equal(perm[perm], np.arange(4)):
            n_non_involution += 1
            if not np.allclose(c1.numpy(), c2.numpy(), atol=1e-4):
                n_differ += 1
                assert not np.allclose(d1.numpy(), d2.numpy(), atol=1e-5)
    assert n_non_involution >= 2  # precondition: the data exercises the difference
    assert n_differ == n_non_involution


@pytest.mark.parametrize("seed", range(4))
def test_reference_order_is_harmless_for_two_workers(seed):
    rng = np.random.default_rng(seed)
    m1 = m2 = None
    for _ in range(4):
        G = make_grads(rng, 2)
        d1, c1, m1 = acga_combine(t(G), m1, 0.9)
        d2, c2, m2 = acga_combine(t(G), m2, 0.9, reference_order=True)
        close(c1, c2.double().numpy(), atol=0, rtol=0)
        close(d1, d2.double().numpy(), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------
# normalize_coefficients and its guards
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("guard", ["uniform", "shift", "clamp"])
@pytest.mark.parametrize("seed", range(3))
def test_normalized_rows_sum_to_one_and_match_oracle(guard, seed):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((6, 5)) + 0.3
    c[2] = 0.0  # an all-zero row
    c = c.astype(np.float32).astype(np.float64)
    out, hits = normalize_coefficients(t(c), guard)
    expected, expected_hits = np_normalize(c, guard)
    assert out.shape == (6, 5)
    close(out.sum(dim=-1), np.ones(6), atol=1e-6)
    close(out, expected, rtol=1e-5, atol=1e-6)
    assert int(hits) == expected_hits
    assert hits >= 1  # the all-zero row
    close(out[2], np.full(5, 0.2), atol=1e-7)
    if guard != "uniform":
        assert float(out.min()) >= 0.0


@pytest.mark.parametrize(
    ("guard", "c", "expected", "hits"),
    [
        # uniform keeps negative coefficients while the sum is clearly positive
        ("uniform", [0.5, -0.1, 0.6], [0.5, -0.1, 0.6], 0),
        ("uniform", [1.0, 2.0, 1.0], [0.25, 0.5, 0.25], 0),
        ("uniform", [-1.0, -2.0, 0.5], [1 / 3, 1 / 3, 1 / 3], 1),
        ("uniform", [1.0, -1.0], [0.5, 0.5], 1),
        ("uniform", [0.0, 0.0, 0.0, 0.0], [0.25] * 4, 1),
        # nearly cancelling: negative mass at least half the positive mass
        ("uniform", [0.5, -0.4999], [0.5, 0.5], 1),
        ("uniform", [1.0, -0.5], [0.5, 0.5], 1),
        ("uniform", [1.0, -0.49], [1 / 0.51, -0.49 / 0.51], 0),
        ("uniform", [0.3, 0.3, -0.3], [1 / 3, 1 / 3, 1 / 3], 1),
        ("uniform", [0.3, 0.4, -0.3], [0.75, 1.0, -0.75], 0),
        # shift: subtract a negative minimum so it becomes exactly zero
        ("shift", [-0.2, 0.3, 0.5], [0.0, 0.5 / 1.2, 0.7 / 1.2], 0),
        ("shift", [-1.0, -2.0, -3.0], [2 / 3, 1 / 3, 0.0], 0),
        ("shift", [0.2, 0.3, 0.5], [0.2, 0.3, 0.5], 0),
        ("shift", [-1.0, -1.0], [0.5, 0.5], 1),
        ("shift", [0.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], 1),
        # clamp: negative coefficients become zero
        ("clamp", [-0.2, 0.3, 0.5], [0.0, 0.375, 0.625], 0),
        ("clamp", [-0.2, -0.3, -0.5], [1 / 3, 1 / 3, 1 / 3], 1),
        ("clamp", [0.0, 0.0], [0.5, 0.5], 1),
    ],
)
def test_guard_cases(guard, c, expected, hits):
    out, got_hits = normalize_coefficients(t(c), guard)
    close(out, expected, rtol=1e-6, atol=1e-7)
    assert int(got_hits) == hits


def test_uniform_guard_near_zero_sum_falls_back():
    c = torch.tensor([1.0, -1.0 + 1e-9, 0.0], dtype=torch.float64)
    out, hits = normalize_coefficients(c, "uniform")
    assert int(hits) == 1
    close(out, [1 / 3, 1 / 3, 1 / 3], atol=1e-12)


def test_guard_hit_count_counts_rows():
    c = t([[0.2, 0.3, 0.5], [-1.0, -1.0, 0.5], [0.0, 0.0, 0.0], [1.0, 1.0, 2.0]])
    out, hits = normalize_coefficients(c, "uniform")
    assert int(hits) == 2
    close(out, [[0.2, 0.3, 0.5], [1 / 3] * 3, [1 / 3] * 3, [0.25, 0.25, 0.5]],
          rtol=1e-6, atol=1e-7)
    for r in range(4):  # rows are independent problems
        row, _ = normalize_coefficients(c[r], "uniform")
        close(out[r], row.double().numpy(), atol=0, rtol=0)


def test_unknown_guard_rejected():
    with pytest.raises(ValueError, match="guard"):
        normalize_coefficients(t([0.5, 0.5]), "median")


# ---------------------------------------------------------------------------------------
# Properties of the aggregated direction
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.0, 0.99])
@pytest.mark.parametrize("n_workers", [2, 3, 4, 8])
def test_equal_gradients_give_normalised_mean(beta, n_workers):
    rng = np.random.default_rng(n_workers)
    m = None
    # warm the momentum up on disagreeing workers so it is not uniform any more
    for _ in range(3):
        _, _, m = acga_combine(t(make_grads(rng, n_workers, noise=3.0)), m, beta)
    g = rng.standard_normal(40) * 5.0
    G = np.tile(g, (n_workers, 1))
    d, c, _ = acga_combine(t(G), m, beta)
    close(d, g / np.linalg.norm(g), rtol=1e-5, atol=1e-6)
    assert float(d.norm()) == pytest.approx(1.0, abs=1e-5)
    assert float(c.sum()) == pytest.approx(1.0, abs=1e-6)
    if beta == 0.0:
        close(c, np.full(n_workers, 1.0 / n_workers), atol=1e-6)


@pytest.mark.parametrize("n_workers", [2, 3, 5, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_beta_zero_closed_form(n_workers, seed):
    rng = np.random.default_rng(seed + 17 * n_workers)
    G = make_grads(rng, n_workers)
    mean_g = G.mean(axis=0)
    norms = np.linalg.norm(G, axis=1)
    U = (G / norms[:, None]).T                                 # D x N unit columns
    weights = (G @ mean_g) / norms                             # <g_i, mean g> / ||g_i||
    c_expected = weights / weights.sum()
    d_expected = U @ c_expected                                # sum_i c_i g_i / ||g_i||
    np.testing.assert_allclose(d_expected, U @ (U.T @ mean_g) / weights.sum(), rtol=1e-10)
    # beta = 0: any momentum fed in is ignored
    stale = t(np.sort(rng.standard_normal(n_workers)))
    for m in (None, stale):
        d, c, m_new = acga_combine(t(G), m, 0.0)
        close(c, c_expected)
        close(d, d_expected)
        close(m_new, np.sort(weights))  # <g_i, mean g> / ||g_i||, sorted


@pytest.mark.parametrize("guard", ["shift", "clamp", "uniform"])
@pytest.mark.parametrize("seed", range(4))
def test_norm_at_most_one_with_nonnegative_coefficients(guard, seed):
    rng = np.random.default_rng(seed)
    m = None
    for step in range(5):
        if guard == "uniform":
            G = make_grads(rng, 6, noise=0.3)  # aligned workers: all a_i > 0
        else:
            G = rng.standard_normal((6, 30)) * 100.0  # disagreeing, large gradients
        d, c, m = acga_combine(t(G), m, 0.9, guard=guard)
        assert float(c.min()) >= 0.0, (step, c)
        assert float(c.sum()) == pytest.approx(1.0, abs=1e-6)
        assert float(d.norm()) <= 1.0 + 1e-6
        # and it is not trivially small: a convex combination of unit vectors
        assert float(d.norm()) > 0.0


# ---------------------------------------------------------------------------------------
# ||d|| <= 1 in every case: nearly opposite workers, adversarial gradient sets
# ---------------------------------------------------------------------------------------

GUARDS = ["uniform", "shift", "clamp"]


def two_workers(n1: float, n2: float, cos: float, dim: int = 8) -> np.ndarray:
    """Gradients of norms n1, n2 with cosine ``cos``, exactly float32, in float64."""
    u1 = np.zeros(dim)
    u1[0] = 1.0
    u2 = np.zeros(dim)
    u2[0], u2[1] = cos, np.sqrt(1.0 - cos * cos)
    return np.stack([n1 * u1, n2 * u2]).astype(np.float32).astype(np.float64)


def nearly_cancelling_pair() -> np.ndarray:
    """Two nearly opposite workers whose consensus coefficients are (0.5, -0.4999):
    a = (n1 + n2 cos, n1 cos + n2) / 2 solved for the norms at cos = -0.9999."""
    cos = -0.9999
    det = 1.0 - cos * cos
    n1 = (1.0 + 0.9998 * cos) / det
    n2 = (-0.9998 - cos) / det
    return two_workers(n1, n2, cos)


def unguarded_norm(G: np.ndarray) -> float:
    """||d|| of the previous formula at beta = 0: c = a / sum(a), no fallback, no limit."""
    n = np.linalg.norm(G, axis=1)
    a = G @ G.sum(axis=0) / (len(G) * (n + EPS))
    c = a / a.sum()
    return float(np.linalg.norm((c / (n + EPS)) @ G))


def test_nearly_cancelling_pair_falls_back_to_the_mean_direction():
    G = nearly_cancelling_pair()
    a = np_acga_step(G, None, 0.0)[3]
    np.testing.assert_allclose(a, [0.5, -0.4999], atol=2e-5)  # the case as built
    assert unguarded_norm(G) > 1000.0  # what c / sum(c) gave: ||d|| far above 1
    u = G / np.linalg.norm(G, axis=1, keepdims=True)
    for guard in GUARDS:
        d, c, _ = acga_combine(t(G), None, 0.0, guard=guard)
        if guard == "uniform":  # fallback: normalised averaging
            close(c, [0.5, 0.5], atol=0)
            close(d, u.mean(axis=0))
        else:  # shift and clamp give c = (1, 0): the agreeing worker's direction
            close(c, [1.0, 0.0], atol=1e-7)
            close(d, u[0])
        assert float(d.norm()) <= 1.0 + 1e-6


def test_kept_negative_coefficient_is_limited_to_norm_one_keeping_its_direction():
    # a = (4.75, -2): negative mass 0.42 of the positive mass, kept by ``uniform``;
    # c = (1.727, -0.727) gives ||d|| = 2.18 before the limit
    G = two_workers(10.0, 1.0, -0.5)
    d_ref, c_ref, _, a, _, hits = np_acga_step(G, None, 0.0)
    np.testing.assert_allclose(a, [4.75, -2.0], rtol=1e-6)
    assert hits == 0 and unguarded_norm(G) > 2.0
    d, c, _ = acga_combine(t(G), None, 0.0)
    close(c, [4.75 / 2.75, -2.0 / 2.75])
    close(d, d_ref)
    assert float(d.norm()) == pytest.approx(1.0, abs=1e-6)
    u = G / np.linalg.norm(G, axis=1, keepdims=True)
    raw = (4.75 * u[0] - 2.0 * u[1]) / 2.75
    close(d, raw / np.linalg.norm(raw))  # same direction as the paper's d


def test_four_nearly_opposite_workers():
    # two agreeing pairs pointing nearly opposite ways, one pair slightly stronger
    rng = np.random.default_rng(31)
    v = rng.standard_normal(24)
    G = np.stack([v, 1.01 * v, -v, -1.02 * v]) + 1e-3 * rng.standard_normal((4, 24))
    G = G.astype(np.float32).astype(np.float64)
    assert unguarded_norm(G) > 10.0
    for guard in GUARDS:
        d_ref, c_ref, _, _, _, _ = np_acga_step(G, None, 0.0, guard=guard)
        d, c, _ = acga_combine(t(G), None, 0.0, guard=guard)
        close(c, c_ref, rtol=1e-4, atol=1e-5)
        close(d, d_ref, rtol=1e-4, atol=1e-5)
        assert float(d.norm()) <= 1.0 + 1e-6


def adversarial_sets(rng: np.random.Generator, n: int, dim: int, ties: bool = True):
    """Gradient sets where coefficients nearly cancel or change sign between steps.
    ``ties=False`` leaves out the (nearly) parallel and rank-2 sets, whose consensus
    values tie within fp32 rounding (the sort order, hence the coefficients, is then not
    comparable with a float64 oracle)."""
    if ties:  # nearly parallel or opposite workers
        v = rng.standard_normal(dim)
        signs = rng.choice([-1.0, 1.0], size=(n, 1))
        yield signs * v * rng.uniform(0.5, 2.0, (n, 1)) + 1e-3 * rng.standard_normal((n, dim))
    G = rng.standard_normal((n, dim)) * rng.uniform(1e-3, 1e3, (n, 1))
    G[0] = -G[1:].sum(axis=0) * rng.uniform(0.9, 1.1)  # one worker opposing the rest
    yield G
    if ties:
        yield rng.standard_normal((n, 2))[:, rng.integers(0, 2, dim)]  # rank-2 sets
    yield rng.standard_normal((n, dim)) ** 3  # heavy tails
    G = rng.standard_normal((n, dim))
    G[rng.integers(0, n)] = 0.0  # a zero worker
    yield G


@pytest.mark.parametrize("per_layer", [False, True], ids=["whole", "per_layer"])
@pytest.mark.parametrize("guard", GUARDS)
@pytest.mark.parametrize("n_workers", [2, 3, 4, 8])
def test_norm_at_most_one_over_many_random_and_adversarial_sets(n_workers, guard, per_layer):
    rng = np.random.default_rng(100 * n_workers + GUARDS.index(guard))
    sizes = [3, 1, 5, 7] if per_layer else None
    exceeded = 0  # sets where the previous formula gave ||d|| > 1
    for beta in (0.0, 0.9):
        m = None
        for _ in range(40):
            for G in adversarial_sets(rng, n_workers, 16):
                G = G.astype(np.float32).astype(np.float64)
                d, c, m = acga_combine(t(G), m, beta, segments=sizes, guard=guard)
                assert d.shape == (16,) and torch.isfinite(d).all()
                for seg in d.split(sizes or [16]):
                    assert float(seg.norm()) <= 1.0 + 1e-6
                close(c.sum(dim=-1), np.ones(c.shape[:-1]), atol=1e-5)
                if guard == "uniform" and not per_layer and beta == 0.0:
                    exceeded += unguarded_norm(G) > 1.0 + 1e-3
    if guard == "uniform" and not per_layer:
        assert exceeded >= 10  # the sets do exercise the bound


@pytest.mark.parametrize("per_layer", [False, True], ids=["whole", "per_layer"])
@pytest.mark.parametrize("guard", GUARDS)
def test_acga_combine_matches_oracle_on_adversarial_sets(guard, per_layer):
    rng = np.random.default_rng(7 + GUARDS.index(guard))
    sizes = [3, 2, 5, 6] if per_layer else None  # no 1-element piece: its a_i tie
    m_impl = m_ref = None
    for _ in range(4):
        for G in adversarial_sets(rng, 4, 16, ties=False):
            G = G.astype(np.float32).astype(np.float64)
            d_ref, c_ref, m_ref, _, _, _ = np_acga_step(G, m_ref, 0.5, guard=guard, sizes=sizes)
            d, c, m_impl = acga_combine(t(G), m_impl, 0.5, segments=sizes, guard=guard)
            close(m_impl, m_ref, rtol=1e-4, atol=1e-5)
            close(c, c_ref, rtol=1e-3, atol=1e-4)
            close(d, d_ref, rtol=1e-3, atol=1e-4)


def previous_formula(G: torch.Tensor, m, beta, reference_order=False):
    """The formula before the fallback rule and the norm limit, op for op."""
    g = G.float()
    s = g.sum(dim=0)
    norms = g.norm(dim=1)
    a = consensus_coefficients(g @ s, norms, g.shape[0], EPS)
    m, c = sorted_momentum(a, m, beta, reference_order)
    c = c / c.sum(dim=-1, keepdim=True)
    d = ((c / (norms + EPS))[:, None] * g).sum(dim=0)
    return d, c, m


@pytest.mark.parametrize("reference_order", [False, True])
@pytest.mark.parametrize("n_workers", [2, 3, 4, 8])
def test_agreeing_workers_give_exactly_the_previous_formula(n_workers, reference_order):
    rng = np.random.default_rng(50 + n_workers)
    m_new = m_old = None
    for _ in range(6):
        G = t(make_grads(rng, n_workers))
        d_new, c_new, m_new = acga_combine(G, m_new, 0.9, reference_order=reference_order)
        d_old, c_old, m_old = previous_formula(G, m_old, 0.9, reference_order)
        assert float(c_old.min()) > 0 and float(d_old.norm()) < 1.0  # the agreeing case
        assert torch.equal(c_new, c_old)
        assert torch.equal(m_new, m_old)
        assert torch.equal(d_new, d_old)


def test_per_layer_form_is_the_whole_form_per_piece():
    rng = np.random.default_rng(61)
    sizes = [12, 4, 20, 12]
    bounds = np.cumsum([0, *sizes])
    m = None
    m_pieces = [None] * len(sizes)
    for _ in range(4):
        G = t(make_grads(rng, 4))
        d, c, m = acga_combine(G, m, 0.9, segments=sizes)
        assert c.shape == m.shape == (4, 4)
        for l, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            d_l, c_l, m_pieces[l] = acga_combine(G[:, lo:hi], m_pieces[l], 0.9)
            assert torch.equal(d[lo:hi], d_l)
            assert torch.equal(c[l], c_l) and torch.equal(m[l], m_pieces[l])


# ---------------------------------------------------------------------------------------
# The distributed class computes what acga_combine computes (real gloo world of 4 ranks
# and a group of 2), including the fallback and the norm limit
# ---------------------------------------------------------------------------------------

WORLD_SHAPES = [(2, 3), (4,), (6,)]
WORLD_SIZES = [6, 4, 6]
WORLD_VARIANTS = {
    "uniform": {"momentum": 0.0},
    "shift": {"momentum": 0.0, "guard": "shift"},
    "clamp": {"momentum": 0.0, "guard": "clamp"},
    "momentum": {"momentum": 0.9},
    "layer_uniform": {"momentum": 0.9, "per_layer": True},
    "layer_shift": {"momentum": 0.9, "per_layer": True, "guard": "shift"},
    "layer_clamp": {"momentum": 0.0, "per_layer": True, "guard": "clamp"},
    "mean_norm": {"momentum": 0.0, "restore_scale": "mean_norm"},
}


def world_gradients(n: int) -> list[np.ndarray]:
    """Per step, every worker's gradient (n, 16): nearly cancelling workers, a kept
    negative coefficient (N = 2; everything in the first tensor, the others zero),
    adversarial sets, and agreeing workers."""
    rng = np.random.default_rng(70 + n)
    if n == 2:
        first = [np.pad(nearly_cancelling_pair(), ((0, 0), (0, 8))),
                 np.pad(two_workers(10.0, 1.0, -0.5), ((0, 0), (0, 8)))]
    else:
        v = rng.standard_normal(16)
        first = [np.stack([v, 1.01 * v, -v, -1.02 * v]) + 1e-3 * rng.standard_normal((4, 16))]
    steps = first + list(adversarial_sets(rng, n, 16, ties=False)) + [make_grads(rng, n, 16)]
    return [G.astype(np.float32).astype(np.float64) for G in steps]


def _acga_world(rank, world):
    pair = dist.new_group([0, 2])  # collective: every rank
    out = {}
    for gname, group, members in (("n4", None, [0, 1, 2, 3]), ("n2", pair, [0, 2])):
        if rank not in members:
            continue
        grank = members.index(rank)
        steps = world_gradients(len(members))
        for variant, hp in WORLD_VARIANTS.items():
            params = [torch.nn.Parameter(torch.zeros(s)) for s in WORLD_SHAPES]
            agg = accord.build("acga", params, group=group, **hp)
            trace = []
            for step, G in enumerate(steps):
                grads = torch.tensor(G[grank], dtype=torch.float32).split(WORLD_SIZES)
                for p, v in zip(params, grads, strict=True):
                    p.grad = v.view_as(p).clone()
                agg.after_backward(accord.StepContext(step=step))
                trace.append(torch.cat([p.grad.reshape(-1) for p in params]))
            out[(gname, variant)] = (trace, agg.metrics())
    return out


@pytest.fixture(scope="module")
def acga_world():
    per_rank = run_world(_acga_world, 4)
    return {"n4": per_rank, "n2": [per_rank[0], per_rank[2]]}


@pytest.mark.parametrize("variant", WORLD_VARIANTS)
@pytest.mark.parametrize("gname", ["n2", "n4"])
def test_world_matches_acga_combine_and_keeps_norm_at_most_one(acga_world, gname, variant):
    ranks = acga_world[gname]
    hp = {**accord.algorithms.validate("acga", {}), **WORLD_VARIANTS[variant]}
    sizes = WORLD_SIZES if hp["per_layer"] else None
    m = None
    for step, G in enumerate(world_gradients(len(ranks))):
        got = ranks[0][(gname, variant)][0][step]
        for r in ranks[1:]:
            assert torch.equal(r[(gname, variant)][0][step], got), (step, r)
        d, _, m = acga_combine(t(G), m, hp["momentum"], segments=sizes, guard=hp["guard"])
        if hp["restore_scale"] == "mean_norm":
            scale = float(np.linalg.norm(G, axis=1).mean())
            close(got / scale, d.double().numpy(), rtol=1e-4, atol=1e-5)
            got = got / scale  # the bound holds before the rescaling
        else:
            close(got, d.double().numpy(), rtol=1e-4, atol=1e-5)
        for seg in got.split(sizes or [16]):
            assert float(seg.norm()) <= 1.0 + 1e-6, (step, variant)
    metrics = ranks[0][(gname, variant)][1]
    if hp["guard"] == "uniform":
        assert metrics["guard_hits"] >= 1  # the nearly cancelling step fell back
