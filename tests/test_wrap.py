"""``accord.wrap`` and the initial broadcast, on a real gloo world of 2.

One spawned world runs every scenario and returns traces; the tests compare them: the
wrapper against the explicit two-hook loop (bit for bit), a resumed wrapper against an
uninterrupted one, an LR scheduler through the wrapper, GradScaler runs against unscaled
runs, and an inf on one rank's gradient skipping the step on both.
"""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pytest
import torch
from test_acga_math import np_acga_step
from torch import nn
from worlds import run_world

import accord

BATCH = 8
STEPS = 6
LR = 1e-2
SCALE = 2.0**12
WRAP_ALGOS = {
    "allreduce": {},
    "acga": {"momentum": 0.9},
    "easgd": {"period": 2},
    "lsgd": {"period": 2, "pull": 0.3},
}
CLIP = 1.0
CLIP_STEPS = 4
# acga on its exact route: the sum s is the allreduce the clip must not start early
CLIP_ALGOS = {"allreduce": {}, "acga": {"momentum": 0.5, "coefficients": "exact"}}
AMP_ALGOS = {
    "acga": ("acga", {"restore_scale": "mean_norm"}),
    "normalized": ("normalized", {"restore_scale": "mean_norm"}),
    "acga_unscale_first": ("acga", {"restore_scale": "mean_norm"}),
}


def _model(seed: int, batchnorm: bool = False) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if batchnorm:
            return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(),
                                 nn.Linear(16, 3))
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def _loss(model: nn.Module, rank: int, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(BATCH, 8, generator=gen)
    y = torch.randint(0, 3, (BATCH,), generator=gen)
    return nn.functional.cross_entropy(model(x), y)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors]).clone()


def _state(model: nn.Module) -> torch.Tensor:
    return _flat([*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())])


def _counts(comm: dict) -> dict:
    return {k: (v["calls"], v["bytes"]) for k, v in comm.items()}


# -- the scenarios, run on every rank ---------------------------------------------------
def _broadcast(rank):
    out = {}
    for flag in (True, False):
        model = _model(10 + rank, batchnorm=True)  # a different start on every rank
        model[0].bias.requires_grad_(False)  # frozen parameters are part of the replica too
        with torch.no_grad():
            for b in model.buffers():
                if b.is_floating_point():
                    b.add_(rank + 1.0)
        before = _state(model)
        agg = accord.build("allreduce", model.parameters(), buffers=model.buffers(),
                           broadcast=flag)
        out[flag] = {"before": before, "after": _state(model),
                     "comm": _counts(agg.comm.stats.as_dict())}
        agg.close()
    return out


def _explicit(rank, algo, hp):
    model = _model(10 + rank)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    agg = accord.build(algo, model.parameters(), **hp)
    trace = []
    for step in range(STEPS):
        opt.zero_grad()
        loss = _loss(model, rank, step)
        loss.backward()
        ctx = accord.StepContext(step=step, loss=loss.detach())
        agg.after_backward(ctx)
        opt.step()
        agg.after_step(ctx)
        trace.append(_flat(model.parameters()))
    comm = _counts(agg.comm.stats.as_dict())
    agg.close()
    return {"params": trace, "comm": comm}


def _train(model, opt, rank, steps):
    for step in steps:
        opt.zero_grad()
        loss = _loss(model, rank, step)
        loss.backward()
        opt.step(loss=loss.detach())


def _wrapped(rank, algo, hp):
    model = _model(10 + rank)
    opt = accord.wrap(torch.optim.AdamW(model.parameters(), lr=LR), algo, **hp)
    trace = []
    for step in range(STEPS):
        _train(model, opt, rank, [step])
        trace.append(_flat(model.parameters()))
    comm = _counts(opt.aggregator.comm.stats.as_dict())
    opt.close()
    return {"params": trace, "comm": comm, "steps": opt.steps}


