"""accord.integrations.lightning.AccordStrategy under torchrun with 2 processes
(tests/lightning_driver.py
runs every scenario in one launch; each rank saves what it saw)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from worlds import free_port

pytest.importorskip("lightning")

ROOT = Path(__file__).resolve().parent.parent



def _torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                           "2", "--master_port", str(free_port()), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("lightning")
    proc = _torchrun(str(ROOT / "tests" / "lightning_driver.py"), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def test_allreduce_through_the_strategy_equals_lightning_ddp(ranks):
    for r in ranks:
        torch.testing.assert_close(r["allreduce"], r["ddp"], rtol=1e-6, atol=1e-7)
    assert _diff(ranks[0]["allreduce"], ranks[1]["allreduce"]) == 0


CLIP = 3.0  # lightning_driver.CLIP


def test_acga_through_the_hook_equals_accord_build(ranks):
    # with clip_grad_norm: the reference clips each rank's gradient with torch's
    # clip_grad_norm_, then aggregates
    for r in ranks:
        torch.testing.assert_close(r["acga"], r["acga_native"], rtol=1e-5, atol=1e-6)
    norms = ranks[0]["acga_norms"] + ranks[1]["acga_norms"]
    assert min(norms) < CLIP < max(norms)  # the clip acted at some steps, not at all


def test_ddp_options_pass_as_ddp_kwargs(ranks):
    for r in ranks:
        assert r["acga_bucket_view"] is True


@pytest.mark.parametrize("algo,period", [("local_sgd", 3), ("easgd", 2)])
def test_model_phase_equals_the_native_loop_and_replicas_differ_between_syncs(ranks, algo,
                                                                              period):
    for r in ranks:
        torch.testing.assert_close(r[algo], r[f"{algo}_native"], rtol=1e-6, atol=1e-7)
    if algo == "local_sgd":  # run with clip_grad_norm, which acted at some steps
        norms = ranks[0]["local_sgd_norms"] + ranks[1]["local_sgd_norms"]
        assert min(norms) < CLIP < max(norms)
    steps0, steps1 = ranks[0][f"{algo}_steps"], ranks[1][f"{algo}_steps"]
    gaps = [_diff(a, b) for a, b in zip(steps0, steps1, strict=True)]
    assert gaps[0] > 1e-3  # no gradient allreduce: different data, different replicas
    if algo == "local_sgd":  # identical right after each averaging step, apart otherwise
        for step, gap in enumerate(gaps):
            assert (gap == 0) == ((step + 1) % period == 0), (step, gaps)
    else:
        assert all(g > 1e-3 for g in gaps), gaps  # elastic: pulled together, never equal


def test_asynchronous_wagma_runs_and_validates(ranks):
    assert ranks[0]["wagma_val"] == ranks[1]["wagma_val"] < 2.0


def test_validation_runs_on_the_consensus_model(ranks):
    mean = (ranks[0]["val_final"] + ranks[1]["val_final"]) / 2
    assert _diff(ranks[0]["val_final"], ranks[1]["val_final"]) > 1e-3  # replicas differ
    for r in ranks:
        torch.testing.assert_close(r["val_seen"], mean, rtol=1e-6, atol=1e-7)


def test_a_checkpoint_saved_during_validation_keeps_each_replica(ranks):
    # ModelCheckpoint saves while validation has the consensus model swapped in: the top
    # level is that model, and each rank's entry is its own replica, not the consensus
    mean = (ranks[0]["val_final"] + ranks[1]["val_final"]) / 2
    for r in ranks:
        torch.testing.assert_close(r["mc_top"], mean, rtol=1e-6, atol=1e-7)
        assert torch.equal(r["mc_replica"], r["val_final"])


@pytest.mark.parametrize("algo", ["local_sgd", "easgd"])
def test_the_checkpoints_top_level_model_is_the_consensus(ranks, algo):
    at0, at1 = ranks[0][f"at_checkpoint_{algo}"], ranks[1][f"at_checkpoint_{algo}"]
    mean = (at0 + at1) / 2
    expected = mean if algo == "local_sgd" else ranks[0][f"centre_{algo}"]
    if algo == "easgd":  # not vacuous: the centre is neither the mean nor rank 0's replica
        assert _diff(expected, mean) > 1e-4 and _diff(expected, at0) > 1e-4
    for r in ranks:
        torch.testing.assert_close(r[f"ckpt_top_{algo}"], expected, rtol=1e-6, atol=1e-7)
    for rank, r in enumerate(ranks):  # and each replica below it
        assert torch.equal(r[f"ckpt_replica_{algo}"], ranks[rank][f"at_checkpoint_{algo}"])


@pytest.mark.parametrize("algo", ["local_sgd", "easgd"])
def test_traffic_counters_resume_from_the_checkpoint(ranks, algo):
    for r in ranks:
        # the resumed run's counters = those of the uninterrupted 16 steps (no second
        # initial broadcast, and the first 8 steps' traffic carried over)
        assert r[f"resumed_comm_{algo}"] == r[f"straight_comm_{algo}"]
    assert ranks[0][f"straight_comm_{algo}"]["initial_broadcast"][1] > 0


def test_aggregator_metrics_reach_the_logger(ranks):
    with open(ranks[0]["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    logged = [row for row in rows if row.get("accord/comm_bytes")]
    assert len(logged) == 4  # every 2 of the 8 optimizer steps
    # the model is 16 x 6 + 16 + 16 + 1 = 129 floats: the initial broadcast from rank 0,
    # then local_sgd (period 3) averages after steps 3 and 6 of the 8
    sent = [float(row["accord/comm_bytes"]) for row in logged]
    assert sent == [1 * 129 * 4, 2 * 129 * 4, 3 * 129 * 4, 3 * 129 * 4]
    assert "accord/syncs" in rows[0]


def test_gradient_accumulation_calls_the_aggregator_once_per_optimizer_step(ranks):
    for r in ranks:
        assert r["accumulate_steps"] == 4  # 8 batches, accumulate 2
        assert r["accumulate_acga_gathers"] == 4


def test_lightnings_clip_after_the_hook_is_named_in_one_warning(ranks):
    # that run sets Trainer(gradient_clip_val=0.5) with acga: once, on rank 0
    warned = ranks[0]["clip_after_warnings"]
    assert len(warned) == 1 and "\n" not in warned[0], warned
    assert "gradient_clip_val=0.5" in warned[0] and "clip_grad_norm=" in warned[0]
    assert ranks[1]["clip_after_warnings"] == []


@pytest.mark.parametrize("algo", ["local_sgd", "easgd"])
def test_resumed_run_equals_the_uninterrupted_one(ranks, algo):
    # the checkpoint was taken between syncs, so each rank had to get its own replica back
    # (and EASGD its centre)
    assert _diff(ranks[0][f"at_checkpoint_{algo}"], ranks[1][f"at_checkpoint_{algo}"]) > 1e-3
    for r in ranks:
        assert r[f"resumed_steps_{algo}"] == 16
        torch.testing.assert_close(r[f"resumed_{algo}"], r[f"straight_{algo}"], rtol=0, atol=0)


def test_a_checkpoint_of_another_algorithm_is_refused(ranks):
    for r in ranks:
        assert r["wrong_algo"].startswith("checkpoint") and "'easgd'" in r["wrong_algo"]


def test_bad_strategy_arguments_are_one_line_errors():
    from accord.integrations.lightning import AccordStrategy

    with pytest.raises(ValueError, match="unknown hyperparameter 'momentun'"):
        AccordStrategy("acga", momentun=0.9)
    with pytest.raises(ValueError, match="unknown algorithm"):
        AccordStrategy("sgd")
    with pytest.raises(ValueError, match="model-phase algorithm"):
        AccordStrategy("easgd", ddp_kwargs={"static_graph": True})
    # a DDP option given as a hyperparameter: one line naming ddp_kwargs=
    for algo in ("acga", "easgd"):
        with pytest.raises(ValueError) as err:
            AccordStrategy(algo, find_unused_parameters=True)
        text = str(err.value)
        assert "\n" not in text and "DistributedDataParallel option" in text
        assert "ddp_kwargs={'find_unused_parameters': True}" in text
    with pytest.raises(ValueError, match=r"clip_grad_norm is 0, allowed: None"):
        AccordStrategy("acga", clip_grad_norm=0)


def test_the_example_runs():
    proc = _torchrun("examples/lightning_train.py", "--algos", "ddp,acga,local_sgd",
                     "--epochs", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split()[0]: float(line.split()[1]) for line in proc.stdout.splitlines()
            if line.split() and line.split()[0] in ("ddp", "acga", "local_sgd")}
    assert set(rows) == {"ddp", "acga", "local_sgd"}
    assert all(acc > 0.5 for acc in rows.values()), rows  # one epoch: far above chance (0.1)
