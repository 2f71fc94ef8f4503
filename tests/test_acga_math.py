"""ACGA / AdaCons maths checked against an independent float64 NumPy oracle.

The oracle below is written from the pseudo-code of the spec (shared/specs/algorithms.md,
section 1 (c)); it deliberately does not call any accord function. No process group is
needed: the pure functions at the top of ``accord.algorithms.acga`` are tested directly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

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

def np_normalize(c: np.ndarray, guard: str = "uniform", tol: float = 1e-6):
    """Row-wise: apply the guard, then divide by the sum; 1/N for a (near) non-positive sum.

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
        total = row.sum()
        if total <= tol * np.abs(row).sum():
            out[r] = 1.0 / row.size
            hits += 1
        else:
            out[r] = row / total
    return out.reshape(c.shape), hits


def np_acga_step(G, m, beta, reference_order=False, guard="uniform", eps=EPS):
    """One ACGA step on stacked gradients G (N, D). Returns (d, c, m_new, a, perm, hits)."""
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
    c, hits = np_normalize(c, guard)
    w = c / (n + eps)
    d = (w[:, None] * G).sum(axis=0)                     # C3: allreduce-sum
    return d, c, m_new, a, perm, hits


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
    assert hits == expected_hits
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
    assert got_hits == hits


def test_uniform_guard_near_zero_sum_falls_back():
    c = torch.tensor([1.0, -1.0 + 1e-9, 0.0], dtype=torch.float64)
    out, hits = normalize_coefficients(c, "uniform")
    assert hits == 1
    close(out, [1 / 3, 1 / 3, 1 / 3], atol=1e-12)


def test_guard_hit_count_counts_rows():
    c = t([[0.2, 0.3, 0.5], [-1.0, -1.0, 0.5], [0.0, 0.0, 0.0], [1.0, 1.0, 2.0]])
    out, hits = normalize_coefficients(c, "uniform")
    assert hits == 2
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
