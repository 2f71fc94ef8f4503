"""Payload compression: half-width casts within their stated error bound, fp16's overflow
guard, PowerSGD (exact on low-rank payloads, power iteration to the best rank-r
approximation, error feedback's telescoping identity), bytes as sent, checkpointable state.

World-1 tests use the identity as the reducer (a SUM over one rank); the rest run in one
real gloo world of 3 ranks whose results several tests share.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.distributed as dist
from worlds import run_world

from accord.compress import (
    UNIT_ROUNDOFF,
    Compressor,
    error_bound,
    matrix_shape,
    powersgd_compresses,
)

WORLD = 3
K = 50


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _spread(n: int, seed: int, low: float = -3.0, high: float = 3.0) -> torch.Tensor:
    """Values of both signs with magnitudes spread over 10^low .. 10^high."""
    g = torch.Generator().manual_seed(seed)
    exps = torch.empty(n).uniform_(low, high, generator=g)
    signs = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    return signs * 10.0**exps


# -- world of one ------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["bf16", "fp16"])
def test_round_trip_within_unit_roundoff(scheme):
    x = _spread(10_000, seed=1)
    y = x.clone()
    sent = Compressor(scheme).all_reduce_(y, _identity, op="sum", world_size=1, key="g")
    assert sent == x.numel() * 2
    rel = ((y - x).abs() / x.abs()).max().item()
    u = UNIT_ROUNDOFF[scheme]
    assert rel <= u
    assert rel > u / 4  # really rounded to 16 bits, not passed through


def test_fp16_beyond_range_falls_back_to_fp32_then_rescales():
    x = _spread(1000, seed=2)
    x[::7] = 1.0e5  # above 65504: the cast alone would give inf
    c = Compressor("fp16")
    y = x.clone()
    sent = c.all_reduce_(y, _identity, op="sum", world_size=1, key="g")
    assert sent == 1000 * 2 + 1000 * 4  # the fp16 attempt and the fp32 redo
    assert torch.equal(y, x)  # the fp32 result, exact here
    # the next call of this site is scaled below the range and stays 16-bit: the result's
    # peak 1e5 goes to at most 2^(15 - 4), headroom 4 + log2(1)
    scale = c.fp16_scale("g")
    assert scale == 2.0**-6
    y = x.clone()
    assert c.all_reduce_(y, _identity, op="sum", world_size=1, key="g") == 1000 * 2
    assert torch.isfinite(y).all()
    assert ((y - x).abs() <= error_bound("fp16", x.abs(), 1, scale)).all()
    # a jump past a calibrated scale: fp32 for that call, 4 more binades of headroom after
    sent = [c.all_reduce_(x.clone() * 1e3, _identity, world_size=1, key="g") for _ in range(2)]
    assert sent == [1000 * 6, 1000 * 2]
    assert c.fp16_scale("g") == 2.0 ** math.floor(math.log2(2.0**7 / 1e8))


def test_fp16_scale_rescues_tiny_values():
    x = _spread(1000, seed=3, low=-8.0, high=-7.0)  # below fp16's normal range (6.1e-5)
    c = Compressor("fp16")
    first, second = x.clone(), x.clone()
    c.all_reduce_(first, _identity, op="avg", world_size=1, key="g")
    c.all_reduce_(second, _identity, op="avg", world_size=1, key="g")
    rel_first = ((first - x).abs() / x.abs()).max().item()
    rel_second = ((second - x).abs() / x.abs()).max().item()
    assert rel_first > 0.05  # unscaled: subnormal spacing 6e-8 against values ~1e-8..1e-7
    assert c.fp16_scale("g") > 2.0**30
    assert rel_second <= UNIT_ROUNDOFF["fp16"]


def test_matrix_shape_and_what_powersgd_leaves_alone():
    assert matrix_shape(1600) == (40, 40)
    assert matrix_shape(1100) == (33, 34)  # 34 = ceil(sqrt(1100)), 33 * 34 >= 1100
    assert matrix_shape(1) == (1, 1)
    assert not powersgd_compresses(30, 4)  # 5 x 6: (5 + 6) * 4 = 44 >= 30
    assert powersgd_compresses(900, 4)  # (30 + 30) * 4 = 240 < 900
    x = torch.randn(30)
    y = x.clone()
    sent = Compressor("powersgd").all_reduce_(y, _identity, op="avg", world_size=1, key="s")
    assert sent == 30 * 4 and torch.equal(y, x)


def test_powersgd_bytes_on_a_padded_buffer():
    x = torch.randn(1100)
    sent = Compressor("powersgd", rank=4).all_reduce_(x, _identity, world_size=1, key="b")
    assert sent == (33 + 34) * 4 * 4


def test_powersgd_warm_start_converges_to_best_rank_r_approximation():
    # M = U diag(s) V^T with a gap after the 4th singular value: warm-started power
    # iteration reaches Eckart-Young's optimum ||M - M_4||_F = sqrt(sum_{i>4} s_i^2)
    g = torch.Generator().manual_seed(4)
    u, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    s = torch.cat([torch.tensor([10.0, 8.0, 6.0, 5.0]), torch.linspace(0.6, 0.01, 36)])
    m = ((u * s.double()) @ v.T).float().reshape(-1)
    optimum = s[4:].norm().item()
    c = Compressor("powersgd", rank=4, error_feedback=False)
    errors = []
    for _ in range(6):
        out = m.clone()
        c.all_reduce_(out, _identity, op="avg", world_size=1, key="m")
        errors.append((out - m).norm().item())
    assert errors[0] > optimum * 1.01  # one iteration from a random Q is not there yet
    assert errors[-1] == pytest.approx(optimum, rel=1e-4)
    assert all(e >= optimum * (1 - 1e-5) for e in errors)


def _save_load(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    return torch.load(io.BytesIO(buf.getvalue()), weights_only=False)


@pytest.mark.parametrize("scheme", ["powersgd", "fp16"])
def test_state_dict_resumes_identically(scheme):
    xs = [torch.randn(900, generator=torch.Generator().manual_seed(10 + i)) * 1e-3
          for i in range(5)]
    a = Compressor(scheme, rank=2)
    for x in xs[:3]:
        a.all_reduce_(x.clone(), _identity, op="avg", world_size=1, key="k")
    b = Compressor(scheme, rank=2, seed=99)  # the seed comes from the checkpoint
    b.load_state_dict(_save_load(a.state_dict()))
    for x in xs[3:]:
        ya, yb = x.clone(), x.clone()
        a.all_reduce_(ya, _identity, op="avg", world_size=1, key="k")
        b.all_reduce_(yb, _identity, op="avg", world_size=1, key="k")
        assert torch.equal(ya, yb)
    fresh = Compressor(scheme, rank=2)
    y = xs[3].clone()
    fresh.all_reduce_(y, _identity, op="avg", world_size=1, key="k")
    ya = xs[3].clone()
    a.all_reduce_(ya, _identity, op="avg", world_size=1, key="k")
    assert not torch.equal(y, ya)  # the state mattered


def test_bad_inputs():
    c = Compressor("powersgd")
    with pytest.raises(ValueError, match="op"):
        c.all_reduce_(torch.randn(900), _identity, op="max", world_size=1)
    with pytest.raises(ValueError, match="floating"):
        c.all_reduce_(torch.ones(900, dtype=torch.int64), _identity, world_size=1)
    c.all_reduce_(torch.randn(900), _identity, world_size=1, key="k")
    with pytest.raises(ValueError, match="one key per buffer"):
        c.all_reduce_(torch.randn(1000), _identity, world_size=1, key="k")
    with pytest.raises(ValueError, match="scheme"):
        Compressor("topk")
    with pytest.raises(ValueError, match="rank"):
        Compressor("fp16").load_state_dict(Compressor("fp16", rank=8).state_dict())
    assert Compressor.from_spec("powersgd:8").rank == 8
    assert Compressor.from_spec("bf16").scheme == "bf16"
    with pytest.raises(ValueError, match="compress"):
        Compressor.from_spec("fp16:2")


# -- a real world of 3 ranks -------------------------------------------------------------
def _reduce(x: torch.Tensor) -> None:
    dist.all_reduce(x)


def _exact_sum(x: torch.Tensor) -> torch.Tensor:
    y = x.to(torch.float64, copy=True)
    dist.all_reduce(y)
    return y


def _world(rank, world):
    out = {}
    n = 4096
    # half-width sums and averages of values spread over six decades
    for scheme in ("bf16", "fp16"):
        for op in ("sum", "avg"):
            x = _spread(n, seed=100 + rank)
            y = x.clone()
            sent = Compressor(scheme).all_reduce_(y, _reduce, op=op, world_size=world, key="h")
            payload = x.double() / (world if op == "avg" else 1)
            out[f"{scheme}_{op}"] = {"out": y, "sent": sent, "exact": _exact_sum(payload),
                                     "abs_sum": _exact_sum(payload.abs())}

    # fp16 sum: every value < 65504, the sum of three 30000s is not
    x = _spread(n, seed=200 + rank)
    x[::5] = 30000.0
    c = Compressor("fp16")
    calls = []
    for _ in range(2):
        scale = c.fp16_scale("o")
        y = x.clone()
        sent = c.all_reduce_(y, _reduce, op="sum", world_size=world, key="o")
        calls.append({"out": y, "sent": sent, "scale": scale})
    out["fp16_overflow"] = {"calls": calls, "exact": _exact_sum(x.double()),
                            "abs_sum": _exact_sum(x.double().abs())}

    # PowerSGD on exactly rank-4 payloads sharing their column space: M_w = A B_w^T
    a = torch.randn(40, 4, generator=torch.Generator().manual_seed(7))
    b = torch.randn(40, 4, generator=torch.Generator().manual_seed(300 + rank))
    m = (a @ b.T).reshape(-1)
    c = Compressor("powersgd", rank=4)
    low = []
    for _ in range(3):
        y = m.clone()
        sent = c.all_reduce_(y, _reduce, op="avg", world_size=world, key="low")
        low.append({"out": y, "sent": sent, "error": c.error_memory("low").norm().item()})
    out["low_rank"] = {"calls": low, "mean": (_exact_sum(m.double()) / world).float()}

    # error feedback over K steps of random gradients, with and without it
    gen = torch.Generator().manual_seed(400 + rank)
    ef = Compressor("powersgd", rank=2)
    no_ef = Compressor("powersgd", rank=2, error_feedback=False)
    s_true = torch.zeros(900, dtype=torch.float64)
    s_ef = torch.zeros(900, dtype=torch.float64)
    s_no = torch.zeros(900, dtype=torch.float64)
    gaps_ef, gaps_no, sents = [], [], []
    for _ in range(K):
        g = torch.randn(900, generator=gen)
        s_true += _exact_sum(g.double()) / world
        y = g.clone()
        sents.append(ef.all_reduce_(y, _reduce, op="avg", world_size=world, key="ef"))
        s_ef += y.double()
        y = g.clone()
        no_ef.all_reduce_(y, _reduce, op="avg", world_size=world, key="ef")
        s_no += y.double()
        gaps_ef.append((s_true - s_ef).norm().item())
        gaps_no.append((s_true - s_no).norm().item())
    out["ef"] = {"gap": (s_true - s_ef).float(), "mean_error":
                 (_exact_sum(ef.error_memory("ef").double()) / world).float(),
                 "gaps_ef": gaps_ef, "gaps_no": gaps_no, "sents": sents, "last": y,
                 "grad_norm": math.sqrt(900 / world)}
    return out


@pytest.fixture(scope="module")
def results():
    return run_world(_world, WORLD)


def _same_on_every_rank(results, pick):
    first = pick(results[0])
    for r in results[1:]:
        assert (pick(r) - first).abs().max().item() == 0


@pytest.mark.parametrize("name", ["bf16_sum", "bf16_avg", "fp16_sum", "fp16_avg"])
def test_half_reductions_within_the_stated_bound(results, name):
    scheme = name.split("_")[0]
    res = results[0][name]
    assert res["sent"] == 4096 * 2
    err = (res["out"].double() - res["exact"]).abs()
    bound = error_bound(scheme, res["abs_sum"], WORLD)
    assert (err <= bound).all()
    # the bound is not vacuous: the worst element uses a good part of it
    assert (err / bound).max().item() > 0.1
    _same_on_every_rank(results, lambda r: r[name]["out"])


def test_fp16_sum_past_65504_is_never_inf(results):
    res = results[0]["fp16_overflow"]
    first, second = res["calls"]
    assert first["sent"] == 4096 * (2 + 4)  # fell back to fp32 for that call
    assert torch.isfinite(first["out"]).all()
    # a float32 sum of three float32 values: within gamma_2 (u = 2^-24) of sum |x_w|
    err = (first["out"].double() - res["exact"]).abs()
    assert (err <= 3 * 2.0**-24 * res["abs_sum"]).all()
    assert first["out"][::5].eq(90000.0).all()
    # the next call is scaled below the range, stays 16-bit and within the bound
    # headroom 4 + ceil(log2 3) = 6: the peak 90000 goes to at most 2^9
    assert second["sent"] == 4096 * 2 and second["scale"] == 2.0**-8
    assert torch.isfinite(second["out"]).all()
    err = (second["out"].double() - res["exact"]).abs()
    assert (err <= error_bound("fp16", res["abs_sum"], WORLD, second["scale"])).all()
    _same_on_every_rank(results, lambda r: r["fp16_overflow"]["calls"][1]["out"])


def test_powersgd_reproduces_low_rank_payloads(results):
    res = results[0]["low_rank"]
    scale = res["mean"].abs().max().item()
    for call in res["calls"]:
        assert call["sent"] == (40 + 40) * 4 * 4
        assert (call["out"] - res["mean"]).abs().max().item() <= 1e-5 * scale
        assert call["error"] <= 1e-4 * scale  # the error memory is rounding only
    for k in range(3):
        _same_on_every_rank(results, lambda r, k=k: r["low_rank"]["calls"][k]["out"])


def test_error_feedback_telescopes_and_stays_bounded(results):
    res = results[0]["ef"]
    assert res["sents"] == [(30 + 30) * 2 * 4] * K
    # sum_k true_k - sum_k out_k == mean_w e_wK, exactly up to float rounding
    assert torch.allclose(res["gap"], res["mean_error"], rtol=0, atol=1e-4)
    gaps_ef, gaps_no = res["gaps_ef"], res["gaps_no"]
    # with error feedback the gap is a memory: it does not grow from step 10 to step 50
    assert max(gaps_ef[9:]) <= 1.5 * max(gaps_ef[:10])
    # without, it is a sum of residuals: a random walk that keeps growing
    assert gaps_no[-1] >= 1.8 * gaps_no[9]
    assert gaps_no[-1] >= 2.0 * gaps_ef[-1]
    _same_on_every_rank(results, lambda r: r["ef"]["last"])
    _same_on_every_rank(results, lambda r: r["ef"]["gap"])
