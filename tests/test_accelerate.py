"""accord.integrations.accelerate: accord's algorithms in a Hugging Face accelerate script, in real
2-process gloo worlds started by torchrun (accelerate reads torchrun's environment).

One torchrun launch runs every distributed scenario (this file is also the worker script:
``python -m torch.distributed.run ... tests/test_accelerate.py OUT_DIR``); each rank saves
what it measured to ``OUT_DIR/rank{r}.pt`` and the tests below compare the two files. A
second launch runs the example script.
"""

from __future__ import annotations

import copy
import datetime
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from worlds import free_port

accelerate = pytest.importorskip("accelerate")

import accord  # noqa: E402
import accord.integrations.accelerate as acc_accord  # noqa: E402
from accord.integrations.ddp_hooks import hook_algorithms  # noqa: E402

HOOK_ALGORITHMS = hook_algorithms()

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 20  # seconds, every process group and every torchrun launch's share of it
LR = 0.1
CLIP = 2.0


# -- the worker (runs on every rank under torchrun) --------------------------------------
def _accelerator(**kwargs):
    from accelerate.utils import InitProcessGroupKwargs

    handlers = [InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=TIMEOUT))]
    handlers += kwargs.pop("handlers", [])
    return accelerate.Accelerator(cpu=True, kwargs_handlers=handlers, **kwargs)


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def _bn_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32),
                               torch.nn.Tanh(), torch.nn.Linear(32, 4))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    # different data per rank (rank 1 shifted), so the replicas' gradients really differ
    return torch.randn(8, 16, generator=g) + rank, torch.randn(8, 4, generator=g)


def _loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors]).clone()


def _grads(model: torch.nn.Module) -> torch.Tensor:
    return _flat(p.grad for p in model.parameters())


def _acga_against_build(rank: int, out: dict, out_dir: str) -> None:
    """acga through the DDP hook (several buckets) vs accord.build's after_backward on an
    un-wrapped copy, same batches, 3 steps; then a save_state / load_state round trip."""
    from accelerate.utils import DistributedDataParallelKwargs

    accelerator = _accelerator(handlers=[DistributedDataParallelKwargs(bucket_cap_mb=0.002)])
    model = _mlp()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    # the exact route: the sum s is allreduced bucket by bucket as backward runs
    model, opt, agg = acc_accord.prepare(accelerator, model, opt, "acga", momentum=0.9,
                                         coefficients="exact")
    ref_agg = accord.build("acga", ref.parameters(), momentum=0.9, broadcast=False,
                           coefficients="exact")
    ref_opt = torch.optim.SGD(ref.parameters(), lr=LR)
    out["acga_types"] = (type(model).__name__, type(opt).__name__, type(agg).__name__)
    out["acga_grads"], out["acga_ref_grads"], out["acga_local"] = [], [], []
    for step in range(3):
        batch = _batch(rank, step)
        accelerator.backward(_loss(model, batch))
        _loss(ref, batch).backward()
        out["acga_local"].append(_grads(ref))
        ref_agg.after_backward(accord.StepContext(step=step))
        out["acga_grads"].append(_grads(model.module))
        out["acga_ref_grads"].append(_grads(ref))
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    out["acga_params"] = _flat(model.module.parameters())
    out["acga_ref_params"] = _flat(ref.parameters())
    out["acga_buckets"] = agg.comm.stats.as_dict()["allreduce"]["calls"]
    ref_agg.close()
    # accelerate's checkpoint holds the aggregator (registered for checkpointing)
    saved = agg.state_dict()
    accelerator.save_state(str(Path(out_dir) / "ckpt"))
    accelerator.wait_for_everyone()
    accelerator.backward(_loss(model, _batch(rank, 3)))
    opt.step()
    opt.zero_grad()
    moved = not torch.equal(agg.state_dict()["momentum"], saved["momentum"])
    accelerator.load_state(str(Path(out_dir) / "ckpt"))
    out["acga_checkpoint"] = (moved, agg.state_dict()["count"] == saved["count"],
                              torch.equal(agg.state_dict()["momentum"], saved["momentum"]))


