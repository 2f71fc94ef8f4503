"""Every bad input is refused before any worker starts, in one line naming the field.

The command line runs in-process (``cli.main``) with the launcher replaced by a function
that fails the test, so a refused input provably started no worker; the run directory
must not exist afterwards. Python API errors must be ValueError or TypeError (never the
RuntimeError about a missing process group, which would mean the check came too late).
"""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import FunctionType

import numpy as np
import pytest
import torch

import accord
from accord import cli
from accord.run import config, faults
from accord.run.config import ConfigError, TrainConfig, max_workers
from accord.run.validation import validate
from accord.tasks import linreg, shakespeare

SRC = Path(__file__).resolve().parents[1] / "src"
PLAY = shakespeare.MIN_PLAY_CHARS


class Launched(Exception):
    """Raised by the fake launcher: validation accepted the input."""


@pytest.fixture
def no_launch(monkeypatch):
    """The launcher fails the test; no torchrun environment leaks in."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)

    def launch(*args, **kwargs):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(cli, "launch", launch)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Data directories: shakespeare with an empty play, a non-UTF-8 play, plays of exactly
    the minimum length; fashion with a truncated file and an out-of-range label."""
    root = tmp_path_factory.mktemp("data")
    text = ("Who's there? Nay, answer me: stand, and unfold yourself.\n" * 40)
    dirs = {}
    for name, plays in {
        "empty_play": {"hamlet": text, "macbeth": ""},
        "latin1_play": {"hamlet": text, "tempest": None},
        "shortest_plays": {"hamlet": text[:PLAY], "macbeth": text[-PLAY:]},
    }.items():
        d = dirs[name] = root / name
        d.mkdir()
        for play, body in plays.items():
            path = d / f"{play}_gut.txt"
            if body is None:
                path.write_bytes(("caf\xe9 " * 200).encode("latin-1"))
            else:
                path.write_text(body, encoding="utf-8")
    for name, n_images, bad_label in (("truncated", 5, 0), ("bad_label", 10, 12)):
        d = dirs[name] = root / name
        d.mkdir()
        labels = np.arange(10, dtype=np.uint8) % 10
        labels[3] = bad_label or labels[3]
        for prefix in ("train", "t10k"):
            images = np.zeros((n_images, 28, 28), dtype=np.uint8)
            # the header always announces 10 images
            header = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 10, 28, 28)
            (d / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
                gzip.compress(header + images.tobytes()))
            (d / f"{prefix}-labels-idx1-ubyte").write_bytes(
                bytes([0, 0, 0x08, 1]) + struct.pack(">I", 10) + labels.tobytes())
    return dirs


