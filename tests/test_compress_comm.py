"""--compress at the Communicator: every algorithm whose payload is a sum/avg allreduce
trains with bf16, fp16 and PowerSGD (bytes counted as sent), the maths that must stay exact
does (ACGA's sum for its coefficients, normalised averaging's mean norm), and the others
are refused before any worker starts."""

from __future__ import annotations

import math

import pytest
import torch
from worlds import run_world

import accord
from accord import comm as comm_mod
from accord.algorithms import REGISTRY
from accord.comm.compress import GRADIENT_SCHEMES, Compressor, coded_bytes
from accord.run.config import ConfigError, TrainConfig
from accord.run.validation import validate

# the built-in algorithms by what each class declares (tests/test_plugins.py pins them)
BUILTIN = {n: c for n, c in REGISTRY.items() if c.__module__.startswith("accord.")}
COMPRESSIBLE = tuple(sorted(n for n, c in BUILTIN.items() if c.compressible))
LOW_RANK = tuple(sorted(n for n, c in BUILTIN.items() if c.low_rank))

HP = {"local_sgd": {"period": 2}, "easgd": {"period": 2}, "diloco": {"period": 2},
      "grawa": {"period": 2}, "wagma": {"period": 2},
      "streaming_diloco": {"period": 4, "fragments": 2, "delay": 0},
      # the route whose allreduces the compressor acts on (with a compressor set, the
      # default auto takes it on this model; without, it all-gathers the gradient)
      "acga": {"coefficients": "exact"}}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))


def _train(algo: str, rank: int, scheme: str | None, steps: int = 6, hp: dict | None = None):
    comm_mod.compress_payloads(None if scheme is None else Compressor.from_spec(scheme))
    try:
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        agg = accord.build(algo, model.parameters(), **(HP.get(algo, {}) if hp is None else hp))
        gen = torch.Generator().manual_seed(rank)
        for step in range(steps):
            x, y = torch.randn(16, 32, generator=gen), torch.randint(4, (16,), generator=gen)
            opt.zero_grad(set_to_none=False)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            ctx = accord.StepContext(step=step, loss=loss.detach())
            agg.after_backward(ctx)
            opt.step()
            agg.after_step(ctx)
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        sent = {k: v.bytes for k, v in agg.comm.stats.ops.items()}
        agg.close()
        return flat, sent
    finally:
        comm_mod.compress_payloads(None)


#: the schemes whose payload must be a gradient (refused for parameter averages)
GRADIENT = GRADIENT_SCHEMES
assert GRADIENT == ("powersgd", "int8", "int4", "topk")


def _schemes(algo: str) -> tuple[str, ...]:
    return ("bf16", "fp16", *(GRADIENT if algo in LOW_RANK else ()))


def _every_algorithm(rank: int, world: int) -> dict:
    out = {}
    for algo in COMPRESSIBLE:
        for scheme in (None, *_schemes(algo)):
            out[algo, scheme] = _train(algo, rank, scheme)
    for scheme in ("int8", "topk"):  # local SGD's change = DiLoCo's outer gradient
        out["diloco-lr1", scheme] = _train("diloco", rank, scheme, hp={
            "period": 2, "outer_lr": 1.0, "outer_momentum": 0.0, "nesterov": False})
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_world(_every_algorithm, 2)


N_PARAMS = 32 * 64 + 64 + 64 * 4 + 4  # 2,436