def _local_sgd(rank: int, out: dict) -> None:
    """local_sgd period 2 on a model with BatchNorm: DDP's allreduce and buffer broadcast
    are off (gradients and running statistics are each rank's own), replicas (parameters
    and buffers) differ after a local step and agree right after a sync step."""
    accelerator = _accelerator()
    model = _bn_net()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model, opt, agg = acc_accord.prepare(accelerator, model, opt, "local_sgd", period=2)
    out["lsgd_inner"] = type(opt.optimizer).__name__
    out["lsgd_broadcast_buffers"] = model.broadcast_buffers
    rec = out["local_sgd"] = []
    for step in range(4):
        batch = _batch(rank, step)
        ref.load_state_dict(model.module.state_dict())
        _loss(ref, batch).backward()
        accelerator.backward(_loss(model, batch))
        grads, local = _grads(model.module), _grads(ref)
        # the running statistics after the forward: this rank's own, not rank 0's
        fwd_buffers = _flat(b for b in model.module.buffers() if b.is_floating_point())
        local_buffers = _flat(b for b in ref.buffers() if b.is_floating_point())
        ref.zero_grad()
        opt.step()
        opt.zero_grad()
        rec.append({"grads": grads, "local": local, "fwd_buffers": fwd_buffers,
                    "local_buffers": local_buffers,
                    "params": _flat(model.module.parameters()),
                    "buffers": _flat(b for b in model.module.buffers() if b.is_floating_point())})
    out["local_sgd_steps"] = opt.optimizer.steps
    out["local_sgd_syncs"] = agg.metrics()["syncs"]


def _every_model_phase_algorithm(rank: int, out: dict) -> None:
    """Every model-phase algorithm prepares (accelerate round-trips the optimizer's state
    dict through its device placement) and takes 3 steps; lsgd refuses a step without a
    noted loss."""
    accelerator = _accelerator()
    res = out["smoke"] = {}
    for name in sorted(n for n in accord.REGISTRY if n not in HOOK_ALGORITHMS):
        model = _bn_net()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        model, opt, agg = acc_accord.prepare(accelerator, model, opt, name)
        if name == "lsgd":
            accelerator.backward(_loss(model, _batch(rank, 0)))
            try:
                opt.step()
            except RuntimeError as exc:
                out["lsgd_no_loss"] = str(exc)
            opt.zero_grad()
        for step in range(3):
            loss = _loss(model, _batch(rank, step))
            accelerator.backward(loss)
            acc_accord.note_loss(opt, loss)
            opt.step()
            opt.zero_grad()
        res[name] = (opt.optimizer.steps, bool(torch.isfinite(
            _flat(model.module.parameters())).all()))
        agg.close()


def _clip(rank: int, out: dict) -> None:
    """prepare(..., clip_grad_norm=CLIP) on both paths: allreduce through the DDP hook,
    local_sgd with period 1 inside the optimizer, and allreduce under a (CPU) GradScaler,
    which moves it inside the optimizer (the hook would clip scaled gradients). With SGD
    all take the step p - lr mean_i clip(g_i), computed here independently: each rank's
    gradient on a copy, torch's clip_grad_norm_, and a plain torch.distributed average."""
    for key, name, hp in (("allreduce", "allreduce", {}),
                          ("local_sgd", "local_sgd", {"period": 1}),
                          ("allreduce_scaled", "allreduce", {})):
        accelerator = _accelerator()
        if key.endswith("scaled"):
            accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        model = _mlp()
        ref = copy.deepcopy(model)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        model, opt, agg = acc_accord.prepare(accelerator, model, opt, name,
                                             clip_grad_norm=CLIP, **hp)
        rec = out[f"clip_{key}"] = {"norms": [], "params": [], "oracle": [],
                                    "inner": type(opt.optimizer).__name__}
        for step in range(2):
            batch = _batch(rank, step)
            ref.load_state_dict(model.module.state_dict())
            _loss(ref, batch).mul(1.0 + 4.0 * rank).backward()
            rec["norms"].append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)))
            clipped = _grads(ref)
            torch.distributed.all_reduce(clipped)
            ref.zero_grad()
            rec["oracle"].append(_flat(model.module.parameters()) - LR * clipped / 2)
            accelerator.backward(_loss(model, batch).mul(1.0 + 4.0 * rank))
            opt.step()
            opt.zero_grad()
            rec["params"].append(_flat(model.module.parameters()))
        agg.close()


