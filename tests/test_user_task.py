"""A user's task by import path (``--task file.py:Name`` / ``module:Name``) reaches train,
bench and report exactly as a built-in task does, and a bad one is refused in one line
before any worker starts."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import accord
from accord.cli import main
from accord.tasks import get_task, task_source

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "user_task.py"


def _cli(*args: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse
            code = e.code
    return code, err.getvalue()


def test_a_task_file_and_a_module_give_the_same_class_of_accord_task(tmp_path, monkeypatch):
    by_file = get_task(f"{EXAMPLE}:TwoMoons")
    assert issubclass(by_file, accord.Task) and by_file.name == "two-moons"
    assert get_task(f"{EXAMPLE}:TwoMoons") is by_file  # imported once
    source = task_source(f"{EXAMPLE}:TwoMoons")
    assert source["file"] == str(EXAMPLE)
    import hashlib

    assert source["sha256"] == hashlib.sha256(EXAMPLE.read_bytes()).hexdigest()
    assert task_source("digits") is None
    (tmp_path / "my_tasks.py").write_text(EXAMPLE.read_text())
    monkeypatch.syspath_prepend(str(tmp_path))
    by_module = get_task("my_tasks:TwoMoons")
    assert issubclass(by_module, accord.Task) and by_module.name == "two-moons"


@pytest.mark.parametrize("spec,says", [
    ("nowhere/none.py:Task", "no file"),
    ("no_such_module_xyz:Task", "cannot import 'no_such_module_xyz'"),
    (f"{EXAMPLE}:Missing", "has no 'Missing'"),
    (f"{EXAMPLE}:math", "is module, allowed: a subclass of accord.Task"),
    (f"{EXAMPLE}:Iterator", "allowed: a subclass of accord.Task"),
    ("digits:", "allowed: a built-in task, module:Name or path/to/file.py:Name"),
    ("mnist", "unknown task 'mnist'"),
])
def test_a_bad_task_is_one_line_before_any_worker(tmp_path, spec, says):
    out = tmp_path / "run"
    code, err = _cli("train", "--task", spec, "--out", str(out), "--no-progress")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], lines
    assert not out.exists()


def test_a_task_file_that_fails_to_import_is_one_line(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("raise RuntimeError('no data here\\nsecond line')\n")
    code, err = _cli("train", "--task", f"{bad}:Task", "--out", str(tmp_path / "run"))
    assert code == 2
    assert err.strip().splitlines() == [
        f"accord train: error: task '{bad}:Task': importing '{bad}' failed: RuntimeError: "
        "no data here"]


def test_train_bench_and_report_run_a_user_task_with_a_straggler(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    spec = f"{EXAMPLE}:TwoMoons"
    bench = subprocess.run(
        [sys.executable, "-m", "accord", "bench", "--tasks", spec, "--algos", "allreduce,acga",
         "--workers", "2", "--steps", "30", "--seeds", "0", "--fault", "slow:rank=1,factor=3",
         "--out", str(tmp_path / "b")],
        capture_output=True, text=True, timeout=300, env=env)
    assert bench.returncode == 0, bench.stderr
    runs = sorted((tmp_path / "b").rglob("metrics.jsonl"))
    assert len(runs) == 2
    # the task's directory is a name, never its path (an absolute one would escape --out)
    assert {p.relative_to(tmp_path / "b").parts[:3] for p in runs} == {
        ("custom", "user_task.TwoMoons", "w2")}
    for path in runs:
        records = [json.loads(line) for line in path.read_text().splitlines()]
        header, summary = records[0], records[-1]
        assert header["config"]["task"] == spec
        # bench --fault reaches every arm and is named in its label
        assert header["config"]["faults"] == ["slow:rank=1,factor=3"]
        assert header["config"]["label"].endswith("_slow-rank1-factor3")
        assert summary["events"] == {"slow": 30}
        assert header["task_source"]["sha256"] == task_source(spec)["sha256"]
        assert summary["status"] == "ok" and summary["eval_acc"] > 0.8
    report = subprocess.run([sys.executable, "-m", "accord", "report", str(tmp_path / "b"),
                             "--out", str(tmp_path / "r")], capture_output=True, text=True,
                            timeout=300, env=env)
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "r" / "report.md").read_text()
    assert spec in text and "acga_slow-rank1-factor3" in text


def _finished_run_with_header(cfg, **fields) -> None:
    """A finished run of ``cfg`` in its directory whose header also holds ``fields``."""
    from test_bench import write_metrics

    write_metrics(cfg)
    path = Path(cfg.out) / "metrics.jsonl"
    lines = path.read_text().splitlines()
    header = {**json.loads(lines[0]), **fields}
    path.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")


def test_bench_reruns_a_run_whose_task_or_plugin_file_was_edited(tmp_path):
    """A run records the SHA-256 of its user files; bench reuses it while they are what ran
    and reruns it, saying which file, once one is edited or gone."""
    from accord import bench
    from accord.bench.reuse import previous

    task = tmp_path / "task.py"
    task.write_text(EXAMPLE.read_text())
    plugin = tmp_path / "algo.py"
    plugin.write_text("# a plugin\n")
    spec = f"{task}:TwoMoons"
    cfg = bench.plan(bench.custom(["allreduce"], [], [spec], [2], [0], 4), tmp_path / "b")[0]
    _finished_run_with_header(cfg, task_source=task_source(spec), plugin_sources=[
        {"spec": str(plugin), "file": str(plugin),
         "sha256": hashlib.sha256(plugin.read_bytes()).hexdigest()}])
    assert previous(cfg).action == "reuse"
    plugin.write_text("# a plugin, edited\n")
    got = previous(cfg)
    assert (got.action, got.state, got.reason) == (
        "rerun", "stale", f"the plugin file {plugin} changed since it ran")
    plugin.write_text("# a plugin\n")
    assert previous(cfg).action == "reuse"
    task.write_text(task.read_text() + "# edited\n")
    assert previous(cfg).reason == f"the task file {task} changed since it ran"
    task.unlink()
    assert previous(cfg).reason == f"the task file {task} changed since it ran"


def test_the_time_records_take_is_left_out_of_the_run_s_clock(tmp_path):
    """Measuring does not lengthen what it measures: a task whose evaluation takes 0.25 s
    (two evaluations per record, 4 records) adds 2 s of records, which ``time_s`` leaves
    out and the summary's ``record_s`` holds."""
    task = tmp_path / "slow_eval.py"
    task.write_text(EXAMPLE.read_text() + (
        "\n\nimport time as _time\n\n\nclass SlowEval(TwoMoons):\n"
        "    def evaluate(self, model):\n        _time.sleep(0.25)\n"
        "        return super().evaluate(model)\n"))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "accord", "train", "--task",
                           f"{task}:SlowEval", "--algo", "allreduce", "--workers", "2",
                           "--steps", "8", "--log-every", "2", "--no-progress", "--out",
                           str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "step"]
    summary = records[-1]
    assert len(steps) == 4 and summary["record_s"] >= 4 * 2 * 0.25
    # 8 steps of a 2-feature MLP: far less than the records' evaluations
    assert steps[-1]["time_s"] < summary["record_s"] / 2
    assert summary["train_s"] < summary["record_s"] / 2
    wall = sum(a["seconds"] for a in summary["attempts"])
    assert summary["time_s"] == pytest.approx(wall - summary["record_s"], abs=1e-6)


def test_bench_reruns_a_run_whose_network_profile_was_edited(tmp_path):
    """The header records the --network-profile file's SHA-256 (train's _code_sources);
    bench reuses the run while the file is what ran and reruns it once it is edited."""
    import dataclasses

    from accord import bench
    from accord.bench.reuse import previous
    from accord.run.train import _code_sources

    profile = tmp_path / "net.json"
    profile.write_text('{"default": "1gbit"}\n')
    cfg = bench.plan(bench.custom(["allreduce"], [], ["digits"], [2], [0], 4), tmp_path / "b")[0]
    cfg = dataclasses.replace(cfg, network_profile=str(profile))
    sources = _code_sources(cfg)
    assert sources == {"network_profile_source": {
        "spec": str(profile), "file": str(profile),
        "sha256": hashlib.sha256(profile.read_bytes()).hexdigest()}}
    _finished_run_with_header(cfg, **sources)
    assert previous(cfg).action == "reuse"
    profile.write_text('{"default": "100mbit"}\n')
    got = previous(cfg)
    assert (got.action, got.state, got.reason) == (
        "rerun", "stale", f"the network profile file {profile} changed since it ran")