# (id, arguments of `accord train`, start of the message, a further needle)
CLI_CASES = [
    ("lr-inf", ["--lr", "inf"], "lr: got inf", "a number > 0 and <= 1e+06"),
    ("lr-nan", ["--lr", "nan"], "lr: got nan", "a number > 0"),
    ("lr-huge", ["--lr", "1e300"], "lr: got 1e+300", "<= 1e+06"),
    ("lr-zero", ["--lr", "0"], "lr: got 0.0", "a number > 0"),
    ("wd-inf", ["--weight-decay", "inf"], "weight_decay: got inf", "a number >= 0"),
    ("wd-negative", ["--weight-decay", "-1"], "weight_decay: got -1.0", ">= 0"),
    ("momentum-one", ["--momentum", "1"], "momentum: got 1.0", "< 1"),
    ("momentum-nan", ["--momentum", "nan"], "momentum: got nan", ">= 0 and < 1"),
    ("timeout-inf", ["--timeout", "inf"], "timeout: got inf", "<= 604800"),
    ("timeout-tiny", ["--timeout", "1e-6"], "timeout: got 1e-06", "seconds >= 1"),
    ("timeout-below-min", ["--timeout", "0.99"], "timeout: got 0.99", "seconds >= 1"),
    ("timeout-zero", ["--timeout", "0"], "timeout: got 0.0", "seconds >= 1"),
    ("idle-inf", ["--idle-timeout", "inf"], "idle_timeout: got inf", "<= 604800"),
    ("idle-below-timeout", ["--idle-timeout", "10"], "idle_timeout: got 10.0",
     "seconds >= timeout (60)"),
    ("seed-negative", ["--seed", "-1"], "seed: got -1", "an integer >= 0"),
    ("seed-2**70", ["--seed", str(2**70)], f"seed: got {2**70}", "<= 2**63 - 1"),
    ("nccl-no-gpu", ["--backend", "nccl"], "backend: got 'nccl'", "is_available() is False"),
    ("nccl-too-few-gpus", ["--backend", "nccl", "--workers", "2"], "backend: got 'nccl'",
     "at most one worker per GPU (1 here)"),
    ("backend-mpi", ["--backend", "mpi"], "backend: got 'mpi'", "gloo, nccl"),
    ("device-cuda-no-gpu", ["--device", "cuda"], "device: got 'cuda'",
     "is_available() is False"),
    ("device-tpu", ["--device", "tpu"], "device: got 'tpu'", "auto, cpu, cuda"),
    ("linreg-batch-400GB", ["--task", "linreg", "--batch-size", "100000000"],
     "batch_size: got 100000000", "<= 16384 (task 'linreg': 64 MB"),
    ("digits-batch", ["--batch-size", "1438"], "batch_size: got 1438", "<= 1437"),
    ("batch-zero", ["--batch-size", "0"], "batch_size: got 0", ">= 1"),
    ("workers-10000", ["--workers", "10000"], "workers: got 10000", "per CPU core"),
    ("workers-above-bound", ["--workers", str(max_workers() + 1)], "workers: got",
     f"<= {max_workers()}"),
    ("workers-negative", ["--workers", "-3"], "workers: got -3", ">= 1"),
    ("accum-1e9", ["--accum-steps", "1000000000"], "accum_steps: got 1000000000",
     f"<= {config.MAX_ACCUM_STEPS}"),
    ("accum-zero", ["--accum-steps", "0"], "accum_steps: got 0", ">= 1"),
    ("set-accum-1e9", ["--set", "accum_steps=1e9"], "accum_steps: got 1000000000",
     f"<= {config.MAX_ACCUM_STEPS}"),
    ("steps-zero", ["--steps", "0"], "steps: got 0", ">= 1"),
    ("optimizer", ["--optimizer", "lbfgs"], "optimizer: got 'lbfgs'", "adamw"),
    ("nonfinite", ["--nonfinite", "sometimes"], "nonfinite: got 'sometimes'", "exclude"),
    ("log-every-zero", ["--log-every", "0"], "log_every: got 0", ">= 1"),
    ("label-empty", ["--label", ""], "label: got ''", "non-empty name"),
    ("delay-1e9", ["--fault", "delay:rank=0,seconds=1e9"], "fault 'delay:rank=0,seconds=1e9'",
     "seconds must be a number >= 0 and <= 1800 (the idle timeout"),
    ("delay-inf", ["--fault", "delay:rank=1,seconds=inf"], "fault ", "seconds must be"),
    ("median-1e9", ["--fault", "delay:rank=0,median=1e9,sigma=1"], "fault ",
     "median must be a number > 0 and <= 1800"),
    ("delay-above-idle", ["--idle-timeout", "100", "--fault", "delay:rank=all,seconds=101"],
     "fault ", "<= 100 (the idle timeout"),
    ("sigma-50", ["--fault", "delay:rank=0,median=1,sigma=50"], "fault ",
     "sigma must be a number >= 0 and <= 3"),
    ("slow-1e9", ["--fault", "slow:rank=0,factor=1e9"], "fault ",
     "factor must be a number >= 1 and <= 1000"),
    ("set-lr-abc", ["--set", "lr=abc"], "lr: got 'abc', allowed: a number > 0 and <= 1e+06",
     ""),
    ("set-batch-2.5", ["--set", "batch_size=2.5"], "batch_size: got '2.5'", "an integer"),
    ("set-log-every-1.5", ["--set", "log_every=1.5"], "log_every: got '1.5'", "an integer"),
    ("set-log-every-inf", ["--set", "log_every=inf"], "log_every: got 'inf'", "an integer"),
    ("set-oracle-maybe", ["--set", "oracle_lr=maybe"], "oracle_lr: got 'maybe'",
     "true or false"),
    ("set-idle-nan", ["--set", "idle_timeout=nan"], "idle_timeout: got nan", "seconds >="),
    ("set-weight-decay-inf", ["--set", "weight_decay=inf"], "weight_decay: got inf", ">= 0"),
    ("hyper-momentum-inf", ["--algo", "acga", "--set", "momentum=inf"],
     "hyperparameter 'momentum': got 'inf'", "< 1"),
    ("hyper-period-1e30", ["--algo", "local_sgd", "--set", "period=1e30"],
     "hyperparameter 'period'", "2**63 - 1"),
    ("hyper-timeout-tiny", ["--algo", "wagma", "--set", "timeout=1e-6"],
     "hyperparameter 'timeout'", "seconds >= 1"),
    ("shakespeare-empty-play", ["--task", "shakespeare", "--data-dir", "{empty_play}"],
     "task 'shakespeare': play ", "macbeth_gut.txt is too short (0 characters)"),
    ("shakespeare-not-utf8", ["--task", "shakespeare", "--data-dir", "{latin1_play}"],
     "task 'shakespeare': play ", "tempest_gut.txt is not UTF-8"),
    ("fashion-truncated", ["--task", "fashion", "--data-dir", "{truncated}"],
     "task 'fashion': Fashion-MNIST in ", "expected 7840 for shape (10, 28, 28)"),
    ("fashion-bad-label", ["--task", "fashion", "--data-dir", "{bad_label}"],
     "task 'fashion': Fashion-MNIST in ", "labels outside 0..9"),
]