def _scaler(rank: int, out: dict) -> None:
    """fp16's GradScaler (a CPU one here): acga leaves the hook for the optimizer path and
    steps on unscaled gradients, as accord.build on an un-wrapped copy does; one rank's
    overflow skips the step everywhere and accelerate reports it."""
    accelerator = _accelerator()
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model = _mlp()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model, opt, agg = acc_accord.prepare(accelerator, model, opt, "acga", momentum=0.9)
    ref_agg = accord.build("acga", ref.parameters(), momentum=0.9, broadcast=False)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=LR)
    out["scaler_inner"] = type(opt.optimizer).__name__
    out["scaler_ratio"] = []
    for step in range(2):
        batch = _batch(rank, step)
        accelerator.backward(_loss(model, batch))
        _loss(ref, batch).backward()
        out["scaler_ratio"].append(float(_grads(model.module).norm() / _grads(ref).norm()))
        ref_agg.after_backward(accord.StepContext(step=step))
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    out["scaler_params"] = _flat(model.module.parameters())
    out["scaler_ref_params"] = _flat(ref.parameters())
    # rank 1 overflows: every rank skips the step, and accelerate hears of it
    loss = _loss(model, _batch(rank, 2))
    accelerator.backward(loss * (float("inf") if rank == 1 else 1.0))
    opt.step()
    opt.zero_grad()
    out["scaler_skip"] = (opt.step_was_skipped, opt.optimizer.skipped_steps,
                          accelerator.scaler.get_scale(),
                          bool(torch.equal(_flat(model.module.parameters()),
                                           out["scaler_params"])))
    ref_agg.close()
    agg.close()


def _bad_inputs(rank: int, out: dict) -> None:
    """Each refusal is raised before anything is prepared: one line, per rank."""
    from accelerate.utils import (
        DDPCommunicationHookType,
        DistributedDataParallelKwargs,
        GradientAccumulationPlugin,
    )

    accelerator = _accelerator()
    prepared, prepared_opt = accelerator.prepare(_mlp(), torch.optim.SGD(_mlp().parameters(),
                                                                         lr=LR))
    fresh = _mlp()
    sgd = torch.optim.SGD(fresh.parameters(), lr=LR)
    hooked = _accelerator(handlers=[DistributedDataParallelKwargs(
        comm_hook=DDPCommunicationHookType.FP16)])
    cases = {
        "unknown_algorithm": (accelerator, fresh, sgd, "nope", {}),
        "unknown_hyperparameter": (accelerator, fresh, sgd, "acga", {"speed": 1}),
        "not_accelerator": (object(), fresh, sgd, "acga", {}),
        "prepared_model": (accelerator, prepared, sgd, "acga", {}),
        "prepared_optimizer": (accelerator, fresh, prepared_opt, "acga", {}),
        "wrapped_optimizer": (accelerator, fresh, accord.wrap(
            torch.optim.SGD(fresh.parameters(), lr=LR), "allreduce", broadcast=False),
            "local_sgd", {}),
        "foreign_parameters": (accelerator, fresh, torch.optim.SGD(
            _mlp().parameters(), lr=LR), "easgd", {}),
        "comm_hook": (hooked, fresh, sgd, "acga", {}),
        "clip_negative": (accelerator, fresh, sgd, "acga", {"clip_grad_norm": -1.0}),
    }
    errors = out["errors"] = {}
    for key, (a, m, o, name, hp) in cases.items():
        try:
            acc_accord.prepare(a, m, o, name, **hp)
            errors[key] = None
        except (TypeError, ValueError, RuntimeError) as exc:
            errors[key] = f"{type(exc).__name__}: {exc}"
    try:
        acc_accord.note_loss(sgd, 1.0)
    except TypeError as exc:
        errors["note_loss"] = f"{type(exc).__name__}: {exc}"
    _accelerator(gradient_accumulation_plugin=GradientAccumulationPlugin(
        num_steps=2, sync_each_batch=True))
    try:
        acc_accord.prepare(accelerator, fresh, sgd, "acga")
    except ValueError as exc:
        errors["sync_each_batch"] = f"{type(exc).__name__}: {exc}"
    try:  # the hook's clip would see each micro-batch's partial gradient
        acc_accord.prepare(accelerator, fresh, sgd, "allreduce", clip_grad_norm=1.0)
    except ValueError as exc:
        errors["sync_each_batch_clip"] = f"{type(exc).__name__}: {exc}"


def _accumulation(rank: int, out: dict) -> None:
    """gradient_accumulation_steps=2, 6 micro-batches: the aggregators communicate (and
    the wrapped optimizer counts a step) at the 3 real steps only."""
    accelerator = _accelerator(gradient_accumulation_steps=2)
    for name, hp in (("local_sgd", {"period": 1}), ("acga", {})):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        model, opt, agg = acc_accord.prepare(accelerator, model, opt, name, **hp)
        rec = out[f"accum_{name}"] = []
        for micro in range(6):
            with accelerator.accumulate(model):
                accelerator.backward(_loss(model, _batch(rank, micro)))
                opt.step()
                opt.zero_grad()
            steps = opt.optimizer.steps if hasattr(opt.optimizer, "steps") else None
            rec.append((accelerator.sync_gradients, agg.comm.stats.calls, steps))
        agg.close()


