"""accord train --checkpoint-every / --resume: a resumed run is the uninterrupted one (bit
for bit for synchronous algorithms), metrics.jsonl reads as one run, a crash costs only the
steps since the last checkpoint, and unusable checkpoints are refused or skipped with one
line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from worlds import free_port

TIME_FIELDS = {"time_s", "comm_s", "seconds", "time", "steps_per_s", "worker_time_s",
               "wait_s", "train_s", "attempts", "record_lag_s", "record_s"}


def _train(out: Path, *args: str, steps: int = 20) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accord", "train", "--task", "digits", "--workers", "2",
           "--steps", str(steps), "--log-every", "5", "--out", str(out), "--no-progress",
           "--timeout", "20", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240)



def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _strip(record: dict) -> dict:
    out = {}
    for k, v in record.items():
        if k in TIME_FIELDS:
            continue
        if isinstance(v, dict):
            v = {kk: (_strip(vv) if isinstance(vv, dict) else vv) for kk, vv in v.items()
                 if kk not in TIME_FIELDS}
        out[k] = v
    return out


def _steps(out: Path) -> list[dict]:
    return [_strip(r) for r in _records(out) if r["type"] == "step"]


# (local_sgd: the crash test below)
# easgd and PowerSGD: slow variants (tests/test_state.py checks every algorithm's state)
@pytest.mark.parametrize("algo,sets", [
    ("acga", []), pytest.param("easgd", ["--set", "period=2"], marks=pytest.mark.slow),
    # PowerSGD's error memories and Q are checkpointed
    pytest.param("allreduce", ["--compress", "powersgd"], marks=pytest.mark.slow),
    # local SGD's anchor and the int8 error memory are checkpointed (a sync at step 8, the
    # checkpoint at 10); the crash test below resumes the same state at the defaults
    pytest.param("local_sgd", ["--compress", "int8", "--set", "period=3"],
                 marks=pytest.mark.slow)])
def test_resumed_run_equals_the_uninterrupted_one(tmp_path, algo, sets):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train(straight, "--algo", algo, *sets).returncode == 0
    first = _train(split, "--algo", algo, *sets, "--checkpoint-every", "10", steps=10)
    assert first.returncode == 0, first.stderr
    second = _train(split, "--algo", algo, *sets, "--checkpoint-every", "10", "--resume",
                    "auto")
    assert second.returncode == 0, second.stderr
    assert f"resuming from {split / 'checkpoints' / 'step-10'}" in second.stderr
    assert _steps(split) == _steps(straight)  # every step record, once, equal
    records = _records(split)
    assert [r["type"] for r in records].count("header") == 1
    assert [r["type"] for r in records].count("summary") == 1
    assert [r for r in records if r["type"] == "resume"][0]["step"] == 10
    a, b = _strip(_records(straight)[-1]), _strip(records[-1])
    assert a == b  # the summary too: steps, bytes, evaluation
    # the clock continues from the checkpoint: the summary's time includes the first part
    at_checkpoint = next(r for r in records if r["type"] == "step" and r["step"] == 10)
    assert records[-1]["time_s"] >= at_checkpoint["time_s"]
    assert [a["from_step"] for a in records[-1]["attempts"]] == [0, 10]
    if algo != "acga":
        return
    # resuming the finished run: nothing to do, and every record stays as it was
    before = (split / "metrics.jsonl").read_bytes()
    again = _train(split, "--algo", algo, *sets, "--checkpoint-every", "10", "--resume", "auto")
    assert again.returncode == 0, again.stderr
    assert again.stderr.strip().splitlines() == [
        f"accord train: nothing to do: run already finished at step 20 "
        f"({split / 'metrics.jsonl'})"]
    assert (split / "metrics.jsonl").read_bytes() == before
    # a run that ended after its last checkpoint but before its summary resumes at the
    # last step: no step left to run, the summary written, nothing else changed
    lines = before.decode().splitlines(keepends=True)
    (split / "metrics.jsonl").write_text("".join(lines[:-1]))
    last = _train(split, "--algo", algo, *sets, "--checkpoint-every", "10", "--resume", "auto")
    assert last.returncode == 0, last.stderr
    assert "resuming from" in last.stderr and "step-20" in last.stderr
    assert _steps(split) == _steps(straight)
    assert _strip(_records(split)[-1]) == a


def test_a_crash_costs_the_steps_since_the_last_checkpoint(tmp_path):
    # local SGD's anchor (period 4: last averaged after the 8th step) and the int8 codec's
    # error memory are in the checkpoint after the 10th: the resumed steps equal the
    # uninterrupted run's
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert _train(straight, "--algo", "local_sgd", "--compress", "int8").returncode == 0
    args = ["--algo", "local_sgd", "--compress", "int8", "--checkpoint-every", "5",
            "--fault", "crash:rank=1,step=13"]
    failed = _train(crashed, *args)
    assert failed.returncode == 1
    assert _records(crashed)[-1]["status"] == "failed"
    resumed = _train(crashed, *args, "--resume", "auto")  # the crash fired once: not again
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr and "step-10" in resumed.stderr
    assert _steps(crashed) == _steps(straight)
    kinds = [r["type"] for r in _records(crashed)]
    assert kinds.count("summary") == 1 and kinds[-1] == "summary"
    # the crash event (step 13, after the checkpoint at 10) was dropped with its records
    assert [r.get("kind") for r in _records(crashed) if r["type"] == "event"] == []


def test_resume_refuses_another_config_with_one_line(tmp_path):
    out = tmp_path / "run"
    assert _train(out, "--algo", "allreduce", "--checkpoint-every", "10", steps=10).returncode == 0
    bad = _train(out, "--algo", "acga", "--resume", "auto")
    assert bad.returncode == 2
    line = bad.stderr.strip().splitlines()[-1]
    assert "algo was 'allreduce', this run has 'acga'" in line
    assert "a resumed run may change: steps" in line
    missing = _train(out, "--algo", "allreduce", "--resume", str(tmp_path / "nowhere"))
    assert missing.returncode == 2
    assert f"{str(tmp_path / 'nowhere')!r} does not exist" in \
        missing.stderr.strip().splitlines()[-1]


def test_corrupt_newest_checkpoint_falls_back_and_says_so(tmp_path):
    out = tmp_path / "run"
    assert _train(out, "--algo", "allreduce", "--checkpoint-every", "5", steps=10).returncode == 0
    newest = out / "checkpoints" / "step-10" / "rank1.pt"
    newest.write_bytes(newest.read_bytes()[:-10])
    named = _train(out, "--algo", "allreduce", "--resume", str(newest.parent))
    assert named.returncode == 2 and "truncated" in named.stderr.strip().splitlines()[-1]
    auto = _train(out, "--algo", "allreduce", "--resume", "auto")
    assert auto.returncode == 0, auto.stderr
    assert "skipped checkpoint" in auto.stderr and "rank1.pt has" in auto.stderr
    assert "resuming from" in auto.stderr and "step-5" in auto.stderr
    assert [r["step"] for r in _records(out) if r["type"] == "step"] == [5, 10, 15, 20]


def test_resume_auto_without_a_checkpoint_starts_at_step_zero(tmp_path):
    out = tmp_path / "run"
    run = _train(out, "--algo", "allreduce", "--resume", "auto", steps=5)
    assert run.returncode == 0, run.stderr
    assert "no complete checkpoint" in run.stderr
    assert [r["step"] for r in _records(out) if r["type"] == "step"] == [5]
    # the finished run has no checkpoint: another seed must not replace its records
    before = (out / "metrics.jsonl").read_bytes()
    other = _train(out, "--algo", "allreduce", "--resume", "auto", "--seed", "7", steps=5)
    assert other.returncode == 2
    assert len(other.stderr.strip().splitlines()) == 1
    assert "seed was 0, this run has 7" in other.stderr
    same = _train(out, "--algo", "allreduce", "--resume", "auto", steps=5)
    assert same.returncode == 0 and "nothing to do" in same.stderr
    assert (out / "metrics.jsonl").read_bytes() == before
    assert not (out / "checkpoints").exists()


def test_a_restart_without_a_checkpoint_keeps_the_first_attempt_in_the_record(tmp_path):
    straight, out = tmp_path / "straight", tmp_path / "run"
    assert _train(straight, "--algo", "local_sgd").returncode == 0
    run = _train(out, "--algo", "local_sgd", "--max-restarts", "1", "--fault",
                 "crash:rank=1,step=13")
    assert run.returncode == 0, run.stderr
    records = _records(out)
    kinds = [r["type"] for r in records]
    assert kinds.count("header") == 1 and kinds.count("restart") == 1
    assert [(r["step"], r["checkpoint"]) for r in records if r["type"] == "resume"] == [(0, None)]
    assert _steps(out) == _steps(straight)  # from step 0 again, no step record twice
    summary = records[-1]
    assert summary["status"] == "ok"
    assert [a["from_step"] for a in summary["attempts"]] == [0, 0]
    # the wall time covers both attempts: the lost 13 steps and the restart are in it
    # (less the time its records took, record_s)
    assert summary["time_s"] == pytest.approx(sum(a["seconds"] for a in summary["attempts"])
                                              - summary["record_s"])
    first_attempt = summary["attempts"][0]["seconds"]
    assert summary["time_s"] > summary["train_s"] + first_attempt * 0.5


def test_max_restarts_survives_a_killed_worker_and_gives_up_after_r(tmp_path):
    straight, survived, gave_up = tmp_path / "straight", tmp_path / "ok", tmp_path / "no"
    assert _train(straight, "--algo", "local_sgd").returncode == 0
    args = ["--algo", "local_sgd", "--checkpoint-every", "5", "--max-restarts", "1"]
    run = _train(survived, *args, "--fault", "kill:rank=1,step=12")
    assert run.returncode == 0, run.stderr
    assert "restarting every worker from the newest checkpoint (restart 1 of 1)" in run.stderr
    records = _records(survived)
    restarts = [r for r in records if r["type"] == "restart"]
    assert len(restarts) == 1 and restarts[0]["failed_rank"] == 1
    assert [r["step"] for r in records if r["type"] == "resume"] == [10]
    assert _steps(survived) == _steps(straight)  # bit for bit, no step record twice
    assert records[-1]["status"] == "ok"
    # a second death with one restart allowed: the run fails, once restarted
    run = _train(gave_up, *args, "--fault", "kill:rank=1,step=12", "--fault",
                 "kill:rank=0,step=17")
    assert run.returncode == 1
    records = _records(gave_up)
    assert [r["type"] for r in records].count("restart") == 1
    assert records[-1]["type"] == "summary" and records[-1]["status"] == "failed"


def test_torchrun_restarts_resume_from_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # torchrun's default (static) rendezvous keeps its store across the restart
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--max-restarts", "1", "--master_port", str(free_port()), "-m", "accord",
           "train", "--algo", "local_sgd", "--task", "digits", "--steps", "20",
           "--log-every", "5", "--checkpoint-every", "5", "--fault", "kill:rank=1,step=12",
           "--resume", "auto", "--out", str(out), "--no-progress", "--timeout", "20"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    records = _records(out)
    assert [r["step"] for r in records if r["type"] == "resume"] == [10]
    assert [r["step"] for r in records if r["type"] == "step"] == [5, 10, 15, 20]
    assert records[-1]["status"] == "ok"
    # the same recipe again after success: nothing to do on every rank, records intact
    before = (out / "metrics.jsonl").read_bytes()
    cmd[cmd.index("--master_port") + 1] = str(free_port())
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "nothing to do: run already finished at step 20" in again.stderr
    assert (out / "metrics.jsonl").read_bytes() == before


@pytest.mark.slow  # CI time: the restart itself is covered by the tests above
def test_the_report_reads_a_restarted_run_as_one(tmp_path):
    runs = tmp_path / "runs"
    out = runs / "crashed"
    args = ["--algo", "allreduce", "--checkpoint-every", "5", "--max-restarts", "1",
            "--fault", "kill:rank=1,step=7"]
    assert _train(out, *args, steps=10).returncode == 0
    report = subprocess.run([sys.executable, "-m", "accord", "report", str(runs), "--out",
                             str(tmp_path / "report")], capture_output=True, text=True,
                            timeout=120)
    assert report.returncode == 0, report.stderr
    assert "unknown type" not in report.stderr
    from accord.report import load_run

    run = load_run(out, runs, lambda message: None)
    assert run.status == "ok"
    assert [r["step"] for r in run.steps] == [5, 10]
    assert run.lifecycle == {"checkpoint": 2, "restart": 1, "resume": 1, "start": 2}