def _resume(rank, algo, hp):
    model = _model(10 + rank)
    opt = accord.wrap(torch.optim.AdamW(model.parameters(), lr=LR), algo, **hp)
    _train(model, opt, rank, range(3))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, rank, range(3, STEPS))
    straight = _flat(model.parameters())
    opt.close()
    # a fresh start (other weights, broadcast at wrap), then the checkpoint of this rank
    model = _model(99 + rank)
    opt = accord.wrap(torch.optim.AdamW(model.parameters(), lr=LR), algo, **hp)
    buf.seek(0)
    ckpt = torch.load(buf)  # weights_only: no process group, no pickled objects inside
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    loaded_steps = opt.steps
    _train(model, opt, rank, range(3, STEPS))
    opt.close()
    return {"straight": straight, "resumed": _flat(model.parameters()),
            "loaded_steps": loaded_steps, "saved_steps": ckpt["opt"]["steps"]}


def _scheduled(rank, wrapped):
    model = _model(10 + rank)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if wrapped:
        opt = accord.wrap(inner, "allreduce")
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    else:
        agg = accord.build("allreduce", model.parameters())
        sched = torch.optim.lr_scheduler.StepLR(inner, step_size=2, gamma=0.5)
    lrs, params = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(5):
            inner.zero_grad()
            loss = _loss(model, rank, step)
            loss.backward()
            if wrapped:
                opt.step(loss=loss.detach())
            else:
                ctx = accord.StepContext(step=step)
                agg.after_backward(ctx)
                inner.step()
                agg.after_step(ctx)
            sched.step()
            lrs.append(inner.param_groups[0]["lr"])
            params.append(_flat(model.parameters()))
    (opt if wrapped else agg).close()
    return {"lrs": lrs, "params": params, "warnings": [str(w.message) for w in caught]}


def _amp(rank, algo, hp, mode):
    """mode: 'plain' (no scaler), 'scaled' (scaler.step unscales through the wrapper) or
    'unscale_first' (the user calls scaler.unscale_ before scaler.step)."""
    model = _model(10 + rank)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = None if mode == "plain" else torch.amp.GradScaler(
        "cpu", init_scale=SCALE, growth_interval=1000)
    opt = accord.wrap(inner, algo, scaler=scaler, **hp)
    grads, params = [], []
    for step in range(4):
        opt.zero_grad()
        loss = _loss(model, rank, step)
        if scaler is None:
            loss.backward()
            opt.step(loss=loss.detach())
        else:
            scaler.scale(loss).backward()
            if mode == "unscale_first":
                scaler.unscale_(opt)
            scaler.step(opt, loss=loss.detach())
            scaler.update()
        # the optimizer leaves .grad alone: it holds the aggregated gradient of the step
        grads.append(_flat(p.grad for p in model.parameters()))
        params.append(_flat(model.parameters()))
    comm = _counts(opt.aggregator.comm.stats.as_dict())
    opt.close()
    return {"grads": grads, "params": params, "comm": comm,
            "scale": None if scaler is None else scaler.get_scale()}


def _inf(rank):
    model = _model(10 + rank)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1000)
    opt = accord.wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "acga",
                      scaler=scaler)
    seen = []
    hook = opt.aggregator.after_backward

    def spy(ctx):
        seen.append((ctx.step, ctx.healthy, float(ctx.loss)))
        hook(ctx)

    opt.aggregator.after_backward = spy
    trace = []
    for step in range(4):
        opt.zero_grad()
        loss = _loss(model, rank, step)
        scaler.scale(loss).backward()
        if step == 1 and rank == 1:
            with torch.no_grad():
                model[0].weight.grad[0, 0] = float("inf")
        before = _flat(model.parameters())
        scaler.step(opt, loss=loss.detach())
        scaler.update()
        trace.append({"before": before, "after": _flat(model.parameters()),
                      "scale": scaler.get_scale(), "steps": opt.steps})
    out = {"trace": trace, "seen": seen, "skipped": opt.skipped_steps,
           "comm": _counts(opt.aggregator.comm.stats.as_dict())}
    opt.close()
    return out