def _worker(out_dir: str) -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    out: dict = {}
    _acga_against_build(rank, out, out_dir)
    _local_sgd(rank, out)
    _every_model_phase_algorithm(rank, out)
    _scaler(rank, out)
    _clip(rank, out)
    _bad_inputs(rank, out)
    _accumulation(rank, out)  # last: it sets the (process-wide) accumulation steps to 2
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.barrier()


# -- the launches --------------------------------------------------------------------------

def _torchrun(args: list[str], timeout: float) -> str:
    """Run a 2-process torchrun launch; its stdout. A launch that outlives ``timeout`` gets
    SIGTERM, on which torchrun stops its workers (each in a session of its own)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"torchrun {args[0]} did not finish in {timeout} s: {err[-3000:]}")
    assert proc.returncode == 0, out[-3000:] + err[-5000:]
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("accelerate")
    _torchrun([__file__, str(out)], timeout=120)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


ATOL = 1e-6


def test_acga_hook_matches_build(ranks):
    for out in ranks:
        assert out["acga_types"] == ("DistributedDataParallel", "AcceleratedOptimizer", "ACGA")
        for step in range(3):
            torch.testing.assert_close(out["acga_grads"][step], out["acga_ref_grads"][step],
                                       rtol=0, atol=ATOL)
            # ACGA's direction has norm <= 1: it is not the mean of the local gradients
            mean = (ranks[0]["acga_local"][step] + ranks[1]["acga_local"][step]) / 2
            assert (out["acga_grads"][step] - mean).abs().max() > 1e-3
        torch.testing.assert_close(out["acga_params"], out["acga_ref_params"], rtol=0,
                                   atol=ATOL)
        # one allreduce per bucket and the weighted sum: more than 2 a step means the hook
        # saw several buckets (DDP's first step has one)
        assert out["acga_buckets"] > 3 * 2
        assert out["acga_checkpoint"] == (True, True, True)
    for step in range(3):  # the replicas got the same aggregated gradient
        torch.testing.assert_close(ranks[0]["acga_grads"][step], ranks[1]["acga_grads"][step],
                                   rtol=0, atol=ATOL)


def test_local_sgd_turns_ddp_allreduce_off(ranks):
    for out in ranks:
        assert out["lsgd_inner"] == "_StepWithNotedLoss"
        assert out["lsgd_broadcast_buffers"] is False
        assert out["local_sgd_steps"] == 4 and out["local_sgd_syncs"] == 2.0
        for rec in out["local_sgd"]:
            # DDP left each rank's own gradient in place, and did not overwrite the
            # BatchNorm statistics with rank 0's before the forward
            torch.testing.assert_close(rec["grads"], rec["local"], rtol=0, atol=ATOL)
            torch.testing.assert_close(rec["fwd_buffers"], rec["local_buffers"], rtol=0,
                                       atol=ATOL)
    r0, r1 = ranks[0]["local_sgd"], ranks[1]["local_sgd"]
    for step in range(4):
        assert (r0[step]["grads"] - r1[step]["grads"]).abs().max() > 1e-2
        synced = step % 2 == 1  # period 2: steps 1 and 3
        for key in ("params", "buffers"):
            gap = float((r0[step][key] - r1[step][key]).abs().max())
            if synced:
                assert gap <= ATOL, (step, key, gap)
            else:
                assert gap > 1e-3, (step, key, gap)


def test_every_model_phase_algorithm_steps(ranks):
    names = sorted(n for n in accord.REGISTRY if n not in HOOK_ALGORITHMS)
    for out in ranks:
        assert out["smoke"] == {n: (3, True) for n in names}
        assert "note_loss" in out["lsgd_no_loss"] and "\n" not in out["lsgd_no_loss"]


def test_scaler_moves_acga_into_the_optimizer(ranks):
    for out in ranks:
        assert out["scaler_inner"] == "_StepWithNotedLoss"
        assert out["scaler_ratio"] == pytest.approx([1024.0, 1024.0], rel=1e-5)
        torch.testing.assert_close(out["scaler_params"], out["scaler_ref_params"], rtol=0,
                                   atol=ATOL)
        # skipped on both ranks (parameters unchanged), both scalers backed off
        assert out["scaler_skip"] == (True, 1, 512.0, True)


def test_bad_inputs_are_refused_in_one_line(ranks):
    expected = {
        "unknown_algorithm": ("ValueError", "unknown algorithm 'nope'", "local_sgd"),
        "unknown_hyperparameter": ("ValueError", "'speed'", "momentum"),
        "not_accelerator": ("TypeError", "accelerate.Accelerator"),
        "prepared_model": ("ValueError", "already prepared", "plain model"),
        "prepared_optimizer": ("ValueError", "already prepared", "plain torch optimizer"),
        "wrapped_optimizer": ("ValueError", "accord.wrap", "plain torch optimizer"),
        "foreign_parameters": ("ValueError", "not a trainable parameter", "model.parameters()"),
        "comm_hook": ("ValueError", "comm_hook='fp16'", "allowed: comm_hook left at 'no'"),
        "note_loss": ("TypeError", "SGD", "accord.integrations.accelerate.prepare returned"),
        "sync_each_batch": ("ValueError", "sync_each_batch=True", "sync_each_batch=False"),
        "clip_negative": ("ValueError", "clip_grad_norm is -1.0", "None (no clipping)"),
        "sync_each_batch_clip": ("ValueError", "the clip in the DDP hook",
                                 "sync_each_batch=False"),
    }
    for out in ranks:
        assert set(out["errors"]) == set(expected)
        for key, words in expected.items():
            msg = out["errors"][key]
            assert msg is not None and "\n" not in msg, (key, msg)
            assert msg.startswith(words[0] + ":"), (key, msg)
            for word in words[1:]:
                assert word in msg, (key, msg)


@pytest.mark.parametrize("name", ["allreduce", "local_sgd", "allreduce_scaled"])
def test_clip_grad_norm_clips_each_ranks_gradient_on_both_paths(ranks, name):
    for out in ranks:
        rec = out[f"clip_{name}"]
        hooked = name == "allreduce"  # a scaler moves allreduce into the optimizer
        assert (rec["inner"] == "_StepWithNotedLoss") is not hooked, rec["inner"]
        for step in range(2):
            torch.testing.assert_close(rec["params"][step], rec["oracle"][step], rtol=1e-5,
                                       atol=1e-6)
    # not vacuous: rank 1's gradient (its loss is 5x) was clipped, rank 0's was not
    assert max(ranks[0][f"clip_{name}"]["norms"]) < CLIP < min(ranks[1][f"clip_{name}"]["norms"])


def test_gradient_accumulation_steps_once_per_real_step(ranks):
    for out in ranks:
        rec = out["accum_local_sgd"]
        assert [r[0] for r in rec] == [False, True] * 3
        assert [r[2] for r in rec] == [0, 1, 1, 2, 2, 3]  # AggregatedOptimizer.steps
        assert [r[1] for r in rec] == [0, 1, 1, 2, 2, 3]  # one average per real step
        calls = [r[1] for r in out["accum_acga"]]  # the hook runs at sync steps only
        per_step = calls[1]
        assert per_step == 1  # the default on this model: one all-gather of the gradient
        assert calls == [0, per_step, per_step, 2 * per_step, 2 * per_step, 3 * per_step]


def test_example_script():
    out = _torchrun([str(ROOT / "examples" / "accelerate_train.py"), "--algo", "local_sgd",
                     "--steps", "30", "--accum", "2", "--timeout", str(TIMEOUT)], timeout=90)
    match = re.search(r"final test_acc=([0-9.]+)", out)
    assert match, out[-2000:]
    assert float(match.group(1)) > 0.5  # 10 classes: chance is 0.1


def test_one_process_is_refused():
    from accelerate.state import AcceleratorState, GradientState

    try:
        accelerator = accelerate.Accelerator(cpu=True)
        model = _mlp()
        with pytest.raises(RuntimeError, match="runs one process.*torchrun") as exc:
            acc_accord.prepare(accelerator, model, torch.optim.SGD(model.parameters(), lr=LR),
                               "acga")
        assert "\n" not in str(exc.value)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def test_import_accord_does_not_import_accelerate():
    code = """if True:
        import sys, accord
        assert 'accelerate' not in sys.modules, 'import accord imported accelerate'
        sys.modules['accelerate'] = None  # as if it were not installed
        try:
            import accord.integrations.accelerate
        except accord._extras.MissingExtra as exc:
            print(exc)
    """
    proc = subprocess.run([sys.executable, "-c", code], check=True, timeout=60,
                          capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    assert proc.stdout.count("\n") == 1
    assert "pip install 'accord[accelerate]'" in proc.stdout


if __name__ == "__main__":
    _worker(sys.argv[1])
