"""The last input holes: inputs that were accepted, refused late, or refused with a message
that names nothing, and refusals that still left a new ``--out`` directory behind.

Every command line runs in-process (``cli.main``) with the launchers replaced by functions
that fail the test, so a refusal provably started no worker; a refused command writes
nothing (its ``--out`` does not exist afterwards). The Python API cases run in a gloo world
of one in this process.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_report import write_run

import accord
from accord import algorithms, bench, checkpoint, cli, report
from accord.run.config import TrainConfig
from accord.run.validation import validate


@pytest.fixture
def no_launch(monkeypatch):
    """Any worker or bench run fails the test; no torchrun environment leaks in."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)

    def launched(*args, **kwargs):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(cli, "launch", launched)
    monkeypatch.setattr(bench, "launch", launched)
    monkeypatch.setattr(bench, "run_bench", launched)
    monkeypatch.setattr(bench, "run_tuned", launched)


def _refused(capsys, argv: list[str], needle: str, command: str = "train") -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith(f"accord {command}: error: "), err
    assert needle in err, err
    return err


# -- accord train -----------------------------------------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["--compress", "powersgd:"], "compress: got 'powersgd:', allowed:"),
    (["--compress", "bf16:"], "compress: got 'bf16:', allowed:"),
    (["--resume", "auto", "--overwrite"], "overwrite: got --overwrite with --resume auto; "
                                          "allowed: one of them"),
    (["--algo", "wagma", "--timeout", "30", "--set", "idle_timeout=5"],
     "hyperparameter 'idle_timeout': got '5', allowed: seconds >= 60"),
    (["--algo", "wagma", "--timeout", "120", "--set", "idle_timeout=90"],
     "hyperparameter 'idle_timeout': got '90', allowed: seconds >= 120 (--timeout"),
    (["--algo", "wagma", "--set", "timeout=100", "--set", "idle_timeout=50"],
     "hyperparameter 'idle_timeout': got '50', allowed: seconds >= 100 (the algorithm's "
     "timeout"),
    (["--algo", "wagma", "--set", "timeout=3600"],
     "hyperparameter 'timeout': got '3600', allowed: seconds >= 1 and <= 1800"),
    (["--resume", "AUTO"], "resume: got 'AUTO', allowed: auto or the path of a checkpoint "
                           "directory (OUT/checkpoints/step-<S>); 'AUTO' does not exist"),
], ids=["powersgd-empty-rank", "bf16-colon", "resume-and-overwrite", "wagma-idle-below-own",
        "wagma-idle-below-run", "wagma-idle-below-set", "wagma-timeout-above-idle",
        "resume-AUTO"])
def test_train_refuses_in_one_line_and_writes_nothing(tmp_path, capsys, no_launch, args,
                                                      needle):
    out = tmp_path / "new" / "run"
    _refused(capsys, ["train", "--out", str(out), "--no-progress", *args], needle)
    assert not (tmp_path / "new").exists()


def test_wagma_timeouts_in_order_are_accepted(tmp_path, capsys, no_launch):
    """Not vacuous: the same options in the right order reach the launcher."""
    with pytest.raises(AssertionError, match="a worker was started"):
        cli.main(["train", "--out", str(tmp_path / "run"), "--no-progress", "--algo", "wagma",
                  "--timeout", "30", "--set", "idle_timeout=60"])


@pytest.fixture(scope="module")
def one_worker_checkpoint(tmp_path_factory):
    """A checkpoint of a 1-worker allreduce run, written in this process (no group)."""
    root = tmp_path_factory.mktemp("ckpt")
    cfg = TrainConfig(algo="allreduce", workers=1, steps=10, out=str(root))
    validate(cfg, check_out=False)
    model = torch.nn.Linear(64, 10)
    return checkpoint.save(root / "checkpoints" / "step-5", model, step=5,
                           config=cfg.fingerprint())


@pytest.mark.parametrize("args,needle", [
    (["--workers", "2"], "written by 1 workers, this run has 2"),
    (["--workers", "1", "--algo", "acga"], "algo was 'allreduce', this run has 'acga'"),
], ids=["another-world-size", "another-algorithm"])
def test_a_refused_resume_leaves_no_new_out(tmp_path, capsys, no_launch, one_worker_checkpoint,
                                           args, needle):
    out = tmp_path / "new" / "run"
    _refused(capsys, ["train", "--out", str(out), "--no-progress", "--steps", "10",
                      "--resume", str(one_worker_checkpoint), *args], needle)
    assert not (tmp_path / "new").exists()