def _errors(rank):
    """Each misuse raises on every rank before any collective, so the world goes on."""
    model = _model(10 + rank)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    out = {}

    def catch(name, fn):
        try:
            fn()
        except Exception as e:  # the test checks the type and message
            out[name] = (type(e).__name__, str(e))
        else:
            out[name] = None

    catch("not_optimizer", lambda: accord.wrap(model, "allreduce"))
    catch("broadcast_type", lambda: accord.build("allreduce", model.parameters(),
                                                 broadcast="yes"))
    opt = accord.wrap(inner, "allreduce")
    catch("twice", lambda: accord.wrap(opt, "allreduce"))
    catch("closure", lambda: opt.step(lambda: 0.0))
    catch("add_param_group", lambda: opt.add_param_group({"params": [nn.Parameter(
        torch.zeros(2))]}))
    catch("load_empty", lambda: opt.load_state_dict({}))
    catch("bad_scaler", lambda: accord.wrap(inner, "allreduce", scaler=object()))
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    opt.zero_grad()
    scaler.scale(_loss(model, rank, 0)).backward()
    catch("scaler_unknown", lambda: scaler.step(opt))
    out["stale_attributes"] = [k for k in ("found_inf", "grad_scale") if k in opt.__dict__]
    # the world is still in step: a normal step communicates fine and keeps replicas equal
    opt.zero_grad()
    _loss(model, rank, 1).backward()
    opt.step()
    out["after"] = _flat(model.parameters())
    out["repr"] = repr(opt)
    opt.close()
    return out


def _clip_loss(model, rank, step):
    # rank 1's gradient is about 3x rank 0's: with CLIP = 1 only rank 1 is clipped
    return _loss(model, rank, step) * (1.0 + 2.0 * rank)


def _clip_wrap(rank, algo, hp):
    """accord.wrap(..., clip_grad_norm=CLIP): this rank's raw gradient and the combined
    gradient the wrapper wrote, per step."""
    model = _model(10 + rank)
    opt = accord.wrap(torch.optim.SGD(model.parameters(), lr=0.1), algo,
                      clip_grad_norm=CLIP, **hp)
    out = {"raw": [], "combined": []}
    for step in range(CLIP_STEPS):
        opt.zero_grad()
        _clip_loss(model, rank, step).backward()
        out["raw"].append(_flat(p.grad for p in model.parameters()))
        opt.step()
        out["combined"].append(_flat(p.grad for p in model.parameters()))
    out["params"] = _flat(model.parameters())
    opt.close()
    return out