@pytest.mark.parametrize("algo", COMPRESSIBLE)
def test_every_compressible_algorithm_trains_and_sends_less(ranks, algo):
    for scheme in _schemes(algo):
        flat, sent = ranks[0][algo, scheme]
        exact, exact_sent = ranks[0][algo, None]
        assert torch.isfinite(flat).all()
        # close to the uncompressed run after 6 steps (lossy, but not wrong)
        rel = float((flat - exact).norm() / exact.norm())
        assert rel < (0.02 if scheme in ("bf16", "fp16", "int8") else 0.2), (scheme, rel)
        assert sum(sent.values()) < sum(exact_sent.values()), (scheme, sent, exact_sent)
        if algo in ("allreduce", "local_sgd", "diloco", "easgd") and scheme == "bf16":
            # every allreduce payload compressed: half the bytes (the initial broadcast of
            # the model stays exact)
            assert sent["allreduce"] * 2 == exact_sent["allreduce"]
            assert sent["initial_broadcast"] == exact_sent["initial_broadcast"]
        if algo in ("allreduce", "diloco", "local_sgd") and scheme in ("int8", "int4", "topk"):
            # every model-size allreduce sent as its codes (4 bytes per element uncompressed)
            calls = exact_sent["allreduce"] // (4 * N_PARAMS)
            assert sent["allreduce"] == calls * coded_bytes(scheme, N_PARAMS)
            assert sent["initial_broadcast"] == exact_sent["initial_broadcast"]


def test_acga_keeps_its_coefficient_sum_exact(ranks):
    """ACGA's s = sum_j g_j (its coefficients come from it) is sent in full precision; only
    the aggregated gradient is compressed: 4 + 2 bytes per parameter per step with bf16."""
    _, sent = ranks[0]["acga", "bf16"]
    _, exact = ranks[0]["acga", None]
    assert exact["allreduce"] == 6 * 2 * 4 * N_PARAMS
    assert sent["allreduce"] == 6 * (4 + 2) * N_PARAMS


def test_normalized_keeps_its_mean_norm_exact(ranks):
    _, sent = ranks[0]["normalized", "bf16"]
    assert sent["allreduce"] == 6 * 2 * N_PARAMS and sent["norm"] == 6 * 4


def test_every_rank_agrees_where_the_algorithm_keeps_replicas_equal(ranks):
    for algo in ("allreduce", "acga", "normalized", "local_sgd"):
        for scheme in ("bf16", "fp16", *GRADIENT):
            assert torch.equal(ranks[0][algo, scheme][0], ranks[1][algo, scheme][0])


def test_compressed_local_sgd_is_diloco_with_outer_lr_one_and_no_momentum(ranks):
    """Under a gradient codec local SGD sends the change since its last average (a - x_i)
    through the codec with error feedback, which is DiLoCo's outer gradient with outer lr
    1 and no momentum: the same model to float rounding, the same bytes."""
    for out in ranks:
        for scheme in ("int8", "topk"):
            local, sent = out["local_sgd", scheme]
            diloco, diloco_sent = out["diloco-lr1", scheme]
            torch.testing.assert_close(local, diloco, rtol=0, atol=1e-6)
            assert sent == diloco_sent


@pytest.mark.parametrize("algo", sorted(set(BUILTIN) - set(COMPRESSIBLE)))
def test_the_others_are_refused_in_one_line(algo):
    with pytest.raises(ConfigError) as e:
        validate(TrainConfig(algo=algo, compress="bf16", out="/tmp/unused"), check_out=False)
    assert str(e.value).startswith(f"compress: {algo!r} sends its payload point to point")
    assert "\n" not in str(e.value)


WHAT = {"powersgd": "approximates a sum of gradients by a low-rank matrix",
        "int8": "quantises gradients with error feedback",
        "int4": "quantises gradients with error feedback",
        "topk:0.02": "sends the largest entries of gradients with error feedback"}


@pytest.mark.parametrize("spec", list(WHAT))
@pytest.mark.parametrize("algo", sorted(set(COMPRESSIBLE) - set(LOW_RANK)))
def test_gradient_schemes_are_refused_for_parameter_averages(algo, spec):
    with pytest.raises(ConfigError) as e:
        validate(TrainConfig(algo=algo, compress=spec, out="/tmp/unused"), check_out=False)
    allowed = ", ".join(n for n, c in sorted(REGISTRY.items()) if c.low_rank)
    assert str(e.value) == (
        f"compress: {spec!r} {WHAT[spec]}, not the parameters {algo!r} averages; allowed "
        f"with it: {allowed} (else bf16 or fp16)")
    assert {"acga", "allreduce", "diloco", "normalized"} <= set(allowed.split(", "))


