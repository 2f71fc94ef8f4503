"""DDP communication hooks (accord.ddp_hook) against the explicit aggregators.

In each gloo world every rank trains two copies of one model on the same batches: a
DistributedDataParallel model with the accord hook (small buckets, so a step has several)
and an un-wrapped copy aggregated by ``accord.build(...).after_backward``. The parent
checks that both give the same gradients, that DDP replicas stay identical, and that
ACGA's momentum and the communication volume agree.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel
from worlds import run_world

import accord

STEPS = 3
LR = 0.1
BUCKET_MB = 0.002  # ~500 floats per bucket: three buckets on the model below
# name -> (algorithm, hyperparameters, DDP options)
VARIANTS = {
    "allreduce": ("allreduce", {}, {}),
    "normalized": ("normalized", {}, {}),
    "normalized_scale": ("normalized", {"restore_scale": "mean_norm"}, {}),
    "acga": ("acga", {"momentum": 0.9, "coefficients": "exact"}, {}),
    "acga_layer": ("acga", {"per_layer": True, "momentum": 0.9, "coefficients": "exact"}, {}),
    "acga_view": ("acga", {"momentum": 0.9, "coefficients": "exact"},
                  {"gradient_as_bucket_view": True}),
    # the default (coefficients=auto) on this small model: the whole gradient all-gathered
    "acga_gather": ("acga", {"momentum": 0.9}, {}),
    "acga_gather_layer": ("acga", {"momentum": 0.9, "per_layer": True}, {}),
    # 7460 parameters: a 256-number sketch; per layer, the three weight matrices are
    # sketched to 128 numbers and the five smaller tensors sent exactly
    "acga_sketch": ("acga", {"momentum": 0.9, "coefficients": "sketch", "sketch_size": 256},
                    {}),
    "acga_sketch_layer": ("acga", {"momentum": 0.9, "coefficients": "sketch",
                                   "sketch_size": 128, "per_layer": True}, {}),
    "adasum": ("adasum", {}, {}),
    "adasum_static": ("adasum", {"per_layer": False}, {"static_graph": True}),
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
        torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    # ranks see different data (and rank 1 a shifted one), so the coefficients differ
    x = torch.randn(8, 16, generator=g) + rank
    return x, torch.randn(8, 4, generator=g)


def _grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()


def _params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _run_variant(rank: int, algo: str, hp: dict, options: dict) -> dict:
    ref_model = _model()
    model = copy.deepcopy(ref_model)
    ddp = DistributedDataParallel(model, bucket_cap_mb=BUCKET_MB, **options)
    agg, hook = accord.ddp_hook(algo, ddp, **hp)
    ddp.register_comm_hook(agg, hook)
    ref = accord.build(algo, ref_model.parameters(), broadcast=False, **hp)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=LR)
    out: dict = {"ddp": [], "ref": [], "buckets": []}
    for step in range(STEPS):
        x, y = _batch(rank, step)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        out["ddp"].append(_grads(ddp.module))
        out["buckets"].append(hook.buckets)
        opt.step()

        ref_opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(ref_model(x), y)
        loss.backward()
        ref.after_backward(accord.StepContext(step=step, loss=loss.detach()))
        out["ref"].append(_grads(ref_model))
        ref_opt.step()
    out["params"] = _params(ddp.module)
    out["ref_params"] = _params(ref_model)
    out["state"], out["ref_state"] = agg.state_dict(), ref.state_dict()
    out["stats"], out["ref_stats"] = agg.comm.stats.as_dict(), ref.comm.stats.as_dict()
    out["metrics"], out["ref_metrics"] = agg.metrics(), ref.metrics()
    del ddp, model  # before run_world destroys the process group
    return out


def _resume(rank: int) -> dict:
    """ACGA under DDP for STEPS steps, checkpointed after the first: a fresh DDP model,
    optimizer and hook loaded from the checkpoint continue with the same gradients."""
    hp = {"momentum": 0.9, "per_layer": True}
    ddp = DistributedDataParallel(_model(), bucket_cap_mb=BUCKET_MB)
    agg, hook = accord.ddp_hook("acga", ddp, **hp)
    ddp.register_comm_hook(agg, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    out: dict = {"straight": [], "resumed": []}
    for step in range(STEPS):
        x, y = _batch(rank, step)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        out["straight"].append(_grads(ddp.module))
        opt.step()
        if step == 0:
            saved = copy.deepcopy({"model": ddp.module.state_dict(), "opt": opt.state_dict(),
                                   "agg": agg.state_dict()})
    model = _model()
    model.load_state_dict(saved["model"])
    ddp2 = DistributedDataParallel(model, bucket_cap_mb=BUCKET_MB)
    agg2, hook2 = accord.ddp_hook("acga", ddp2, **hp)
    agg2.load_state_dict(saved["agg"])
    ddp2.register_comm_hook(agg2, hook2)
    opt2 = torch.optim.SGD(ddp2.parameters(), lr=LR)
    opt2.load_state_dict(saved["opt"])
    for step in range(1, STEPS):
        x, y = _batch(rank, step)
        opt2.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(ddp2(x), y).backward()
        out["resumed"].append(_grads(ddp2.module))
        opt2.step()
    out["momentum"], out["momentum_resumed"] = agg.momentum, agg2.momentum
    del ddp, ddp2, model  # before run_world destroys the process group
    return out


def _world(rank: int, world: int) -> dict:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = {v: _run_variant(rank, *spec) for v, spec in VARIANTS.items()}
        out["resume"] = _resume(rank)
    out["warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught
                       if issubclass(w.category, FutureWarning | DeprecationWarning)]
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"world{n}")
def results(request):
    return request.param, run_world(_world, request.param)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hook_gradients_equal_aggregator(results, variant):
    world, per_rank = results
    for r in range(world):
        got = per_rank[r][variant]
        # several buckets (DDP puts everything in one bucket until it rebuilds them after
        # the first step), so the last-bucket computation really spans buckets
        assert got["buckets"][0] >= 1 and got["buckets"][-1] >= 3, got["buckets"]
        for step in range(STEPS):
            torch.testing.assert_close(got["ddp"][step], got["ref"][step],
                                       atol=1e-6, rtol=1e-5, msg=f"{variant} r{r} s{step}")
        torch.testing.assert_close(got["params"], got["ref_params"], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ddp_replicas_identical(results, variant):
    world, per_rank = results
    first = per_rank[0][variant]["params"]
    assert not torch.equal(first, _params(_model()))  # training moved the model
    for r in range(1, world):
        assert torch.equal(per_rank[r][variant]["params"], first), (variant, r)


@pytest.mark.parametrize("variant", ["acga", "acga_layer", "acga_view", "acga_gather",
                                     "acga_gather_layer", "acga_sketch",
                                     "acga_sketch_layer"])
def test_acga_momentum_state_equals_aggregator(results, variant):
    world, per_rank = results
    layers = 8 if variant.endswith("layer") else 1
    for r in range(world):
        got = per_rank[r][variant]
        state, ref = got["state"], got["ref_state"]
        assert state["momentum"].shape == (layers, world)
        torch.testing.assert_close(state["momentum"], ref["momentum"], atol=1e-6, rtol=1e-5)
        assert state["guard_hits"] == ref["guard_hits"]
        assert state.keys() == ref.keys()
        for k in ("coef_min", "coef_max", "grad_norm", "cos_mean"):
            assert got["metrics"][k] == pytest.approx(got["ref_metrics"][k], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_collective_counted(results, variant):
    """Same bytes per kind as the explicit aggregator; the hook's bucket-wise allreduces
    (allreduce, ACGA's sum) are more calls of the same total size."""
    world, per_rank = results
    for r in range(world):
        got, ref = per_rank[r][variant]["stats"], per_rank[r][variant]["ref_stats"]
        assert got.keys() == ref.keys(), (got, ref)
        buckets = sum(per_rank[r][variant]["buckets"])
        for kind in got:
            assert got[kind]["bytes"] == ref[kind]["bytes"], (variant, kind)
        if variant == "allreduce":
            assert got["allreduce"]["calls"] == buckets
        elif variant.startswith("acga_gather"):  # one all-gather of the gradient, no sum
            assert "allreduce" not in got
            assert got["allgather"]["calls"] == STEPS
        elif variant.startswith("acga_sketch"):  # no sum: the weighted allreduce only
            assert got["allreduce"]["calls"] == STEPS
            assert got["allgather"]["calls"] == STEPS
        elif variant.startswith("acga"):
            assert got["allreduce"]["calls"] == buckets + STEPS
            assert got["allgather"]["calls"] == STEPS
        else:
            for kind in got:
                assert got[kind]["calls"] == ref[kind]["calls"], (variant, kind)


def test_acga_hook_resumes_from_its_aggregator_state_dict(results):
    world, per_rank = results
    for r in range(world):
        got = per_rank[r]["resume"]
        for step in range(1, STEPS):
            torch.testing.assert_close(got["resumed"][step - 1], got["straight"][step],
                                       atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got["momentum_resumed"], got["momentum"])


def test_no_deprecation_warnings(results):
    world, per_rank = results
    for r in range(world):
        assert per_rank[r]["warnings"] == [], per_rank[r]["warnings"]


def test_rejects_model_phase_algorithms_without_a_group():
    with pytest.raises(ValueError, match="no DDP communication hook"):
        accord.ddp_hook("easgd", [torch.zeros(2, requires_grad=True)])


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), float("nan"), True, "1"])
def test_a_bad_clip_grad_norm_is_refused_before_anything_is_built(value):
    # no process group here: the check comes first
    with pytest.raises(ValueError, match=r"accord.ddp_hook: clip_grad_norm is .*, allowed: "
                                         r"None \(no clipping\) or a finite number > 0"):
        accord.ddp_hook("acga", [torch.zeros(2, requires_grad=True)], clip_grad_norm=value)
    with pytest.raises(ValueError, match=r"accord.wrap: clip_grad_norm is .*, allowed: None"):
        accord.wrap(torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1), "acga",
                    clip_grad_norm=value)