def _clip_hook(rank, algo, hp):
    """The same through DDP and accord.ddp_hook(..., clip_grad_norm=CLIP), with buckets of
    a few tensors so the clip spans buckets; the raw gradient from an un-wrapped copy."""
    from torch.nn.parallel import DistributedDataParallel

    model = _model(10 + rank)
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.0002)
    agg, hook = accord.ddp_hook(algo, ddp, clip_grad_norm=CLIP, **hp)
    ddp.register_comm_hook(agg, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    out = {"raw": [], "combined": [], "buckets": []}
    for step in range(CLIP_STEPS):
        local = copy.deepcopy(model)
        _clip_loss(local, rank, step).backward()
        out["raw"].append(_flat(p.grad for p in local.parameters()))
        opt.zero_grad()
        _clip_loss(ddp, rank, step).backward()
        out["combined"].append(_flat(p.grad for p in model.parameters()))
        out["buckets"].append(hook.buckets)
        opt.step()
    out["params"] = _flat(model.parameters())
    out["comm"] = _counts(agg.comm.stats.as_dict())
    del ddp  # before the process group goes
    return out


def _ddp_refused(rank):
    """wrap / build on a DDP model's parameters: refused on every rank, before any
    collective; the plain model afterwards, and a DDP whose allreduce accord switched off
    (accord.integrations.accelerate's model-phase path), are accepted."""
    from torch.nn.parallel import DistributedDataParallel

    from accord._ddp import local_gradients

    def refusals(ddp):
        out = {}
        for name, fn in {
            "wrap": lambda: accord.wrap(torch.optim.SGD(ddp.parameters(), lr=0.1),
                                        "local_sgd"),
            "wrap_module": lambda: accord.wrap(
                torch.optim.SGD(ddp.module.parameters(), lr=0.1), "acga"),
            "build": lambda: accord.build("acga", ddp.parameters()),
            "build_generator": lambda: accord.build("acga", (p for p in model.parameters())),
        }.items():
            try:
                fn()
                out[name] = None
            except Exception as e:  # the test checks the type and message
                out[name] = (type(e).__name__, str(e))
        return out

    model = _model(10 + rank)
    ddp = DistributedDataParallel(model)
    out = refusals(ddp)
    del ddp
    opt = accord.wrap(torch.optim.SGD(model.parameters(), lr=0.1), "local_sgd")
    out["unwrapped"] = opt.aggregator.name
    opt.close()
    ddp = DistributedDataParallel(model)
    ddp.register_comm_hook(None, local_gradients)
    opt = accord.wrap(torch.optim.SGD(model.parameters(), lr=0.1), "local_sgd")
    out["local_hook"] = opt.aggregator.name
    opt.close()
    del ddp
    return out


def _world(rank, world):
    out = {"broadcast": _broadcast(rank), "errors": _errors(rank),
           "ddp_refused": _ddp_refused(rank)}
    for algo, hp in CLIP_ALGOS.items():
        out[("clip_wrap", algo)] = _clip_wrap(rank, algo, hp)
        out[("clip_hook", algo)] = _clip_hook(rank, algo, hp)
    for algo, hp in WRAP_ALGOS.items():
        out[("explicit", algo)] = _explicit(rank, algo, hp)
        out[("wrapped", algo)] = _wrapped(rank, algo, hp)
    for algo in ("acga", "lsgd"):
        out[("resume", algo)] = _resume(rank, algo, WRAP_ALGOS[algo])
    out["scheduled"] = {w: _scheduled(rank, w) for w in (True, False)}
    for name, (algo, hp) in AMP_ALGOS.items():
        mode = "unscale_first" if name.endswith("unscale_first") else "scaled"
        out[("amp", name)] = {m: _amp(rank, algo, hp, m) for m in ("plain", mode)}
    out["inf"] = _inf(rank)
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_world(_world, 2)


# -- A. the initial broadcast -------------------------------------------------------------
def test_broadcast_makes_replicas_start_identical(ranks):
    b0, b1 = ranks[0]["broadcast"][True], ranks[1]["broadcast"][True]
    assert not torch.equal(b0["before"], b1["before"])  # not vacuous: the seeds differ
    assert torch.equal(b0["after"], b0["before"])  # rank 0's model, parameters and buffers
    assert torch.equal(b1["after"], b0["before"])
    numel = b0["before"].numel()
    assert b0["comm"] == {"initial_broadcast": (1, numel * 4)}  # one flat buffer
    assert b1["comm"] == {"initial_broadcast": (1, 0)}  # bytes count on the sender only


def test_broadcast_false_keeps_distinct_replicas(ranks):
    for r in ranks:
        run = r["broadcast"][False]
        assert torch.equal(run["after"], run["before"])
        assert run["comm"] == {}
    assert not torch.equal(ranks[0]["broadcast"][False]["after"],
                           ranks[1]["broadcast"][False]["after"])


# -- B. the wrapper -------------------------------------------------------------------------
@pytest.mark.parametrize("algo", list(WRAP_ALGOS))
def test_wrap_is_bit_identical_to_the_explicit_hooks(ranks, algo):
    for r in ranks:
        explicit, wrapped = r[("explicit", algo)], r[("wrapped", algo)]
        for step in range(STEPS):
            assert torch.equal(wrapped["params"][step], explicit["params"][step]), step
        assert wrapped["comm"] == explicit["comm"]
        assert wrapped["steps"] == STEPS
    start = _flat(_model(10).parameters())
    assert not torch.equal(ranks[0][("wrapped", algo)]["params"][-1], start)
    if algo in ("easgd", "lsgd"):  # model-phase: replicas pulled, not equal
        assert not torch.equal(ranks[0][("wrapped", algo)]["params"][-1],
                               ranks[1][("wrapped", algo)]["params"][-1])
    else:
        assert torch.equal(ranks[0][("wrapped", algo)]["params"][-1],
                           ranks[1][("wrapped", algo)]["params"][-1])


@pytest.mark.parametrize("algo", ["acga", "lsgd"])
def test_state_dict_round_trip_continues_identically(ranks, algo):
    for r in ranks:
        run = r[("resume", algo)]
        assert run["saved_steps"] == 3 and run["loaded_steps"] == 3
        assert torch.equal(run["resumed"], run["straight"])


def test_lr_scheduler_steps_the_inner_optimizer(ranks):
    for r in ranks:
        wrapped, plain = r["scheduled"][True], r["scheduled"][False]
        assert wrapped["lrs"] == pytest.approx([0.1, 0.05, 0.05, 0.025, 0.025])
        assert wrapped["lrs"] == plain["lrs"]
        for a, b in zip(wrapped["params"], plain["params"], strict=True):
            assert torch.equal(a, b)
        # the scheduler saw the wrapper's step (no "lr_scheduler.step() before
        # optimizer.step()" warning)
        assert not [w for w in wrapped["warnings"] if "lr_scheduler" in w], wrapped["warnings"]


@pytest.mark.parametrize("name", list(AMP_ALGOS))
def test_grad_scaler_aggregates_unscaled_gradients(ranks, name):
    for r in ranks:
        runs = r[("amp", name)]
        plain = runs["plain"]
        scaled = runs["unscale_first" if name.endswith("unscale_first") else "scaled"]
        for step in range(4):
            # restore_scale=mean_norm makes the result scale-dependent: a gradient still
            # multiplied by the loss scale would come out SCALE times larger
            assert torch.equal(scaled["grads"][step], plain["grads"][step]), step
            assert torch.equal(scaled["params"][step], plain["params"][step]), step
        assert scaled["scale"] == SCALE  # no overflow: no back-off
        assert scaled["comm"].pop("amp_found_inf") == (4, 4 * 4)  # one float per step
        assert scaled["comm"] == plain["comm"]


def test_inf_on_one_rank_skips_the_step_on_every_rank(ranks):
    for r in ranks:
        inf = r["inf"]
        trace = inf["trace"]
        assert torch.equal(trace[1]["after"], trace[1]["before"])  # skipped here too
        for step in (0, 2, 3):
            assert not torch.equal(trace[step]["after"], trace[step]["before"])
        # every rank's scaler backed off at the skipped step, not only rank 1's
        assert [t["scale"] for t in trace] == [SCALE, SCALE / 2, SCALE / 2, SCALE / 2]
        assert [t["steps"] for t in trace] == [1, 1, 2, 3]
        assert inf["skipped"] == 1
        # the hooks saw steps 0, 1, 2 (the skipped call counts nothing), healthy, with loss
        assert [(s, h) for s, h, _ in inf["seen"]] == [(0, True), (1, True), (2, True)]
        assert inf["comm"]["amp_found_inf"] == (4, 16)
    for step in range(4):
        assert torch.equal(ranks[0]["inf"]["trace"][step]["after"],
                           ranks[1]["inf"]["trace"][step]["after"])


@pytest.mark.parametrize(("name", "kind", "text"), [
    ("not_optimizer", "TypeError", "allowed: a torch.optim.Optimizer"),
    ("broadcast_type", "TypeError", "broadcast: got 'yes'"),
    ("twice", "TypeError", "already wrapped"),
    ("closure", "ValueError", "no closure"),
    ("add_param_group", "RuntimeError", "wrap it again"),
    ("load_empty", "ValueError", "keys optimizer, aggregator, steps, skipped_steps"),
    ("bad_scaler", "TypeError", "scaler: got object"),
    ("scaler_unknown", "RuntimeError", "scaler=scaler"),
])
def test_misuse_fails_on_every_rank_with_a_clear_message(ranks, name, kind, text):
    for r in ranks:
        got = r["errors"][name]
        assert got is not None and got[0] == kind and text in got[1], got


def test_world_goes_on_after_misuse(ranks):
    assert ranks[0]["errors"]["stale_attributes"] == []
    assert torch.equal(ranks[0]["errors"]["after"], ranks[1]["errors"]["after"])
    assert ranks[0]["errors"]["repr"].startswith("AggregatedOptimizer('allreduce', SGD")


# -- C. a DDP model's parameters ------------------------------------------------------------
@pytest.mark.parametrize("name", ["wrap", "wrap_module", "build", "build_generator"])
def test_a_ddp_models_parameters_are_refused_in_one_line(ranks, name):
    for r in ranks:
        kind, text = r["ddp_refused"][name]
        assert kind == "ValueError" and "\n" not in text, text
        assert text.startswith("accord.wrap:" if name.startswith("wrap") else "accord.build:")
        assert "DistributedDataParallel" in text and "ddp.module" in text
        assert "accord.ddp_hook" in text


def test_the_plain_model_and_a_ddp_without_allreduce_are_accepted(ranks):
    for r in ranks:
        assert r["ddp_refused"]["unwrapped"] == "local_sgd"
        assert r["ddp_refused"]["local_hook"] == "local_sgd"


# -- D. clip_grad_norm: each rank's gradient clipped before it is combined -----------------
def _clipped(g: np.ndarray) -> np.ndarray:
    """torch.nn.utils.clip_grad_norm_'s rule, in float64."""
    return g * min(1.0, CLIP / (np.linalg.norm(g) + 1e-6))


def _oracle(algo, raw_per_rank):
    """The combined gradient per step from the ranks' raw gradients: clip each, then
    average (allreduce) or ACGA (the NumPy oracle of test_acga_math)."""
    out, m = [], None
    for step in range(CLIP_STEPS):
        G = np.stack([_clipped(raw[step].double().numpy()) for raw in raw_per_rank])
        if algo == "allreduce":
            out.append(G.mean(axis=0))
        else:
            d, _, m, *_ = np_acga_step(G, m, CLIP_ALGOS[algo]["momentum"])
            out.append(d)
    return out


@pytest.mark.parametrize("route", ["clip_wrap", "clip_hook"])
@pytest.mark.parametrize("algo", list(CLIP_ALGOS))
def test_clip_grad_norm_clips_each_ranks_gradient_before_combining(ranks, route, algo):
    runs = [r[(route, algo)] for r in ranks]
    for step in range(CLIP_STEPS):  # not vacuous: rank 1 is clipped, rank 0 is not
        assert float(runs[0]["raw"][step].norm()) < CLIP < float(runs[1]["raw"][step].norm())
    expected = _oracle(algo, [run["raw"] for run in runs])
    unclipped = [np.mean([run["raw"][step].double().numpy() for run in runs], axis=0)
                 for step in range(CLIP_STEPS)]
    for run in runs:
        for step in range(CLIP_STEPS):
            np.testing.assert_allclose(run["combined"][step].double().numpy(), expected[step],
                                       rtol=2e-5, atol=2e-6, err_msg=f"step {step}")
        if algo == "allreduce":
            assert not np.allclose(run["combined"][0].double().numpy(), unclipped[0])
    if route == "clip_hook":
        assert runs[0]["buckets"][-1] >= 2  # the clip's norm spans several buckets
        calls, sent = runs[0]["comm"]["allreduce"]
        # one allreduce per step (two for ACGA: s and d), none started before the clip
        assert calls == CLIP_STEPS * (1 if algo == "allreduce" else 2)
        assert sent == calls * 195 * 4  # the 195-parameter model each time


@pytest.mark.parametrize("algo", list(CLIP_ALGOS))
def test_clip_grad_norm_gives_the_same_model_through_wrap_and_the_ddp_hook(ranks, algo):
    for r in ranks:
        torch.testing.assert_close(r[("clip_hook", algo)]["params"],
                                   r[("clip_wrap", algo)]["params"], rtol=1e-5, atol=1e-6)
    assert torch.equal(ranks[0][("clip_hook", algo)]["params"],
                       ranks[1][("clip_hook", algo)]["params"])