@pytest.mark.parametrize("spec", ["int8", "int4", "topk", "topk:0.1"])
def test_gradient_schemes_are_accepted_for_gradient_payloads(spec):
    for algo in ("allreduce", "diloco"):
        validate(TrainConfig(algo=algo, compress=spec, out="/tmp/unused"), check_out=False)


@pytest.mark.parametrize("bad", ["gzip", "powersgd:0", "powersgd:x", "bf16:2", "topk:",
                                 "topk:0", "topk:2", "topk:x", "int8:2", "int4:1"])
def test_an_unknown_scheme_is_one_line(bad):
    with pytest.raises(ConfigError, match=r"^compress: got .*allowed: none, bf16, fp16, "
                                          r"powersgd, powersgd:RANK \(RANK an integer >= 1\), "
                                          r"int8, int4, topk, topk:FRACTION \(FRACTION in "
                                          r"\(0, 1\]\)$"):
        validate(TrainConfig(compress=bad, out="/tmp/unused"), check_out=False)


def test_powersgd_bytes_are_its_factors():
    rows = math.ceil(N_PARAMS / math.ceil(math.sqrt(N_PARAMS)))
    cols = math.ceil(math.sqrt(N_PARAMS))
    assert (rows + cols) * 4 * 4 < 4 * N_PARAMS


class _GateClock:
    """A real clock whose emulated waits block until the test opens the gate: a call whose
    completion waits for the emulated link is not done before then."""

    def __init__(self) -> None:
        import threading

        self.gate = threading.Event()

    def now(self) -> float:
        import time

        return time.perf_counter()

    def sleep(self, seconds: float) -> None:
        assert self.gate.wait(60), "the gate was never opened"


def _async_world(rank: int, world: int) -> dict:
    from accord.comm import Communicator, emulate_network
    from accord.comm.network import parse_network

    out = {}
    gen = torch.Generator().manual_seed(rank)
    inputs = [torch.randn(1000, generator=gen) for _ in range(4)]
    for scheme in ("int8", "int4", "topk", "bf16"):
        for mode in ("blocking", "async"):
            compressor = Compressor.from_spec(scheme)
            comm_mod.compress_payloads(compressor)
            comm = Communicator()
            results, pending = [], []
            for x in inputs:
                t = x.clone()
                if mode == "blocking":
                    comm.all_reduce_(t, op="sum", kind="frag")
                else:
                    clock = _GateClock()
                    if scheme == "bf16":  # reduces before it returns: nothing to hold
                        clock.gate.set()
                    emulate_network(parse_network("1mbit,1s"), clock)  # a wait for any size
                    fut = comm.all_reduce_async_(t, op="sum", kind="frag", compressed=True)
                    # gathered codes: in flight until the emulated link lets them through
                    pending.append(fut.done())
                    clock.gate.set()
                    fut.wait()
                    emulate_network(None)
                results.append(t)
            out[scheme, mode] = (results, pending, comm.stats.ops["frag"].bytes,
                                 sorted(compressor.state_dict()["sites"]))
            comm_mod.compress_payloads(None)
    return out


def test_an_async_compressed_allreduce_overlaps_and_equals_the_blocking_one():
    """``all_reduce_async_(compressed=True)``: int8/int4/topk codes are gathered in the
    background (not done while the emulated link holds them) and give the blocking call's
    result, bytes and error memory bit for bit, call after call; bf16 reduces before it
    returns."""
    for out in run_world(_async_world, 3):
        for scheme in ("int8", "int4", "topk", "bf16"):
            blocking, _, sent, sites = out[scheme, "blocking"]
            got, pending, async_sent, async_sites = out[scheme, "async"]
            for a, b in zip(got, blocking, strict=True):
                assert torch.equal(a, b), scheme
            assert (async_sent, async_sites) == (sent, sites)
            assert pending == ([False] * 4 if scheme != "bf16" else [True] * 4), scheme
        # the codes are lossy: the sum is near, not equal to, the exact one
        assert not torch.equal(out["int8", "async"][0][0], out["bf16", "async"][0][0])
