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

from accord.comm import Communicator, compress_payloads
from accord.comm.compress import (
    BLOCK,
    LEVELS,
    UNIT_ROUNDOFF,
    Compressor,
    coded_bytes,
    decode,
    encode,
    error_bound,
    matrix_shape,
    powersgd_compresses,
    topk_shape,
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


def _gather1(x: torch.Tensor) -> torch.Tensor:
    """The all-gather of a world of one: this rank's row."""
    return x.view(1, -1)


def _reduce1(c: Compressor, x: torch.Tensor, key: str = "k", op: str = "avg") -> int:
    return c.all_reduce_(x, _identity, gather=_gather1, op=op, world_size=1, key=key)


@pytest.mark.parametrize("scheme", ["powersgd", "fp16", "int8", "int4", "topk"])
def test_state_dict_resumes_identically(scheme):
    xs = [torch.randn(900, generator=torch.Generator().manual_seed(10 + i)) * 1e-3
          for i in range(5)]
    a = Compressor(scheme, rank=2)
    for x in xs[:3]:
        _reduce1(a, x.clone())
    b = Compressor(scheme, rank=2, seed=99)  # the seed comes from the checkpoint
    b.load_state_dict(_save_load(a.state_dict()))
    for x in xs[3:]:
        ya, yb = x.clone(), x.clone()
        _reduce1(a, ya)
        _reduce1(b, yb)
        assert torch.equal(ya, yb)
        if scheme != "fp16":
            assert torch.equal(a.error_memory("k"), b.error_memory("k"))
    fresh = Compressor(scheme, rank=2)
    y = xs[3].clone()
    _reduce1(fresh, y)
    ya = xs[3].clone()
    _reduce1(a, ya)
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
        Compressor("gzip")
    with pytest.raises(ValueError, match="rank"):
        Compressor("fp16").load_state_dict(Compressor("fp16", rank=8).state_dict())
    with pytest.raises(ValueError, match="fraction"):
        Compressor("topk").load_state_dict(Compressor("topk", fraction=0.5).state_dict())
    with pytest.raises(ValueError, match="gather primitive"):
        Compressor("int8").all_reduce_(torch.randn(900), _identity, world_size=1)
    assert Compressor.from_spec("powersgd:8").rank == 8
    assert Compressor.from_spec("bf16").scheme == "bf16"
    assert Compressor.from_spec("topk:0.02").fraction == 0.02
    assert Compressor.from_spec("topk").fraction == 1 / 64
    for bad in ("fp16:2", "topk:0", "topk:1.5", "topk:nan", "int8:2", "powersgd:0.5"):
        with pytest.raises(ValueError, match="compress"):
            Compressor.from_spec(bad)
    # a checkpoint written before topk existed (no fraction) still loads
    old = Compressor("int8").state_dict()
    del old["fraction"]
    Compressor("int8").load_state_dict(old)


# -- int8, int4, topk: the codecs, in a world of one -------------------------------------
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("n", [1003, 128, 5])
def test_block_codec_round_trip_within_half_a_scale(scheme, n):
    v = _spread(n, seed=20 + n, low=-4.0, high=1.0)
    buf = encode(scheme, v)
    assert buf.dtype == torch.uint8
    blocks = math.ceil(n / BLOCK)
    codes = n if scheme == "int8" else math.ceil(n / 2)
    assert buf.numel() == coded_bytes(scheme, n) == 4 * blocks + codes
    out = decode(scheme, buf, n)
    # the bound as a formula of the scale: s = max_block |v| / L, |v - s q| <= s / 2
    padded = torch.zeros(blocks * BLOCK)
    padded[:n] = v.abs()
    s = (padded.view(blocks, BLOCK).amax(dim=1) / LEVELS[scheme]).repeat_interleave(BLOCK)[:n]
    err = (out - v).abs()
    assert (err <= s / 2 * (1 + 2.0**-16)).all()
    if n > 5:
        assert (err / s).max().item() > 0.45  # nearest rounding really uses half a step
    # the largest element of each block is exact up to float rounding (its code is +-L)
    top = v.abs().argmax()
    assert err[top] <= 2.0**-22 * v.abs()[top]


def test_int4_packs_two_codes_per_byte():
    v = torch.tensor([-7.0, -1.0, 0.0, 1.0, 7.0])  # scale 1: codes are the values
    buf = encode("int4", v)
    assert buf[4:].tolist() == [(-1 + 8) << 4 | (-7 + 8), (1 + 8) << 4 | (0 + 8), 7 + 8]
    assert torch.equal(decode("int4", buf, 5), v)


@pytest.mark.parametrize("n", [10_000, 4096, 300])
def test_topk_round_trip_keeps_k_per_chunk(n):
    v = torch.randn(n, generator=torch.Generator().manual_seed(n))
    fraction = 0.02
    chunk, k = topk_shape(n, fraction)
    assert chunk == min(4096, n) and k == max(1, round(fraction * chunk))
    buf = encode("topk", v, fraction)
    chunks = math.ceil(n / chunk)
    assert buf.numel() == coded_bytes("topk", n, fraction) == chunks * (4 + 3 * k)
    out = decode("topk", buf, n, fraction=fraction)
    for c in range(chunks):
        vc, oc = v[c * chunk:(c + 1) * chunk], out[c * chunk:(c + 1) * chunk]
        kept = oc != 0
        assert int(kept.sum()) == min(k, vc.numel())
        s = vc.abs().max() / 127
        assert ((oc - vc)[kept].abs() <= s / 2 * (1 + 2.0**-16)).all()
        # the dropped entries are no larger than the smallest kept one
        kth = vc.abs().topk(min(k, vc.numel())).values[-1]
        assert (vc[~kept].abs() <= kth).all()


@pytest.mark.parametrize("scheme", ["int8", "int4", "topk"])
def test_gathered_bytes_and_determinism(scheme):
    x = torch.randn(5000, generator=torch.Generator().manual_seed(5))
    runs = []
    for _ in range(2):
        c = Compressor(scheme)
        outs = []
        for _ in range(3):
            y = x.clone()
            assert _reduce1(c, y) == coded_bytes(scheme, 5000)
            outs.append(y)
        runs.append(torch.stack(outs))
    assert torch.equal(runs[0], runs[1])
    ratio = coded_bytes(scheme, 5000) / (4 * 5000)
    assert ratio < {"int8": 0.26, "int4": 0.14, "topk": 0.02}[scheme]
    # a buffer too small to gain (one element: 4 bytes plain, 5 or 7 coded) is sent as it is
    y = torch.randn(1)
    assert _reduce1(Compressor(scheme), y) == 4


def _ef_bound(scheme: str, x: torch.Tensor) -> torch.Tensor:
    """The elementwise bound on the error memory under a fixed payload x, from the scales:
    |e| <= s / 2 with s <= (A + max|e|) / L (A: the block's max |x|), so |e| <= A / (2L - 1)."""
    levels = LEVELS[scheme]
    blocks = math.ceil(x.numel() / BLOCK)
    padded = torch.zeros(blocks * BLOCK, dtype=torch.float64)
    padded[: x.numel()] = x.abs()
    a = padded.view(blocks, BLOCK).amax(dim=1).repeat_interleave(BLOCK)[: x.numel()]
    return a / (2 * levels - 1)


@pytest.mark.parametrize("scheme", ["int8", "int4", "topk"])
def test_error_feedback_tracks_the_sum_of_a_fixed_payload(scheme):
    """200 calls on one payload: sum_k out_k = K x - e_K exactly (telescoping), and e_K
    stays within one call's error; without error feedback the gap grows with K."""
    n, steps = 3000, 200
    x = _spread(n, seed=6, low=-3.0, high=0.0)
    c, no_ef = Compressor(scheme), Compressor(scheme, error_feedback=False)
    total = torch.zeros(n, dtype=torch.float64)
    total_no = torch.zeros(n, dtype=torch.float64)
    for _ in range(steps):
        y = x.clone()
        _reduce1(c, y, op="sum")
        total += y.double()
        y = x.clone()
        _reduce1(no_ef, y, op="sum")
        total_no += y.double()
    gap = total - steps * x.double()
    error = c.error_memory("k").double()
    assert no_ef.error_memory("k") is None
    # the identity, up to float32 rounding of each call
    assert (gap + error).abs().max().item() <= 1e-5 * x.abs().max().item() * steps
    if scheme == "topk":
        # top-k keeps the k largest of c: ||v - sent||^2 <= (1 - k/c) ||v||^2 plus the
        # rounding of the kept (k s^2 / 4, s <= ||v|| / 127): a contraction q < 1, so
        # ||e|| <= q / (1 - q) ||x|| (per chunk; one chunk of 3000 here)
        chunk, k = topk_shape(n)
        q = math.sqrt(1 - k / chunk + k / (4 * 127**2))
        assert error.norm().item() <= q / (1 - q) * x.norm().item()
    else:
        assert (error.abs() <= _ef_bound(scheme, x) + 1e-6).all()
    gap_no = (total_no - steps * x.double()).norm().item()
    # without, K residuals add up (top-k's small entries take many calls to be sent, so
    # its memory is larger and the ratio smaller at K = 200)
    assert gap_no >= (10 if scheme == "topk" else 20) * gap.norm().item()


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


# -- int8, int4, topk through the Communicator, in real worlds of 2 and 3 ranks ----------
GATHERED_SPECS = ("int8", "int4", "topk:0.02")
CALLS, N_GATHERED = 4, 3000


def _payload(rank: int, call: int) -> torch.Tensor:
    return torch.randn(N_GATHERED, generator=torch.Generator().manual_seed(1000 * rank + call))


def _gathered_world(rank, world):
    out = {}
    for spec in GATHERED_SPECS:
        for op in ("avg", "sum"):
            compress_payloads(Compressor.from_spec(spec))
            try:
                comm = Communicator()
                outs = []
                for call in range(CALLS):
                    y = _payload(rank, call)
                    comm.all_reduce_(y, op=op)
                    outs.append(y)
                stats = comm.stats.ops["allreduce"]
                out[spec, op] = {"outs": outs, "bytes": stats.bytes, "calls": stats.calls}
            finally:
                compress_payloads(None)
    return out


def _oracle(spec: str, op: str, world: int) -> list[torch.Tensor]:
    """The same codec in one process: each rank's error-compensated payload encoded,
    its residual kept, every rank's decoded payload summed in float32 in rank order."""
    scheme, _, arg = spec.partition(":")
    fraction = float(arg) if arg else 1 / 64
    errors: list[torch.Tensor | None] = [None] * world
    outs = []
    for call in range(CALLS):
        total = torch.zeros(N_GATHERED)
        for w in range(world):
            v = _payload(w, call)
            if errors[w] is not None:
                v = v + errors[w]
            decoded = decode(scheme, encode(scheme, v, fraction), N_GATHERED,
                             fraction=fraction)
            errors[w] = v - decoded
            total += decoded
        outs.append(total / world if op == "avg" else total)
    return outs


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def gathered(request):
    return request.param, run_world(_gathered_world, request.param)


@pytest.mark.parametrize("op", ["avg", "sum"])
@pytest.mark.parametrize("spec", GATHERED_SPECS)
def test_gathered_allreduce_equals_the_single_process_oracle(gathered, spec, op):
    world, results = gathered
    oracle = _oracle(spec, op, world)
    scheme, _, arg = spec.partition(":")
    sent = coded_bytes(scheme, N_GATHERED, float(arg) if arg else 1 / 64)
    for r in results:
        res = r[spec, op]
        assert res["calls"] == CALLS and res["bytes"] == CALLS * sent  # counted as sent
        for got, want in zip(res["outs"], oracle, strict=True):
            assert torch.equal(got, want)  # bit for bit, on every rank
    # and close to the exact mean: within the error of one call's codes (int8: s/2 per
    # rank, s = max |v| / 127 of a block, |v| < 6 here), looser for the lossier codecs
    exact = sum(_payload(w, 0) for w in range(world)) / (world if op == "avg" else 1)
    err = (results[0][spec, op]["outs"][0] - exact).abs().max().item()
    scale = 1 if op == "avg" else world
    if scheme == "int8":
        assert err <= scale * 6 / 127 / 2
    elif scheme == "int4":
        assert err <= scale * 6 / 7 / 2
