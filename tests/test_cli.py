"""The command line end to end: real worker processes, metrics files, errors, failures."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from accord import cli
from accord.run.metrics import read_metrics

HANG_GUARD_S = 180  # a hung run fails the test instead of CI


def run_accord(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "accord", *args], capture_output=True,
                          text=True, timeout=HANG_GUARD_S, env=env, cwd=cwd)


def check_metrics(path: Path, *, world: int, algo: str, steps: int, log_every: int,
                  accuracy: bool) -> list[dict]:
    records = read_metrics(path)
    # one attempt: one start record, right after the header
    assert [r["type"] for r in records].count("start") == 1 and records[1]["type"] == "start"
    records = [r for r in records if r["type"] != "start"]
    header, *steps_recs, summary = records
    assert header["type"] == "header"
    assert header["algorithm"] == algo and header["world_size"] == world
    assert header["config"]["steps"] == steps
    assert header["torch_version"].startswith("2.13")
    assert "git_revision" in header
    assert [r["step"] for r in steps_recs] == list(range(log_every, steps + 1, log_every))
    for r in steps_recs:
        assert r["type"] == "step"
        for key in ("loss", "eval_loss", "time_s", "comm_bytes", "comm_calls", "comm_s"):
            assert isinstance(r[key], int | float), key
        assert ("eval_acc" in r) == accuracy
        assert isinstance(r["algo"], dict)
    bytes_seen = [r["comm_bytes"] for r in steps_recs]
    assert bytes_seen == sorted(bytes_seen) and bytes_seen[-1] > 0
    assert summary["type"] == "summary" and summary["status"] == "ok"
    assert summary["eval_loss"] == steps_recs[-1]["eval_loss"]
    assert summary["comm_bytes"] == steps_recs[-1]["comm_bytes"]
    return records


def test_train_writes_metrics(tmp_path):
    out = tmp_path / "acga"
    proc = run_accord("train", "--algo", "acga", "--task", "digits", "--workers", "2",
                      "--steps", "6", "--log-every", "3", "--out", str(out), "--no-progress",
                      "--tensorboard")
    assert proc.returncode == 0, proc.stderr
    assert "eval_acc" in proc.stdout
    records = check_metrics(out / "metrics.jsonl", world=2, algo="acga", steps=6, log_every=3,
                            accuracy=True)
    assert set(records[-2]["algo"]) >= {"coef_min", "coef_max", "grad_norm", "cos_mean"}
    assert records[0]["hyperparameters"]["momentum"] == 0.99
    check_tensorboard(out / "tensorboard", records)


def _train_every_algorithm(rank, world, out):
    from accord import algorithms
    from accord.run.config import TrainConfig
    from accord.run.train import run_worker

    for algo, cls in algorithms.REGISTRY.items():
        # a short period, so every algorithm communicates within the 6 steps
        hp = {"period": 2} if "period" in cls.hyperparameters else {}
        run_worker(TrainConfig(algo=algo, task="digits", workers=world, steps=6, log_every=3,
                               out=f"{out}/{algo}", progress=False, hyperparameters=hp))


def test_every_algorithm_writes_well_formed_metrics(tmp_path):
    """The training loop `accord train` runs, for every registered algorithm (one world)."""
    from worlds import run_world

    from accord import algorithms

    run_world(_train_every_algorithm, 2, str(tmp_path))
    for algo in algorithms.REGISTRY:
        check_metrics(tmp_path / algo / "metrics.jsonl", world=2, algo=algo, steps=6,
                      log_every=3, accuracy=True)


def check_tensorboard(logdir: Path, records: list[dict]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    steps = [r for r in records if r["type"] == "step"]
    for key, get in [("loss", lambda r: r["loss"]), ("eval_acc", lambda r: r["eval_acc"]),
                     ("algo/coef_min", lambda r: r["algo"]["coef_min"])]:
        events = acc.Scalars(key)
        assert [e.step for e in events] == [r["step"] for r in steps]
        assert [e.value for e in events] == pytest.approx([get(r) for r in steps], rel=1e-6)


def test_train_linreg_oracle_with_accumulation_and_settings(tmp_path):
    out = tmp_path / "lin"
    proc = run_accord("train", "--algo", "acga", "--task", "linreg", "--workers", "2",
                      "--steps", "20", "--log-every", "10", "--accum-steps", "2",
                      "--oracle-lr", "--set", "momentum=0", "--set", "train.batch_size=8",
                      "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    records = check_metrics(out / "metrics.jsonl", world=2, algo="acga", steps=20,
                            log_every=10, accuracy=False)
    assert records[0]["hyperparameters"]["momentum"] == 0.0
    assert records[0]["config"]["batch_size"] == 8
    assert records[0]["config"]["oracle_lr"] and records[0]["config"]["accum_steps"] == 2
    # ACGA's default route on a model this small (N x D <= GATHER_LIMIT): one all-gather of
    # the whole gradient per optimizer step, not per micro-step, and nothing else
    assert set(records[-1]["comm"]) == {"allgather"}
    assert records[-1]["comm"]["allgather"]["calls"] == 20
    assert records[-1]["comm"]["allgather"]["bytes"] == 20 * 1000 * 4  # its own D fp32 words


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_local_launcher_and_torchrun_give_the_same_run(tmp_path):
    """Same config, same seed: the local launcher and torchrun produce identical losses."""
    args = ["--algo", "normalized", "--task", "digits", "--steps", "4", "--log-every", "2",
            "--no-progress", "--seed", "5"]
    local = run_accord("train", *args, "--workers", "2", "--out", str(tmp_path / "a"))
    assert local.returncode == 0, local.stderr
    env = dict(os.environ, OMP_NUM_THREADS="1")
    tr = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={_free_port()}", "-m", "accord", "train", *args,
         "--out", str(tmp_path / "b")],
        capture_output=True, text=True, timeout=HANG_GUARD_S, env=env)
    assert tr.returncode == 0, tr.stderr
    check_metrics(tmp_path / "b" / "metrics.jsonl", world=2, algo="normalized", steps=4,
                  log_every=2, accuracy=True)
    a = [r.get("eval_loss") for r in read_metrics(tmp_path / "a" / "metrics.jsonl")[1:]]
    b = [r.get("eval_loss") for r in read_metrics(tmp_path / "b" / "metrics.jsonl")[1:]]
    assert a == b


BAD_INPUTS = [
    (["--algo", "nope"], "unknown algorithm 'nope'"),
    (["--task", "mnist3d"], "unknown task 'mnist3d'"),
    (["--set", "nope=1"], "unknown key 'nope'"),
    (["--algo", "acga", "--set", "algo.nope=1"], "unknown hyperparameter 'nope'"),
    (["--algo", "acga", "--set", "momentum=1.5"], "'momentum'"),
    (["--algo", "acga", "--set", "guard=maybe"], "'guard'"),
    (["--workers", "0"], "workers"),
    (["--steps", "0"], "steps"),
    (["--lr", "-1"], "lr"),
    (["--optimizer", "lbfgs"], "optimizer"),
    (["--batch-size", "100000"], "batch_size"),
    (["--oracle-lr"], "oracle_lr"),
    (["--fault", "crash:rank=9,step=1"], "rank must be in [0, 1]"),
    (["--set", "momentum"], "expected key=value"),
]


@pytest.mark.parametrize("args,needle", BAD_INPUTS, ids=[a[1] for a in BAD_INPUTS])
def test_bad_input_exits_2_before_any_worker(tmp_path, capsys, monkeypatch, args, needle):
    def no_launch(*a, **k):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(cli, "launch", no_launch)
    code = cli.main(["train", "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err
    assert err.count("\n") == 1 and err.startswith("accord train: error:")


def test_unwritable_output_directory(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = cli.main(["train", "--out", str(blocker / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "out:" in err and str(blocker / "run") in err


def test_bad_input_from_the_real_command_line(tmp_path):
    proc = run_accord("train", "--algo", "acga", "--set", "momentum=2", "--out",
                      str(tmp_path / "x"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "accord train: error: hyperparameter 'momentum': got '2', allowed: a number >= 0 "
        "and < 1"]
    assert not (tmp_path / "x" / "logs").exists()


@pytest.mark.parametrize("kind,needle", [("crash", "InjectedFault"), ("kill", "SIGKILL")])
def test_failing_worker_stops_the_run_and_is_named(tmp_path, kind, needle):
    out = tmp_path / kind
    proc = run_accord("train", "--algo", "acga", "--task", "digits", "--workers", "2",
                      "--steps", "50", "--log-every", "1", "--timeout", "20", "--out",
                      str(out), "--no-progress", "--fault", f"{kind}:rank=1,step=5")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("accord train: error: worker rank 1 failed")
    assert needle in last
    records = read_metrics(out / "metrics.jsonl")
    assert records[-1]["type"] == "summary" and records[-1]["status"] == "failed"
    assert [r["step"] for r in records if r["type"] == "step"] == [1, 2, 3, 4, 5]


def test_list_prints_every_algorithm(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("allreduce", "normalized", "acga"):
        assert any(line.startswith(name + " ") for line in out.splitlines())


def test_metrics_are_strict_json(tmp_path):
    # NaN/inf would make the file unreadable by strict parsers; the writer refuses them
    from accord.run.metrics import MetricsWriter

    w = MetricsWriter(tmp_path / "m.jsonl")
    with pytest.raises(ValueError):
        w.write({"x": float("nan")})
    w.write({"x": None})  # what the loop writes for a non-finite value instead
    w.close()
    assert [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()] == [
        {"x": None}]


def test_terminated_launcher_leaves_no_worker_behind(tmp_path):
    import signal
    import time

    out = tmp_path / "term"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "accord", "train", "--workers", "2",
                             "--steps", "100000", "--log-every", "5", "--out", str(out),
                             "--no-progress"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + HANG_GUARD_S
    while not (metrics.exists() and '"step"' in metrics.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    time.sleep(1.0)
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout
    assert left.strip() == ""
