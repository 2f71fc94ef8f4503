"""Truthful run records: the rank that failed first is the one named (crash, kill, hang;
local launcher and torchrun), a diverged run says so, and run directories never mix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from accord import report
from accord.run import failures, rundir
from accord.run.metrics import read_metrics

ACCORD = [sys.executable, "-m", "accord"]
FAULTS = {"crash": "crash:rank=1,step=4", "kill": "kill:rank=1,step=4",
          "hang": "delay:rank=1,seconds=60,start=4,end=5"}


# -- attribution from evidence (no processes) -----------------------------------------------
def _evidence(logs: Path, errors: dict, beats: dict) -> None:
    logs.mkdir(parents=True, exist_ok=True)
    for rank, (t, message) in errors.items():
        (logs / f"rank{rank}.error").write_text(json.dumps(
            {"rank": rank, "time": t, "error": message, "step": 7}))
    for rank, (pid, step, phase, t) in beats.items():
        (logs / f"rank{rank}.heartbeat").write_text(f"{pid} {os.uname().nodename} {step} "
                                                    f"{phase} {t}\n")


def test_the_primary_error_wins_over_earlier_consequences(tmp_path):
    _evidence(tmp_path, {0: (10.0, "RuntimeError: Connection closed by peer"),
                         1: (11.0, "InjectedFault: boom"),
                         2: (9.0, "RuntimeError: Timed out waiting 3000ms for recv")}, {})
    f = failures.attribute(tmp_path, 3)
    assert (f.rank, f.error, f.step) == (1, "InjectedFault: boom", 7)
    assert [c["rank"] for c in f.consequences] == [0, 2]


def test_a_signal_nobody_sent_is_the_root_cause(tmp_path):
    _evidence(tmp_path, {0: (10.0, "RuntimeError: Connection reset by peer")},
              {1: (123, 4, "compute", 9.5)})
    exits = {0: failures.Exit(1, 10.1), 1: failures.Exit(-9, 10.05),
             2: failures.Exit(-15, 13.0, stopped=True)}
    f = failures.attribute(tmp_path, 3, exits)
    assert (f.rank, f.error, f.step) == (1, "killed by SIGKILL", 4)


def test_a_rank_silent_inside_a_step_while_others_time_out_hung(tmp_path):
    _evidence(tmp_path, {0: (20.0, "RuntimeError: Timed out waiting 3000ms for recv"),
                         2: (20.1, "RuntimeError: Timed out waiting 3000ms for recv")},
              # live pids (this process): a rank whose pid is gone reads as killed
              {0: (os.getpid(), 4, "aggregate", 16.9), 1: (os.getpid(), 4, "compute", 16.8),
               2: (os.getpid(), 4, "aggregate", 16.9)})
    f = failures.attribute(tmp_path, 3)
    assert f.rank == 1 and f.error.startswith("hung: no progress for 3 s inside step 4")


def test_a_process_gone_without_a_report_is_found_by_its_pid(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _evidence(tmp_path, {0: (10.0, "RuntimeError: Connection closed by peer")},
              {0: (os.getpid(), 3, "aggregate", 9.0), 1: (gone.pid, 3, "compute", 8.0)})
    f = failures.attribute(tmp_path, 2, ignore=0)
    assert (f.rank, f.step) == (1, 3) and "without a report" in f.error


def test_consequences_are_recognised():
    assert failures.is_consequence("RuntimeError: [pair.cc:553] Connection closed by peer")
    assert failures.is_consequence("RuntimeError: rank 2: background exchange failed in round 3")
    assert not failures.is_consequence("InjectedFault: injected crash on rank 1 at step 4")
    assert not failures.is_consequence("ValueError: bad shape")


# -- end to end ---------------------------------------------------------------------------
def _train(out: Path, *args: str, workers: int = 2, torchrun: bool = False,
           timeout: float = 3.0) -> subprocess.CompletedProcess:
    common = ["--algo", "allreduce", "--steps", "12", "--out", str(out), "--no-progress",
              "--log-every", "2", "--timeout", str(timeout), *args]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={workers}",
               "--standalone", "-m", "accord", "train", *common]
    else:
        cmd = [*ACCORD, "train", "--workers", str(workers), *common]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def _summary(out: Path) -> dict:
    return read_metrics(out / "metrics.jsonl")[-1]


# 4 workers: the same code path as 2, slower (a slow variant)
@pytest.mark.parametrize("workers", [2, pytest.param(4, marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_the_failed_rank_is_named_everywhere(tmp_path, kind, workers):
    out = tmp_path / "run"
    proc = _train(out, "--fault", FAULTS[kind], workers=workers)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("accord train: error: worker rank 1 "), \
        proc.stderr  # one line on the terminal, naming rank 1
    summary = _summary(out)
    assert summary["status"] == "failed" and summary["failed_rank"] == 1
    assert summary["failed_step"] == 4
    assert {c["rank"] for c in summary["consequences"]} <= set(range(workers)) - {1}
    expect = {"crash": "InjectedFault", "kill": "SIGKILL", "hang": "hung"}[kind]
    assert expect in summary["error"]
    # and the report blames the same rank
    text = report.write_report(out.parent).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `run` | failed"))
    assert f"rank 1 at step 4: {summary['error'][:20]}" in row


# a hang is named under torchrun as under the local launcher (covered there): slow variant
@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if k == "hang" else k
                                  for k in sorted(FAULTS)])
def test_under_torchrun_rank_0_names_the_failed_rank(tmp_path, kind):
    out = tmp_path / "run"
    proc = _train(out, "--fault", FAULTS[kind], torchrun=True)
    assert proc.returncode != 0
    summary = _summary(out)
    assert summary["status"] == "failed" and summary["failed_rank"] == 1, summary
    assert not (out / ".accord.lock").exists()


def test_a_config_error_under_torchrun_is_one_line_from_rank_0(tmp_path):
    proc = _train(tmp_path / "run", "--set", "momentum=2", "--optimizer", "sgd",
                  torchrun=True)
    assert proc.returncode != 0
    assert proc.stderr.count("accord train: error: momentum") == 1


def test_a_diverged_run_says_so_and_exits_3(tmp_path):
    out = tmp_path / "run"
    proc = _train(out, "--fault", "nan:rank=1,step=3", "--nonfinite", "off")
    assert proc.returncode == 3, proc.stderr
    assert "diverged at step 4: non-finite parameters" in proc.stderr
    summary = _summary(out)
    assert summary["status"] == "diverged" and summary["diverged_step"] == 4
    assert summary["steps"] == 4  # every rank stopped at that record


def test_an_interrupted_run_is_recorded_as_interrupted(tmp_path):
    out = tmp_path / "run"
    cmd = [*ACCORD, "train", "--algo", "allreduce", "--workers", "2", "--steps", "200",
           "--out", str(out), "--no-progress", "--log-every", "2",
           "--fault", "delay:rank=all,seconds=0.05"]
    # a shell runs a background job with SIGINT ignored, and an ignored signal stays
    # ignored across exec: give the launcher the default disposition a terminal has
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for _ in range(600):  # until the run has logged a step
        time.sleep(0.1)
        path = out / "metrics.jsonl"
        if path.exists() and '"type": "step"' in path.read_text():
            break
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert _summary(out)["status"] == "interrupted"


def test_reruns_never_mix_with_earlier_runs(tmp_path):
    out = tmp_path / "run"
    assert _train(out).returncode == 0
    before = (out / "metrics.jsonl").read_text()
    # a finished run is refused, and left as it was
    proc = _train(out)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
    assert (out / "metrics.jsonl").read_text() == before
    # a failed one too
    failed = tmp_path / "failed"
    assert _train(failed, "--fault", "crash:rank=1,step=2").returncode == 1
    proc = _train(failed)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    # --overwrite clears the old run first: nothing of it is left
    (failed / "logs" / "rank7.log").write_text("an old worker's log")
    assert _train(failed, "--overwrite").returncode == 0
    assert not (failed / "logs" / "rank7.log").exists()
    assert not (failed / "logs" / "rank1.error").exists()
    records = read_metrics(failed / "metrics.jsonl")
    assert [r["type"] for r in records].count("header") == 1
    assert records[-1]["status"] == "ok"


def test_a_live_run_holds_its_directory(tmp_path):
    out = tmp_path / "live"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out.mkdir()
        (out / rundir.LOCK).write_text(f"{sleeper.pid} {os.uname().nodename}\n")
        proc = _train(out)
        assert proc.returncode == 2 and "in use by a live run" in proc.stderr
        assert not (out / "metrics.jsonl").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # the lock of a process that is gone is taken over
    assert _train(out).returncode == 0
    assert not (out / rundir.LOCK).exists()
