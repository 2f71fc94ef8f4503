"""`accord bench` end to end: a tiny matrix runs, resumes, records failures, reports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from accord import bench, cli
from accord.config import ConfigError
from accord.metrics import read_metrics

ARGS = ["bench", "--algos", "allreduce,acga", "--tasks", "digits", "--workers", "2",
        "--seeds", "0", "--steps", "4", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = cli.main([*ARGS, "--out", str(out)])
    return out, code


def _runs(out: Path) -> list[Path]:
    return sorted(out.glob("custom/digits/w2/*/seed0/metrics.jsonl"))


def test_tiny_bench_runs_every_cell(tiny_bench):
    out, code = tiny_bench
    assert code == 0
    runs = _runs(out)
    assert [p.parts[-3] for p in runs] == ["acga", "allreduce"]
    for p in runs:
        records = read_metrics(p)
        assert records[-1]["status"] == "ok"
        assert records[0]["config"]["label"] == p.parts[-3]
    log = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    assert sorted(r["label"] for r in log) == ["acga", "allreduce"]


def test_bench_resumes_without_rerunning(tiny_bench, capsys):
    out, _ = tiny_bench
    before = {p: p.stat().st_mtime_ns for p in _runs(out)}
    lines = len((out / "bench.jsonl").read_text().splitlines())
    assert cli.main([*ARGS, "--out", str(out)]) == 0
    assert "0 runs done, 2 reused" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in _runs(out)} == before
    assert len((out / "bench.jsonl").read_text().splitlines()) == lines


def test_report_of_the_tiny_bench_matches_the_runs(tiny_bench, tmp_path):
    import csv

    from accord.report import write_report

    out, _ = tiny_bench
    path = write_report(out / "custom", tmp_path)
    text = path.read_text()
    assert "allreduce" in text and "acga" in text
    pngs = re.findall(r"\(([^)]+\.png)\)", text)
    assert len(pngs) >= 3
    for name in pngs:
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    rows = {r["label"]: r for r in csv.DictReader((tmp_path / "summary.csv").open())}
    points = list(csv.DictReader((tmp_path / "points.csv").open()))
    for run in _runs(out):
        records = read_metrics(run)
        label = run.parts[-3]
        assert float(rows[label]["eval_acc_mean"]) == pytest.approx(records[-1]["eval_acc"])
        steps = [r for r in records if r["type"] == "step"]
        mine = [p for p in points if p["label"] == label]
        assert [int(p["step"]) for p in mine] == [r["step"] for r in steps]
        assert [float(p["loss"]) for p in mine] == pytest.approx([r["loss"] for r in steps])


def test_failed_run_is_recorded_and_the_bench_goes_on(tmp_path):
    specs = bench.custom(["allreduce", "normalized"], [], ["digits"], [2], [0], 4)
    configs = bench.plan(specs, tmp_path)
    configs[0].faults = ["crash:rank=1,step=1"]  # the first run fails, the second must run
    result = bench.run_bench(configs, tmp_path, progress=False, echo=lambda s: None)
    assert result.ran == 1 and len(result.failed) == 1
    assert "worker rank 1 failed" in result.failed[0][1]
    log = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    assert [r["status"] for r in log] == ["failed", "ok"]
    assert bench.finished(configs[1]) and not bench.finished(configs[0])


def test_every_preset_is_valid(tmp_path):
    configs = bench.plan(bench.preset("all"), tmp_path)
    groups = {Path(c.out).relative_to(tmp_path).parts[0] for c in configs}
    assert groups == set(bench.PRESETS)
    quick = bench.preset("quick")
    assert {s.label for s in quick} >= {"allreduce", "normalized", "acga", "local_sgd", "easgd"}
    ablation = bench.preset("acga-ablation")
    assert {s.workers for s in ablation} == {4, 8} and {s.seed for s in ablation} == {0, 1, 2}


@pytest.mark.parametrize("argv,needle", [
    (["--preset", "nope"], "preset: unknown 'nope'"),
    (["--algos", "nope"], "unknown algorithm 'nope'"),
    (["--variant", "x=acga:momentum=2"], "'momentum'"),
    (["--variant", "broken"], "--variant: expected LABEL=ALGO"),
    (["--algos", "acga", "--workers", "a"], "workers: expected comma-separated integers"),
    (["--algos", "acga", "--set", "nope=1"], "unknown key 'nope'"),
])
def test_bench_bad_input_exits_2_before_any_run(tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.setattr(bench, "launch", lambda *a, **k: pytest.fail("a run started"))
    assert cli.main(["bench", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_preset_filters(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "run_bench", lambda configs, out, **k: bench.BenchResult())
    seen = {}
    monkeypatch.setattr(bench, "summary_table", lambda configs: seen.setdefault("c", configs)
                        and "")
    argv = ["bench", "--preset", "acga-ablation", "--tasks", "digits", "--workers", "8",
            "--seeds", "1", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    configs = seen["c"]
    assert len(configs) == 7  # the seven arms
    assert {(c.task, c.workers, c.seed) for c in configs} == {("digits", 8, 1)}
    assert cli.main([*argv[:-2], "--tasks", "nope", "--out", str(tmp_path)]) == 2


def test_overrides_apply_to_every_run():
    specs = bench.custom(["acga", "allreduce"], [], ["digits"], [2], [0], 4)
    out = bench.apply_overrides(specs, ["lr=0.5", "momentum=0.9"])
    acga = next(s for s in out if s.algo == "acga")
    avg = next(s for s in out if s.algo == "allreduce")
    assert acga.train["lr"] == 0.5 and acga.hyperparameters["momentum"] == "0.9"
    assert avg.train["lr"] == 0.5 and avg.train["momentum"] == 0.9  # optimizer momentum
    with pytest.raises(ConfigError):
        bench.apply_overrides(specs, ["nope=1"])