@pytest.mark.parametrize("args,start,needle", [c[1:] for c in CLI_CASES],
                         ids=[c[0] for c in CLI_CASES])
def test_bad_cli_input_is_one_line_before_any_worker(tmp_path, capsys, monkeypatch, no_launch,
                                                     data, args, start, needle):
    if ("--backend" in args and "nccl" in args) or "cuda" in args:
        gpus = 0 if "--workers" not in args else 1
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    args = [a.format(**data) for a in args]
    out = tmp_path / "run"
    code = cli.main(["train", "--out", str(out), "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1, err
    assert err.startswith(f"accord train: error: {start}"), err
    assert needle in err
    assert any(word in err for word in ("allowed", "must be", "reinstall")), err
    assert not out.exists()


def test_a_bad_accord_native_is_one_line_before_any_worker(tmp_path, capsys, monkeypatch,
                                                          no_launch):
    monkeypatch.setenv("ACCORD_NATIVE", "yes")
    out = tmp_path / "run"
    code = cli.main(["train", "--out", str(out), "--no-progress", "--algo", "acga"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err == "accord train: error: ACCORD_NATIVE: got 'yes'; allowed: auto, off, on\n"
    assert not out.exists()


def test_bad_input_from_a_real_process_is_one_line(tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = str(SRC)
    proc = subprocess.run([sys.executable, "-m", "accord", "train", "--lr", "inf", "--out",
                           str(out)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "accord train: error: lr: got inf, allowed: a number > 0 and <= 1e+06"]
    assert not out.exists()


def _validate(**fields):
    def call(tmp_path):
        validate(TrainConfig(out=str(tmp_path / "run"), **fields))
    return call


def _build(name, params, **kwargs):
    def call(tmp_path):
        accord.build(name, params() if isinstance(params, FunctionType) else params, **kwargs)
    return call


def _leaf():
    return torch.zeros(3, requires_grad=True)


def _view():
    return [torch.zeros(4, requires_grad=True)[:2]]


def _twice():
    p = _leaf()
    return [p, p]


# (id, call, exception type, needle that names the argument)
API_CASES = [
    ("config-lr-string", _validate(lr="0.1"), TypeError, "lr: got '0.1'"),
    ("config-hyperparameters-none", _validate(hyperparameters=None), TypeError,
     "hyperparameters: got None"),
    ("config-batch-2.5", _validate(batch_size=2.5), TypeError, "batch_size: got 2.5"),
    ("config-log-every-1.5", _validate(log_every=1.5), TypeError, "log_every: got 1.5"),
    ("config-seed-string", _validate(seed="x"), TypeError, "seed: got 'x'"),
    ("config-seed-2**70", _validate(seed=2**70), ValueError, "seed: got"),
    ("config-workers-bool", _validate(workers=True), TypeError, "workers: got True"),
    ("config-steps-float", _validate(steps=10.0), TypeError, "steps: got 10.0"),
    ("config-lr-int-beyond-float", _validate(lr=10**400), ValueError, "lr: got"),
    ("config-timeout-nan", _validate(timeout=float("nan")), ValueError, "timeout: got nan"),
    ("config-oracle-string", _validate(oracle_lr="yes"), TypeError, "oracle_lr: got 'yes'"),
    ("config-algo-none", _validate(algo=None), TypeError, "algorithm name: got None"),
    ("config-faults-string", _validate(faults="crash:rank=1,step=5"), TypeError,
     "faults: got 'crash:rank=1,step=5', allowed: a list of fault spec"),
    ("config-faults-ints", _validate(faults=[3]), TypeError, "faults: got [3]"),
    ("config-hyper-list", _validate(algo="acga", hyperparameters=[("momentum", 0.5)]),
     TypeError, "hyperparameters: got"),
    ("build-module", _build("allreduce", torch.nn.Linear(2, 2)), TypeError,
     "params: got a module (Linear); allowed: an iterable of tensors, e.g. "
     "model.parameters()"),
    ("build-one-tensor", _build("allreduce", _leaf), TypeError, "params: got a single tensor"),
    ("build-view", _build("allreduce", _view), ValueError, "params: tensor 0"),
    ("build-twice", _build("allreduce", _twice), ValueError, "params: element 1 is listed twice"),
    ("build-none", _build("allreduce", None), TypeError, "params: got NoneType"),
    ("build-ints", _build("allreduce", [1, 2]), TypeError, "params: element 0 is int"),
    ("build-buffers-ints", _build("allreduce", lambda: [_leaf()], buffers=[1]), TypeError,
     "buffers: element 0 is int"),
    ("build-buffers-module", _build("allreduce", lambda: [_leaf()],
                                    buffers=torch.nn.BatchNorm1d(2)), TypeError,
     "buffers: got a module"),
    ("build-momentum-huge-int", _build("acga", lambda: [_leaf()], momentum=10**400),
     ValueError, "hyperparameter 'momentum'"),
    ("build-period-1e30", _build("local_sgd", lambda: [_leaf()], period=10**30), ValueError,
     "hyperparameter 'period'"),
    ("build-name-int", _build(3, lambda: [_leaf()]), TypeError, "algorithm name: got 3"),
    ("step-string", lambda _: accord.StepContext(step="3"), TypeError, "step: got '3'"),
    ("step-bool", lambda _: accord.StepContext(step=True), TypeError, "step: got True"),
    ("step-negative", lambda _: accord.StepContext(step=-1), ValueError, "step: got -1"),
    ("step-loss-vector", lambda _: accord.StepContext(step=0, loss=torch.zeros(3)),
     ValueError, "loss: got a tensor of shape (3,)"),
    ("step-loss-string", lambda _: accord.StepContext(step=0, loss="0.5"), TypeError,
     "loss: got '0.5'"),
    ("step-healthy-int", lambda _: accord.StepContext(step=0, healthy=1), TypeError,
     "healthy: got 1"),
    ("fault-parse-list", lambda _: faults.parse(["crash:rank=0,step=1"], 2, 10), TypeError,
     "fault: got ['crash:rank=0,step=1']"),
    ("parse-field-workers", lambda _: config.parse_field("workers", "abc"), ValueError,
     "workers: got 'abc'"),
    ("parse-field-seed-float", lambda _: config.parse_field("seed", "1.5"), ValueError,
     "seed: got '1.5'"),
    ("algorithms-validate-none", lambda _: accord.algorithms.validate("acga", None), TypeError,
     "hyperparameters of 'acga': got None"),
]


@pytest.mark.parametrize("call,kind,needle", [c[1:] for c in API_CASES],
                         ids=[c[0] for c in API_CASES])
def test_bad_api_input_is_a_one_line_value_or_type_error(tmp_path, call, kind, needle):
    with pytest.raises((ValueError, TypeError)) as err:
        call(tmp_path)
    assert isinstance(err.value, kind), repr(err.value)
    message = str(err.value)
    assert "\n" not in message and needle in message, message
    assert "allowed" in message, message
    assert not (tmp_path / "run").exists()


def test_config_type_errors_are_config_errors_too():
    """The CLI catches ConfigError: a wrong type must be one as well as a TypeError."""
    with pytest.raises(ConfigError):
        validate(TrainConfig(lr="0.1"), check_out=False)


# -- inputs at the bounds are accepted ----------------------------------------------------
GOOD_CLI = [
    ("lr-max", ["--lr", "1e6"]),
    ("weight-decay-max", ["--weight-decay", "1e6"]),
    ("timeouts-min", ["--timeout", "10", "--idle-timeout", "10"]),
    ("timeouts-max", ["--timeout", "604800", "--idle-timeout", "604800"]),
    ("seed-max", ["--seed", str(config.MAX_SEED)]),
    ("workers-max", ["--workers", str(max_workers())]),
    ("linreg-batch-max", ["--task", "linreg", "--batch-size", str(linreg.LinReg.max_batch_size)]),
    ("accum-max", ["--accum-steps", str(config.MAX_ACCUM_STEPS)]),
    ("set-accum-1e3", ["--set", "accum_steps=1e3"]),
    ("delay-equal-to-idle", ["--fault", "delay:rank=0,seconds=1800"]),
    ("lognormal-max", ["--fault", "delay:rank=all,median=1800,sigma=3"]),
    ("slow-max", ["--fault", "slow:rank=random,factor=1000"]),
    ("nccl-one-gpu-per-worker", ["--backend", "nccl", "--workers", "2"]),
    ("shakespeare-shortest-plays", ["--task", "shakespeare", "--data-dir", "{shortest_plays}"]),
]


@pytest.mark.parametrize("args", [c[1] for c in GOOD_CLI], ids=[c[0] for c in GOOD_CLI])
def test_inputs_at_the_bounds_reach_the_launcher(tmp_path, capsys, monkeypatch, data, args):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    seen = []

    def launch(cfg, **kwargs):
        seen.append(cfg)
        raise Launched

    monkeypatch.setattr(cli, "launch", launch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    args = [a.format(**data) for a in args]
    with pytest.raises(Launched):
        cli.main(["train", "--out", str(tmp_path / "run"), "--no-progress", *args])
    assert capsys.readouterr().err == ""
    cfg = seen[0]
    if "accum_steps=1e3" in args:
        assert cfg.accum_steps == 1000 and isinstance(cfg.accum_steps, int)


def test_validate_normalises_numbers_and_the_step_context_takes_numpy_ints(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "run"), lr=1, workers=np.int64(2), seed=np.int32(5),
                      faults=("crash:rank=1,step=3",))
    validate(cfg, check_out=False)
    assert type(cfg.lr) is float and type(cfg.workers) is int and type(cfg.seed) is int
    assert cfg.faults == ["crash:rank=1,step=3"]
    ctx = accord.StepContext(step=np.int64(3), loss=torch.tensor(0.5))
    assert type(ctx.step) is int and ctx.step == 3


def test_good_params_pass_every_check_up_to_the_process_group():
    """Leaf parameters of a module are accepted: the next complaint is the missing group."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    with pytest.raises(RuntimeError, match="process group"):
        accord.build("local_sgd", model.parameters(), buffers=model.buffers(), period=2**62)


@pytest.mark.parametrize("args,needle", [
    (["--accum-steps", "1e9"], "argument --accum-steps: invalid int value: '1e9'"),
    (["--workers", "abc"], "argument --workers: invalid int value: 'abc'"),
    (["--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
    (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_command_line_syntax_is_one_line_too(tmp_path, capsys, no_launch, args, needle):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and needle in err
    assert err.startswith(("accord train: error: ", "accord: error: "))
    assert not out.exists()
