"""``accord train --fault-tolerant`` end to end: real processes (``python -m accord train``),
each run bounded by a timeout and its whole process group killed on the way out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torchft")

SRC = Path(__file__).resolve().parent.parent / "src"
RUN_LIMIT = 240.0  # seconds any one run may take


def accord_train(*args: str, timeout: float = RUN_LIMIT) -> subprocess.CompletedProcess:
    env = {**os.environ, "RUST_LOG": "warn", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(SRC) + (os.pathsep + os.environ["PYTHONPATH"]
                                     if os.environ.get("PYTHONPATH") else "")}
    for var in ("RANK", "WORLD_SIZE", "TORCHFT_TIMEOUT_SEC", "TORCHFT_QUORUM_TIMEOUT_SEC",
                "TORCHFT_CONNECT_TIMEOUT_SEC"):
        env.pop(var, None)
    proc = subprocess.Popen([sys.executable, "-m", "accord", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"accord train {' '.join(args)} did not end within {timeout:g} s:\n{err}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def timeline(recs: list[dict]) -> list[list[int]]:
    return [r["participants"] for r in recs
            if r.get("type") == "event" and r.get("kind") == "membership"]


@pytest.mark.parametrize("algo", [pytest.param("allreduce", marks=pytest.mark.slow),
                                  pytest.param("local_sgd", marks=pytest.mark.slow), "easgd"])
def test_kill_survivors_finish(tmp_path: Path, algo: str) -> None:
    out = tmp_path / "run"
    res = accord_train("--algo", algo, "--workers", "3", "--steps", "60", "--out", str(out),
                       "--fault-tolerant", "--fault", "kill:rank=1,step=20", "--no-progress")
    assert res.returncode == 0, res.stderr
    recs = records(out)
    assert not any(r.get("type") in ("restart", "resume") for r in recs)
    assert timeline(recs) == [[0, 1, 2], [0, 2]]
    left = [r for r in recs if r.get("kind") == "membership" and r["left"]]
    assert left[0]["left"] == [1] and left[0]["step"] >= 20
    exits = [r for r in recs if r.get("kind") == "worker_exit"]
    assert [(e["rank"], e["returncode"]) for e in exits] == [(1, -signal.SIGKILL)]
    summary = recs[-1]
    assert summary["type"] == "summary" and summary["status"] == "ok"
    assert summary["steps"] == 60 and summary["participants"] == [0, 2]
    assert summary["finished_workers"] == [0, 2]
    assert summary["discarded_steps"] >= 0 and summary["respawns"] == 0
    steps = [r for r in recs if r.get("type") == "step"]
    assert [r["step"] for r in steps] == list(range(10, 61, 10))
    assert steps[0]["n"] == 3 and steps[-1]["n"] == 2
    assert "discarded" in res.stdout and "[0, 2]" in res.stdout


HALF_LIFE = 8


@pytest.mark.parametrize("algo", [pytest.param("allreduce", marks=pytest.mark.slow),
                                  "easgd-dynamic"])
def test_respawn_returns_to_three(tmp_path: Path, algo: str) -> None:
    out = tmp_path / "run"
    extra, steps = ["--log-every", "10"], 60
    if algo == "easgd-dynamic":  # longer: the fade-in must fit after the rejoin
        extra, steps = ["--set", "period=2", "--set", "weighting=dynamic", "--set",
                        f"half_life={HALF_LIFE}", "--log-every", "2"], 90
    # every worker sleeps 0.15 s a step, so the run outlasts the replacement's start-up
    res = accord_train("--algo", algo.split("-")[0], "--workers", "3", "--steps", str(steps),
                       "--out", str(out), "--fault-tolerant", "--respawn", "--fault",
                       "kill:rank=1,step=20", "--fault", "delay:rank=all,seconds=0.15",
                       "--no-progress", *extra)
    assert res.returncode == 0, res.stderr
    recs = records(out)
    assert timeline(recs) == [[0, 1, 2], [0, 2], [0, 1, 2]]
    rejoin = [r for r in recs if r.get("kind") == "membership"][-1]
    assert rejoin["joined"] == [1] and rejoin["step"] > 20
    assert [r["rank"] for r in recs if r.get("kind") == "respawn"] == [1]
    summary = recs[-1]
    assert summary["status"] == "ok" and summary["steps"] == steps
    assert summary["participants"] == [0, 1, 2] and summary["respawns"] == 1
    assert summary["finished_workers"] == [0, 1, 2]
    logged = [r for r in recs if r.get("type") == "step"]
    assert logged[-1]["n"] == 3
    if algo == "easgd-dynamic":
        # the joiner fades in: its raw weight (steps since joining + 1) / half_life at the
        # first exchanges, so the smallest weight dips below uniform, then is uniform again
        # (weights over 3 participants) from a half-life after the join on
        joined = rejoin["step"]
        # (a record shows the newest exchange, at most 2 steps back: one after the join)
        dips = [r["algo"]["weight_min"] for r in logged
                if joined + 2 < r["step"] <= joined + HALF_LIFE - 2]
        after = [r["algo"]["weight_min"] for r in logged if r["step"] > joined + HALF_LIFE]
        assert dips and max(dips) < 1 / 3 - 0.02, logged
        assert after and all(abs(w - 1 / 3) < 1e-9 for w in after), logged


@pytest.mark.parametrize("argv, needle", [
    (["--algo", "gossip"], "algorithm 'gossip' is refused"),
    (["--algo", "easgd", "--set", "asynchronous=true"], "easgd asynchronous=true is refused"),
    (["--compress", "bf16"], "--compress is not supported"),
    (["--checkpoint-every", "5"], "--checkpoint-every is not supported"),
    (["--min-workers", "4"], "min_workers: got 4"),
    (["--timeout", "5"], "quorum timeout (10 s) must be below the process-group timeout"),
    (["--lighthouse", "host"], "--lighthouse: got 'host', allowed: http://HOST:PORT"),
    (["--replicas", "0-1"], "--replicas: allowed only with --lighthouse"),
    (["--lighthouse", "h:1", "--replicas", "1-3"], "worker indices in 0..2"),
    (["--ft-host", "a b"], "--ft-host: got 'a b'"),
])
def test_refused_in_one_line(tmp_path: Path, capsys, argv: list[str], needle: str) -> None:
    """In this process: the checks run before any worker or Lighthouse starts (one real
    process below shows the same through the command line)."""
    from accord import cli

    code = cli.main(["train", "--workers", "3", "--steps", "5", "--out",
                     str(tmp_path / "run"), "--fault-tolerant", *argv])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


def test_options_need_fault_tolerant(tmp_path: Path) -> None:
    res = accord_train("--workers", "3", "--steps", "5", "--out", str(tmp_path / "run"),
                       "--respawn", timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip() == ("accord train: error: respawn: got 3, allowed: only "
                                  "with --fault-tolerant")
    assert not (tmp_path / "run").exists()


def test_config_round_trip_and_normal_records_unchanged() -> None:
    from accord import cli
    from accord.run.config import TrainConfig
    from accord.run.validation import validate

    normal = TrainConfig(workers=3)
    assert not set(TrainConfig.FT_FIELDS) & set(normal.to_json())
    assert not set(TrainConfig.FT_FIELDS) & set(normal.fingerprint())
    assert "--fault-tolerant" not in normal.to_argv()
    cfg = TrainConfig(workers=3, fault_tolerant=True, min_workers=2, respawn=True)
    validate(cfg, check_out=False)
    assert cfg.respawn == 3  # bare --respawn (or an older config's True): up to N
    again = cli._config_from_args(cli.build_parser().parse_args(["train", *cfg.to_argv()]))
    assert (again.fault_tolerant, again.min_workers, again.respawn) == (True, 2, 3)
    assert again.to_json() == cfg.to_json()
    hosts = TrainConfig(workers=8, fault_tolerant=True, lighthouse="h0:29510",
                        replicas="0-1,6", ft_host="h1")
    validate(hosts, check_out=False)
    assert hosts.lighthouse == "http://h0:29510"
    again = cli._config_from_args(cli.build_parser().parse_args(["train", *hosts.to_argv()]))
    assert (again.lighthouse, again.replicas, again.ft_host) == ("http://h0:29510", "0-1,6",
                                                                 "h1")
    from accord.ft.launcher import replicas_of
    assert replicas_of(again) == [0, 1, 6] and replicas_of(TrainConfig(workers=3)) == [0, 1, 2]


def test_too_few_workers_end_the_run_bounded(tmp_path: Path) -> None:
    """--min-workers 3 and one of 3 killed, no respawn: no quorum can form again, so the
    launcher stops the survivors at once and ends the run as failed (exit 1)."""
    out = tmp_path / "run"
    res = accord_train("--algo", "allreduce", "--workers", "3", "--steps", "60", "--out",
                       str(out), "--fault-tolerant", "--min-workers", "3", "--fault",
                       "kill:rank=1,step=20", "--no-progress", timeout=60)
    assert res.returncode == 1
    assert "no worker finished the 60 steps" in res.stderr
    assert "stopped by the launcher: no quorum could form again" in res.stderr
    recs = records(out)
    summary = recs[-1]
    assert summary["status"] == "failed" and summary["finished_workers"] == []
    assert summary["steps"] == 20  # the last record before the death
    [stop] = [r for r in recs if r.get("kind") == "too_few_workers"]
    assert stop["alive"] == [0, 2]


def test_two_workers_survive_a_hung_peer(tmp_path: Path) -> None:
    """The hard case of a hang: worker 1 of 2 stops for good at step 10 without dying
    (its torchft heartbeat goes on). Worker 0's collective fails after the process-group
    timeout (11 s); its quorum cannot drop a peer that still heartbeats (one of two is not
    a majority), so it retries until the launcher kills the hung worker at the step
    deadline (14 s); then it goes on alone and finishes."""
    out = tmp_path / "run"
    res = accord_train("--algo", "allreduce", "--workers", "2", "--steps", "30", "--out",
                       str(out), "--fault-tolerant", "--timeout", "11", "--idle-timeout",
                       "14", "--fault", "hang:rank=1,step=10", "--no-progress")
    assert res.returncode == 0, res.stderr
    recs = records(out)
    assert timeline(recs) == [[0, 1], [0]]
    assert [r["rank"] for r in recs if r.get("kind") == "hung"] == [1]
    summary = recs[-1]
    assert summary["status"] == "ok" and summary["finished_workers"] == [0]
    assert summary["discarded_steps"] >= 1  # the step of the failed collective
    steps = [r for r in recs if r.get("type") == "step"]
    assert [r["step"] for r in steps] == [10, 20, 30] and steps[-1]["n"] == 1


def test_torchft_missing_is_one_line(tmp_path: Path, monkeypatch) -> None:
    import importlib.util

    from accord.run.config import ConfigError, TrainConfig
    from accord.run.validation import validate

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchft" else real(name, *a))
    cfg = TrainConfig(workers=3, out=str(tmp_path / "run"), fault_tolerant=True)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert str(e.value) == "--fault-tolerant needs torchft: pip install 'accord[ft]'"


@pytest.mark.slow  # CI time: a variant of the fault-tolerant runs above
def test_two_hosts_with_an_external_lighthouse(tmp_path: Path) -> None:
    """Several hosts, played on this one: `accord ft-lighthouse`, two launchers with their
    own --replicas and --out (worker 1 killed at step 20 on the first), then `accord
    ft-merge` joins their records into one run: the survivors finish, participants end at
    [0, 2], every step record is there."""
    env = {**os.environ, "RUST_LOG": "warn", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(SRC) + (os.pathsep + os.environ["PYTHONPATH"]
                                     if os.environ.get("PYTHONPATH") else "")}
    lighthouse = subprocess.Popen([sys.executable, "-m", "accord", "ft-lighthouse",
                                   "--min-workers", "2", "--bind", "[::]:0"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                  start_new_session=True)
    try:
        line = lighthouse.stdout.readline()
        assert line.startswith("lighthouse: http://"), line
        address = line.split()[1]
        common = ["--algo", "local_sgd", "--workers", "3", "--steps", "60", "--fault-tolerant",
                  "--min-workers", "2", "--lighthouse", address, "--ft-host", "localhost",
                  "--fault", "kill:rank=1,step=20", "--no-progress"]
        hosts = []
        for name, replicas in (("a", "0-1"), ("b", "2")):
            hosts.append(subprocess.Popen(
                [sys.executable, "-m", "accord", "train", *common, "--replicas", replicas,
                 "--out", str(tmp_path / name)], env=env, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, start_new_session=True))
        for proc in hosts:
            try:
                _, err = proc.communicate(timeout=RUN_LIMIT)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
            assert proc.returncode == 0, err
    finally:
        os.killpg(lighthouse.pid, signal.SIGTERM)
        assert lighthouse.wait(timeout=30) == 0
    a = records(tmp_path / "a")
    assert a[0]["fault_tolerant"]["replicas"] == [0, 1]
    assert [(e["rank"], e["returncode"]) for e in a if e.get("kind") == "worker_exit"] == \
        [(1, -signal.SIGKILL)]
    res = subprocess.run([sys.executable, "-m", "accord", "ft-merge", str(tmp_path / "run"),
                          str(tmp_path / "a"), str(tmp_path / "b")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    recs = records(tmp_path / "run")
    changes = timeline(recs)
    # hosts start unsynchronised: a late worker may join the first quorum by recovery
    assert [0, 1, 2] in changes and changes[-1] == [0, 2]
    assert [r["step"] for r in recs if r.get("type") == "step"] == list(range(10, 61, 10))
    summary = recs[-1]
    assert summary["status"] == "ok" and summary["finished_workers"] == [0, 2]
    assert summary["participants"] == [0, 2]
    assert [e["rank"] for e in recs if e.get("kind") == "worker_exit"] == [1]
    assert recs[0]["merged_from"] == [str(tmp_path / "a"), str(tmp_path / "b")]
    # a directory of another run is refused in one line
    bad = subprocess.run([sys.executable, "-m", "accord", "ft-merge", str(tmp_path / "x"),
                          str(tmp_path / "a"), str(tmp_path / "nope")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "no metrics.jsonl" in bad.stderr


@pytest.mark.slow  # CI time: a variant of the fault-tolerant runs above
def test_a_replacement_too_late_to_join_does_not_hold_the_run(tmp_path: Path) -> None:
    """Worker 1 dies at step 55 of 60 and is respawned, but the survivors finish before
    the replacement is up: alone, below --min-workers 2, it waits for a quorum that cannot
    form. The launcher stops it once the run has ended (not after its quorum patience,
    the step deadline) and the run ends ok."""
    out = tmp_path / "run"
    res = accord_train("--algo", "allreduce", "--workers", "3", "--steps", "60", "--out",
                       str(out), "--fault-tolerant", "--min-workers", "2", "--respawn",
                       "--fault", "kill:rank=1,step=55", "--no-progress", timeout=90)
    assert res.returncode == 0, res.stderr
    recs = records(out)
    summary = recs[-1]
    assert summary["status"] == "ok" and summary["finished_workers"] == [0, 2]
    assert summary["respawns"] == 1
    stopped = [r for r in recs if r.get("kind") == "stopped"]
    assert [r["rank"] for r in stopped] == [1] and stopped[0]["reason"] == "the run had ended"
    # the stopped replacement is not reported as a failed worker
    assert [r["rank"] for r in recs if r.get("kind") == "worker_exit"] == [1]  # the kill


# -- parity with the local launcher (tests/test_failures.py tests it the same way) ----------

def test_a_diverged_run_says_so_and_exits_3(tmp_path: Path) -> None:
    """A NaN spread by the allreduce (--nonfinite off) is divergence in the fault-tolerant
    loop too: every replica stops at that record, the summary says diverged, exit 3."""
    out = tmp_path / "run"
    res = accord_train("--algo", "allreduce", "--workers", "2", "--steps", "12", "--out",
                       str(out), "--fault-tolerant", "--log-every", "2", "--nonfinite", "off",
                       "--fault", "nan:rank=0,step=3", "--no-progress")
    assert res.returncode == 3, res.stderr
    assert "diverged at step 4: non-finite parameters" in res.stderr
    recs = records(out)
    summary = recs[-1]
    assert summary["status"] == "diverged" and summary["diverged_step"] == 4
    assert summary["diverged_reason"] == "non-finite parameters"
    assert summary["steps"] == 4  # every replica stopped at that record
    assert [r["step"] for r in recs if r.get("type") == "step"] == [2, 4]
    assert not [r for r in recs if r.get("kind") in ("worker_exit", "respawn")]
    assert not (out / ".accord.lock").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM,
                                 pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_signal_interrupts_like_the_local_launcher(tmp_path: Path, sig: int) -> None:
    """SIGTERM or SIGINT to the launcher: every worker stopped, summary interrupted, exit
    130, the lock released (it exited -15 with no summary and left the lock)."""
    out = tmp_path / "run"
    env = {**os.environ, "RUST_LOG": "warn", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(SRC) + (os.pathsep + os.environ["PYTHONPATH"]
                                     if os.environ.get("PYTHONPATH") else "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "accord", "train", "--algo", "allreduce", "--workers", "2",
         "--steps", "400", "--log-every", "2", "--out", str(out), "--fault-tolerant",
         "--fault", "delay:rank=all,seconds=0.05", "--no-progress"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
        # a background job ignores SIGINT, and that survives exec: a terminal's default
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        worker_file = out / "logs" / "ft0.jsonl"
        for _ in range(1200):  # until a step is committed
            time.sleep(0.1)
            if worker_file.exists() and '"type": "step"' in worker_file.read_text():
                break
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "accord train: error: interrupted"
    summary = records(out)[-1]
    assert summary["status"] == "interrupted"
    assert summary["error"] == "interrupted (SIGINT or SIGTERM)"
    assert isinstance(summary["interrupted_step"], int) and summary["interrupted_step"] < 400
    assert not (out / ".accord.lock").exists()
