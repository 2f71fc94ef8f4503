"""`accord bench` end to end: a tiny matrix runs, resumes, records failures, reports."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from accord import bench, cli
from accord.bench.presets import FRONTIER_LINKS
from accord.run.config import ConfigError
from accord.run.launch import LaunchResult
from accord.run.metrics import read_metrics

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
    assert "0 runs done (0 diverged), 2 reused" in capsys.readouterr().out
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


def test_every_preset_is_valid(tmp_path, monkeypatch):
    from accord.tasks import get_task

    # the network preset's shakespeare data may be absent here (make data fetches it)
    monkeypatch.setattr(get_task("shakespeare"), "check_data", classmethod(lambda cls, d: None))
    configs = bench.plan(bench.preset("all"), tmp_path)
    groups = {Path(c.out).relative_to(tmp_path).parts[0] for c in configs}
    # every preset in its own directory; the network preset in one per link
    assert groups == (set(bench.PRESETS) - {"network", "frontier"}) | {
        f"network-{link}" for link in bench.NETWORK_LINKS} | {
        f"frontier-{link}" for link in FRONTIER_LINKS}
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
    (["--variant", "../../x=acga"], "label '../../x' is not a safe directory name"),
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


# -- reuse, every status, safe labels: hand-written run directories and a fake launcher ------

def write_metrics(cfg, status: str = "ok", *, config: dict | None = None, steps: int = 10,
                  nan_at: int | None = None, summary: dict | None = None) -> None:
    """metrics.jsonl as `accord train` leaves it for ``cfg``: header (its config by
    default), a step record per step (loss null from nan_at on), then a summary with this
    status (None: no summary). ``status="legacy"``: ok with null values from nan_at on, as
    files written before the "diverged" status."""
    run_dir = Path(cfg.out)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    records = [{"type": "header", "config": cfg.to_json() if config is None else config,
                "algorithm": cfg.algo, "world_size": cfg.workers}]
    for s in range(1, steps + 1):
        bad = nan_at is not None and s >= nan_at
        records.append({"type": "step", "step": s, "loss": None if bad else 1.0 / s,
                        "eval_loss": None if bad else 1.0 / s, "eval_acc": None if bad else 0.5,
                        "time_s": 0.1 * s, "comm_bytes": 1000 * s})
        if status == "diverged" and bad:
            break
    last = {k: records[-1][k] for k in ("eval_loss", "eval_acc")}
    if status is not None:
        record = {"type": "summary", "status": "ok" if status == "legacy" else status,
                  "steps": steps, "time_s": 1.0, "comm_bytes": 1000 * steps,
                  "comm_bytes_mean": 1000.0 * steps, **last}
        if status == "diverged":
            record["diverged_step"] = nan_at
        if status == "failed":
            record.update({"failed_rank": 1, "error": "InjectedFault: crash",
                           "consequences": [{"rank": 0, "error": "ConnectionResetError"}]})
        records.append({**record, **(summary or {})})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


class FakeLaunch:
    """Stands in for launch(): notes what the run directory held when the run started and
    writes a run with the given status."""

    def __init__(self, status: str = "ok", returncode: int = 0, nan_at: int | None = None):
        self.status, self.returncode, self.nan_at = status, returncode, nan_at
        self.calls: list[tuple[str, list[str]]] = []

    def __call__(self, cfg, quiet: bool = False) -> LaunchResult:
        run_dir = Path(cfg.out)
        held = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")) \
            if run_dir.exists() else []
        self.calls.append((cfg.out, held))
        write_metrics(cfg, self.status, steps=cfg.steps, nan_at=self.nan_at)
        return LaunchResult(self.returncode, 0 if self.returncode else None,
                            f"worker rank 0 failed: exit code {self.returncode}"
                            if self.returncode else "")


def _configs(out: Path, steps: int = 10, settings: tuple[str, ...] = (),
             algos: tuple[str, ...] = ("allreduce",), seeds: tuple[int, ...] = (0,)):
    specs = bench.custom(list(algos), [], ["digits"], [2], list(seeds), steps)
    return bench.plan(bench.apply_overrides(specs, list(settings)), out)


def _header(cfg) -> dict:
    return read_metrics(Path(cfg.out) / "metrics.jsonl")[0]


def test_a_run_is_reused_only_under_the_same_config(tmp_path, monkeypatch):
    fake = FakeLaunch()
    monkeypatch.setattr(bench, "launch", fake)
    said: list[str] = []
    configs = _configs(tmp_path)
    write_metrics(configs[0])
    (Path(configs[0].out) / "logs" / "rank1.log").write_text("old")

    result = bench.run_bench(configs, tmp_path, progress=False, echo=said.append)
    assert fake.calls == [] and result.skipped == 1 and result.ran == 0
    assert bench.finished(configs[0])

    # --steps changed: rerun, said on one line, the old directory cleared first
    longer = _configs(tmp_path, steps=30)
    said.clear()
    result = bench.run_bench(longer, tmp_path, progress=False, echo=said.append)
    assert said == ["bench: rerunning allreduce digits x2 seed 0: the config changed "
                    "(steps 10 -> 30)"]
    assert fake.calls == [(longer[0].out, [])] and result.ran == 1 and result.skipped == 0
    assert _header(longer[0])["config"]["steps"] == 30
    assert not (Path(longer[0].out) / "logs" / "rank1.log").exists()
    assert not bench.finished(configs[0]) and bench.finished(longer[0])

    # the same request again: reused
    said.clear()
    result = bench.run_bench(longer, tmp_path, progress=False, echo=said.append)
    assert len(fake.calls) == 1 and result.skipped == 1
    assert not any("rerunning" in line for line in said)

    # --set changed (a training setting, then an algorithm hyperparameter): rerun
    faster = _configs(tmp_path, steps=30, settings=("lr=0.5",))
    assert bench.previous(faster[0]).reason == "the config changed (lr null -> 0.5)"
    bench.run_bench(faster, tmp_path, progress=False, echo=said.append)
    assert len(fake.calls) == 2 and _header(faster[0])["config"]["lr"] == 0.5
    acga = _configs(tmp_path, algos=("acga",))
    write_metrics(acga[0])
    changed = _configs(tmp_path, algos=("acga",), settings=("momentum=0.5",))
    prev = bench.previous(changed[0])
    assert prev.action == "rerun" and "hyperparameters.momentum" in prev.reason
    assert "-> 0.5" in prev.reason


def test_fields_that_do_not_change_results_are_ignored(tmp_path):
    cfg = _configs(tmp_path)[0]
    recorded = {**cfg.to_json(), "progress": True, "timeout": 120.0, "idle_timeout": 900.0,
                "tensorboard": True, "out": "/elsewhere/run"}
    write_metrics(cfg, config=recorded)
    assert bench.previous(cfg).action == "reuse"
    for key, value in (("log_every", 7), ("seed", 5), ("faults", ["delay:rank=0,seconds=1"]),
                       ("nonfinite", "skip"), ("optimizer", "adam")):
        write_metrics(cfg, config={**cfg.to_json(), key: value})
        prev = bench.previous(cfg)
        assert prev.action == "rerun" and prev.reason.startswith(f"the config changed ({key} ")
    older = cfg.to_json()
    del older["nonfinite"]  # written before the field existed
    write_metrics(cfg, config=older)
    assert bench.previous(cfg).reason == 'the config changed (nonfinite (absent) -> "exclude")'


@pytest.mark.parametrize("status,action,reason", [
    ("diverged", "reuse", ""),
    ("legacy", "reuse", ""),
    ("failed", "rerun", "the last attempt failed (rank 1: InjectedFault: crash (then rank 0: "
                        "ConnectionResetError))"),
    ("interrupted", "rerun", "the last attempt was interrupted"),
    (None, "rerun", "the last attempt is incomplete (no summary record)"),
])
def test_diverged_runs_count_as_done_the_others_are_rerun(tmp_path, monkeypatch, status,
                                                          action, reason):
    cfg = _configs(tmp_path)[0]
    write_metrics(cfg, status, nan_at=4)
    prev = bench.previous(cfg)
    assert (prev.action, prev.reason) == (action, reason)
    if status in ("diverged", "legacy"):
        assert prev.state == "diverged" and prev.outcome.diverged_step == 4
        assert not bench.finished(cfg)  # no numbers to use
    fake = FakeLaunch()
    monkeypatch.setattr(bench, "launch", fake)
    said: list[str] = []
    bench.run_bench([cfg], tmp_path, progress=False, echo=said.append)
    assert len(fake.calls) == (action == "rerun")
    rerun = [line for line in said if line.startswith("bench: rerunning")]
    assert rerun == ([f"bench: rerunning allreduce digits x2 seed 0: {reason}"]
                     if action == "rerun" else [])


def test_a_run_without_metrics_is_rerun_from_a_clean_directory(tmp_path, monkeypatch):
    cfg = _configs(tmp_path)[0]
    (Path(cfg.out) / "logs").mkdir(parents=True)
    (Path(cfg.out) / "logs" / "rank1.error").write_text("{}")
    assert bench.previous(cfg).reason == "the last attempt left no metrics.jsonl"
    fake = FakeLaunch()
    monkeypatch.setattr(bench, "launch", fake)
    bench.run_bench([cfg], tmp_path, progress=False, echo=lambda s: None)
    assert fake.calls == [(cfg.out, [])]


@pytest.mark.parametrize("returncode,status", [(3, "diverged"), (0, "legacy")])
def test_a_diverged_run_is_recorded_and_reused(tmp_path, monkeypatch, returncode, status):
    """New contract: exit status 3 and status "diverged"; older training code: exit 0 and a
    summary marked ok with null values. Both are a diverged run, recorded once."""
    configs = _configs(tmp_path, seeds=(0, 1))
    fake = FakeLaunch(status, returncode, nan_at=7)
    monkeypatch.setattr(bench, "launch", fake)
    result = bench.run_bench(configs, tmp_path, progress=False, echo=lambda s: None)
    assert result.failed == [] and result.ran == 2
    assert result.diverged == [("allreduce digits x2 seed 0", 7),
                               ("allreduce digits x2 seed 1", 7)]
    log = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    assert [(r["status"], r["diverged_step"]) for r in log] == [("diverged", 7)] * 2
    again = bench.run_bench(configs, tmp_path, progress=False, echo=lambda s: None)
    assert len(fake.calls) == 2 and again.skipped == 2
    table = bench.summary_table(configs).splitlines()
    assert table[1].split() == ["digits", "2", "allreduce", "0", "-", "-", "-", "-", "seed",
                                "0", "diverged", "at", "step", "7;", "seed", "1", "diverged",
                                "at", "step", "7"]


def test_summary_table_averages_ok_seeds_only_and_never_crashes(tmp_path):
    configs = _configs(tmp_path, algos=("allreduce", "acga"), seeds=(0, 1, 2, 3))
    by = {(c.label, c.seed): c for c in configs}
    write_metrics(by["allreduce", 0], summary={"eval_loss": 1.0, "eval_acc": 0.5,
                                               "time_s": 10.0, "comm_bytes_mean": 2e6})
    write_metrics(by["allreduce", 1], summary={"eval_loss": 3.0, "eval_acc": 0.7,
                                               "time_s": 20.0, "comm_bytes_mean": 4e6})
    # finite values until step 7 that would move every mean if they were averaged in
    write_metrics(by["allreduce", 2], "diverged", nan_at=7, summary={"time_s": 99.0})
    write_metrics(by["allreduce", 3], "failed")
    write_metrics(by["acga", 0], "legacy", nan_at=5)  # crashed the table before
    write_metrics(by["acga", 1], summary={"eval_loss": 2.0, "eval_acc": 0.25, "time_s": None,
                                          "comm_bytes_mean": None, "comm_bytes": None})
    # acga seed 2: never run; seed 3: run with another config
    write_metrics(by["acga", 3], config={**by["acga", 3].to_json(), "steps": 3})
    table = bench.summary_table(configs).splitlines()
    assert table[0].split() == ["task", "workers", "label", "seeds", "eval_loss", "eval_acc",
                                "time_s", "MB/worker", "note"]
    allreduce = table[1].split(None, 8)
    assert allreduce == ["digits", "2", "allreduce", "2", "2", "0.6000", "15.0", "3.00",
                         "seed 2 diverged at step 7; 1 failed"]
    acga = table[2].split(None, 8)
    # seed 1 ended ok without time or bytes: '-', never a crash
    assert acga == ["digits", "2", "acga", "1", "2", "0.2500", "-", "-",
                    "seed 0 diverged at step 5; 1 not run; 1 run with another config"]


@pytest.mark.parametrize("label", ["../../../x", "..", ".", "a/b", "/abs", "a b", "", "x\ny"])
def test_unsafe_labels_are_refused(tmp_path, label):
    spec = bench.RunSpec(label, "allreduce", "digits", 2, 0, 4)
    with pytest.raises(ConfigError) as e:
        bench.plan([spec], tmp_path / "out")
    message = str(e.value)
    assert repr(label) in message and "allowed: letters, digits, '.', '_' and '-'" in message
    assert "\n" not in message.replace(repr(label), "")
    assert not (tmp_path / "out").exists()  # refused before anything is written
    if label:
        with pytest.raises(ConfigError, match="not a safe directory name"):
            bench.custom([], [f"{label}=acga"], ["digits"], [2], [0], 4)
    assert bench.plan([bench.RunSpec("acga-b0.9_x", "acga", "digits", 2, 0, 4)], tmp_path)


def test_changed_steps_rerun_a_real_run(tiny_bench, tmp_path):
    """Real runs: the header a worker writes matches the requested config (reuse works),
    and a changed --steps reruns from a cleared directory."""
    src, _ = tiny_bench
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    same = bench.plan(bench.custom(["allreduce"], [], ["digits"], [2], [0], 4), out)
    assert bench.previous(same[0]).action == "reuse"
    (Path(same[0].out) / "stale.txt").write_text("from the earlier run")
    more = bench.plan(bench.custom(["allreduce"], [], ["digits"], [2], [0], 6), out)
    said: list[str] = []
    result = bench.run_bench(more, out, progress=False, echo=said.append)
    assert result.ran == 1 and result.failed == []
    assert said == ["bench: rerunning allreduce digits x2 seed 0: the config changed "
                    "(steps 4 -> 6)"]
    records = read_metrics(Path(more[0].out) / "metrics.jsonl")
    assert records[0]["config"]["steps"] == 6 and records[-1]["status"] == "ok"
    assert max(r["step"] for r in records if r["type"] == "step") == 6
    assert not (Path(more[0].out) / "stale.txt").exists()
    assert bench.previous(more[0]).action == "reuse"


def test_a_fault_tolerant_run_goes_through_the_fault_tolerant_launcher(tmp_path,
                                                                        monkeypatch):
    """The bench launches a --fault-tolerant config with ft_run.ft_launch (its Lighthouse
    and replica groups), every other one with the normal launcher."""
    pytest.importorskip("torchft")
    from accord.ft import launcher as ft_run
    from accord.run.launch import LaunchResult

    calls = []
    monkeypatch.setattr(bench, "launch",
                        lambda cfg, quiet: calls.append(("normal", cfg.label)) or
                        LaunchResult(1, None, "stub"))
    monkeypatch.setattr(ft_run, "ft_launch",
                        lambda cfg: calls.append(("ft", cfg.label)) or
                        LaunchResult(1, None, "stub"))
    specs = [s for s in bench.preset("failures-ft")
             if s.seed == 0 and s.label.startswith("local_sgd")]
    configs = bench.plan(specs, tmp_path)
    bench.run_bench(configs, tmp_path, progress=False, echo=lambda s: None)
    assert sorted(calls) == [("ft", "local_sgd-clean"), ("ft", "local_sgd-ft"),
                             ("normal", "local_sgd-plain"), ("normal", "local_sgd-restart")]