# -- accord bench ---------------------------------------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["--preset", "quick", "--steps", "-5"], "steps: got -5, allowed: an integer >= 1"),
    (["--preset", "quick", "--steps", "50"], "steps: got 50 with --preset quick, whose runs "
                                             "set their own steps; allowed: --steps only"),
    (["--algos", "allreduce", "--steps", "4", "--tune", "lr=-1,0.1"],
     "run allreduce (digits, 4 workers): lr: got -1.0, allowed: a number > 0"),
    (["--algos", "allreduce", "--steps", "4", "--tune", "lr=nan,0.1"],
     "run allreduce (digits, 4 workers): lr: got nan, allowed: a number > 0"),
    (["--algos", "allreduce", "--steps", "4", "--tune", "lr=0.1,0.2", "--tune-seed", "-5"],
     "--tune-seed: got -5; allowed: integers from 0"),
], ids=["preset-negative-steps", "preset-steps", "tune-negative-lr", "tune-nan-lr",
        "tune-seed-negative"])
def test_bench_refuses_in_one_line_and_writes_nothing(tmp_path, capsys, no_launch, args,
                                                      needle):
    out = tmp_path / "new" / "bench"
    _refused(capsys, ["bench", "--out", str(out), "--no-progress", *args], needle, "bench")
    assert not (tmp_path / "new").exists()


# -- accord report --------------------------------------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["--target-acc", "-1"], "--target-acc: got -1.0, allowed: a number from 0 to 1"),
    (["--target-acc", "2"], "--target-acc: got 2.0, allowed: a number from 0 to 1"),
    (["--target-loss", "-1"], "--target-loss: got -1.0, allowed: a finite number >= 0"),
], ids=["acc-negative", "acc-above-1", "loss-negative"])
def test_report_refuses_targets_out_of_range(tmp_path, capsys, args, needle):
    write_run(tmp_path / "runs", "allreduce/seed0", algo="allreduce", seed=0)
    out = tmp_path / "report"
    code = report.run(report_args([str(tmp_path / "runs"), "--out", str(out), *args]))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and needle in err, err
    assert not out.exists()
    # the bounds themselves are targets
    assert report.write_report(tmp_path / "runs", out, target_acc=1.0, target_loss=0.0,
                               figures=False, warn=lambda m: None).is_file()


def report_args(argv: list[str]):
    import argparse

    parser = argparse.ArgumentParser()
    report.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["report", *argv])


# -- the Python API (a gloo world of one in this process) -----------------------------------

def test_numpy_scalars_are_numbers(world_of_one):
    model = torch.nn.Linear(3, 2)
    agg = accord.build("acga", model.parameters(), momentum=np.float32(0.5))
    assert agg.hp["momentum"] == 0.5 and type(agg.hp["momentum"]) is float
    agg = accord.build("local_sgd", model.parameters(), period=np.int64(4))
    assert agg.hp["period"] == 4 and type(agg.hp["period"]) is int
    assert algorithms.validate("local_sgd", {"period": np.float64(4.0)})["period"] == 4
    # still refused: a numpy bool, a non-integral float for an int, out of range
    for hp in ({"period": np.float32(2.5)}, {"period": np.int64(0)}, {"period": np.bool_(1)}):
        with pytest.raises(ValueError, match="hyperparameter 'period'"):
            algorithms.validate("local_sgd", hp)
    with pytest.raises(ValueError, match="hyperparameter 'momentum'"):
        algorithms.validate("acga", {"momentum": np.float32("nan")})


def test_wrap_refuses_an_optimizer_that_needs_a_closure(world_of_one):
    model = torch.nn.Linear(3, 2)
    with pytest.raises(TypeError) as err:
        accord.wrap(torch.optim.LBFGS(model.parameters()), "allreduce")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("optimizer: got LBFGS, whose step() requires closure")
    assert "allowed: an optimizer whose step() takes no closure" in message
    accord.wrap(torch.optim.SGD(model.parameters(), lr=0.1), "allreduce").close()


@pytest.mark.parametrize("step,kind", [(-3, ValueError), (2.5, TypeError), (True, TypeError)])
def test_save_refuses_a_step_that_is_not_a_count(tmp_path, step, kind):
    with pytest.raises(kind, match=r"^step: got .*allowed: an integer >= 0"):
        checkpoint.save(tmp_path / "ckpt", torch.nn.Linear(3, 2), step=step)
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("name", sorted(algorithms.list_algorithms()))
def test_every_aggregator_refuses_use_after_close(world_of_one, name):
    hp = {"asynchronous": True} if name == "easgd" else {}
    model = torch.nn.Linear(3, 2)
    agg = accord.build(name, model.parameters(), **hp)
    ctx = accord.StepContext(step=0, loss=1.0)
    model(torch.ones(1, 3)).sum().backward()
    agg.after_backward(ctx)  # open: works
    agg.after_step(ctx)
    agg.close()
    agg.close()  # idempotent
    for hook in (agg.after_backward, agg.after_step):
        with pytest.raises(RuntimeError) as err:
            hook(accord.StepContext(step=1, loss=1.0))
        message = str(err.value)
        assert "\n" not in message and f"({name!r})" in message
        assert f"{hook.__name__} called after close()" in message
