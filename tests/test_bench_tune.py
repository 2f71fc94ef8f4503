"""`accord bench --tune`: each arm's grid on a tuning seed, judged on the validation split,
then the evaluation seeds on the test split at each arm's own best point."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_bench import write_metrics

from accord import bench, cli
from accord.run.config import ConfigError, TrainConfig
from accord.run.launch import LaunchResult
from accord.run.metrics import read_metrics

#: each arm's best learning rate in the synthetic landscape (known answer)
BEST = {"allreduce": 3e-3, "acga": 3e-2}
GRID = ["1e-3", "3e-3", "1e-2", "3e-2"]


def landscape(label: str, lr: float, split: str) -> float:
    """The final accuracy a run reports: peaked at the arm's BEST lr on the validation
    split; on the test split the peak is elsewhere, so tuning on it would choose wrong."""
    best = BEST[label] if split == "val" else 1e-3
    lr = 0.1 if lr is None else lr  # digits' default
    return 0.9 - 0.1 * abs(math.log10(lr / best))


class Landscape:
    """Stands in for launch(): writes a finished run whose final eval_acc follows
    :func:`landscape`; ``diverge`` names (label, lr) pairs that diverge instead."""

    def __init__(self, diverge: tuple[tuple[str, float], ...] = ()) -> None:
        self.diverge = set(diverge)
        self.calls: list = []

    def __call__(self, cfg, quiet: bool = False) -> LaunchResult:
        self.calls.append(cfg)
        if (cfg.label, cfg.lr) in self.diverge:
            write_metrics(cfg, "diverged", steps=4, nan_at=2)
        else:
            acc = landscape(cfg.label, cfg.lr, cfg.eval_split)
            write_metrics(cfg, steps=4, summary={"eval_acc": acc})
        return LaunchResult(0, None, "")


def _specs(seeds=(0, 1)) -> list[bench.RunSpec]:
    specs = bench.custom(["allreduce", "acga"], [], ["digits"], [2], list(seeds), 4)
    return bench.tuned_groups(specs)


def test_tuning_picks_each_arms_best_on_the_validation_split(tmp_path, monkeypatch):
    fake = Landscape(diverge=(("acga", 3e-2),))  # acga's true best diverges: never chosen
    monkeypatch.setattr(bench, "launch", fake)
    said: list[str] = []
    grid = bench.parse_tune(["lr=" + ",".join(GRID)])
    configs, result, tuning = bench.run_tuned(_specs(), grid, 100, tmp_path, progress=False,
                                              echo=said.append)
    tune_runs, eval_runs = fake.calls[:8], fake.calls[8:]
    # the grid on the tuning seed, judged on the validation split, never the test split
    assert all(c.seed == 100 and c.eval_split == "val" for c in tune_runs)
    assert sorted((c.label, c.lr) for c in tune_runs) == sorted(
        (a, float(v)) for a in BEST for v in GRID)
    # the evaluation seeds on the test split, each arm at its own best point
    assert all(c.eval_split == "test" and c.seed in (0, 1) for c in eval_runs)
    assert {(c.label, c.lr) for c in eval_runs} == {("allreduce", 3e-3), ("acga", 1e-2)}
    assert configs == eval_runs and result.ran == 12 and len(result.diverged) == 1
    assert tuning.chosen[("custom-tuned", "digits", 2, "allreduce")] == {"lr": "3e-3"}
    assert (f"tuned acga digits x2: lr=1e-2 (eval_acc {landscape('acga', 1e-2, 'val'):.4g} "
            "over 1 seed)") in said
    # tuning runs live beside the evaluation runs, one directory per grid point
    assert Path(tune_runs[0].out).relative_to(tmp_path).parts == (
        "custom-tuned", "digits", "w2", "allreduce", "tune-lr-1e-3", "seed100")
    assert Path(eval_runs[0].out).relative_to(tmp_path).parts[-2:] == ("allreduce", "seed0")

    record = json.loads((tmp_path / "custom-tuned" / "tuning.json").read_text())
    assert record["grid"] == {"lr": [1e-3, 3e-3, 1e-2, 3e-2]}
    assert record["version"] == 2 and record["seeds"] == [100] and record["split"] == "val"
    acga = next(a for a in record["arms"] if a["label"] == "acga")
    assert acga["metric"] == "eval_acc" and acga["higher"] is True
    assert acga["chosen"] == {"lr": 1e-2}
    assert acga["chosen_value"] == pytest.approx(landscape("acga", 1e-2, "val"))
    assert [p["status"] for p in acga["points"]] == ["ok", "ok", "ok", "diverged"]
    assert acga["points"][3]["value"] is None
    assert acga["points"][0]["runs"] == [{"seed": 100, "value": landscape("acga", 1e-3, "val"),
                                          "status": "ok",
                                          "run": "digits/w2/acga/tune-lr-1e-3/seed100"}]
    assert acga["points"][0]["std"] is None  # one seed: no spread
    # every run directory holds what tuning.json says it does
    for p in acga["points"][:3]:
        run = p["runs"][0]["run"]
        summary = read_metrics(tmp_path / "custom-tuned" / run / "metrics.jsonl")[-1]
        assert summary["eval_acc"] == pytest.approx(p["value"])

    # the same request again resumes: nothing runs, the same choice
    fake.calls.clear()
    configs2, result2, tuning2 = bench.run_tuned(_specs(), grid, 100, tmp_path,
                                                 progress=False, echo=said.append)
    assert fake.calls == [] and result2.skipped == 12 and result2.ran == 0
    assert tuning2.chosen == tuning.chosen and configs2 == configs


def test_an_interrupted_tuning_resumes_with_the_missing_points(tmp_path, monkeypatch):
    fake = Landscape()
    monkeypatch.setattr(bench, "launch", fake)
    grid = {"lr": GRID}
    specs = _specs(seeds=(0,))
    # two tuning runs finished before an interruption
    for spec in bench.tuning_specs(specs, grid, 100)[:2]:
        fake(spec.config(tmp_path))
    fake.calls.clear()
    bench.run_tuned(specs, grid, 100, tmp_path, progress=False, echo=lambda _: None)
    assert len(fake.calls) == 6 + 2  # the 6 missing points, then one seed per arm
    assert {(c.label, c.lr) for c in fake.calls[6:]} == {("allreduce", 3e-3), ("acga", 3e-2)}


def test_an_arm_without_a_finished_point_keeps_its_own_settings(tmp_path, monkeypatch):
    fake = Landscape(diverge=tuple(("acga", float(v)) for v in GRID))
    monkeypatch.setattr(bench, "launch", fake)
    said: list[str] = []
    configs, _, tuning = bench.run_tuned(_specs(seeds=(0,)), {"lr": GRID}, 7, tmp_path,
                                         progress=False, echo=said.append)
    assert tuning.chosen[("custom-tuned", "digits", 2, "acga")] is None
    assert next(c for c in configs if c.label == "acga").lr is None  # the task's default
    assert ("tuned acga digits x2: no grid point finished on every tuning seed: evaluated "
            "at its own settings") in said
    record = json.loads((tmp_path / "custom-tuned" / "tuning.json").read_text())
    assert next(a for a in record["arms"] if a["label"] == "acga")["chosen"] is None


def test_several_keys_make_the_cartesian_product():
    grid = bench.parse_tune(["lr=0.1,0.2", "momentum=0,0.9"])
    assert bench.grid_points(grid) == [{"lr": "0.1", "momentum": "0"},
                                       {"lr": "0.1", "momentum": "0.9"},
                                       {"lr": "0.2", "momentum": "0"},
                                       {"lr": "0.2", "momentum": "0.9"}]
    specs = bench.tuning_specs(_specs(seeds=(0,)), grid, 100)
    acga = [s for s in specs if s.label == "acga"]
    # acga has a momentum hyperparameter (it takes precedence, as with --set)
    assert [s.hyperparameters["momentum"] for s in acga] == ["0", "0.9", "0", "0.9"]
    assert [s.train["lr"] for s in acga] == [0.1, 0.1, 0.2, 0.2]
    assert acga[1].point == "tune-lr-0.1_momentum-0.9"
    assert best_is_first_on_ties()


def best_is_first_on_ties() -> bool:
    return (bench.best_point([0.5, 0.7, 0.7, None], True) == 1
            and bench.best_point([2.0, 1.0, float("nan"), 1.0], False) == 1
            and bench.best_point([None, float("inf")], True) is None)


@pytest.mark.parametrize("items, message", [
    (["lr"], "--tune: expected KEY=V1,V2,... (e.g. lr=1e-3,3e-3), got 'lr'"),
    (["lr="], "--tune: expected KEY=V1,V2,... (e.g. lr=1e-3,3e-3), got 'lr='"),
    (["lr=0.1,,0.2"], "--tune: expected KEY=V1,V2,... (e.g. lr=1e-3,3e-3), got 'lr=0.1,,0.2'"),
    (["lr=0.1", "lr=0.2"], "--tune: 'lr' given twice; allowed: each key once"),
    (["lr=0.1,0.1"], "--tune lr: a value is repeated in '0.1,0.1'"),
    (["eval_split=test,val"], "--tune: 'eval_split' cannot be tuned; allowed: a training "
                              "setting or an algorithm hyperparameter"),
])
def test_bad_grids_are_one_line(items, message):
    with pytest.raises(ConfigError) as e:
        bench.parse_tune(items)
    assert str(e.value) == message


def test_bad_tuning_is_refused_before_any_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "launch", lambda *a, **k: pytest.fail("a run started"))
    base = ["bench", "--algos", "allreduce", "--workers", "2", "--seeds", "0,1", "--steps",
            "4", "--no-progress", "--out", str(tmp_path)]
    cases = {
        ("--tune", "lr=0.1", "--tune-seed", "1"):
            "--tune-seed 1 is also an evaluation seed; allowed: a seed not in 0, 1",
        ("--tune", "bogus=1,2"): "--tune: --set: unknown key 'bogus'",
        ("--tune", "lr=0.1,-1"): "lr",
    }
    for extra, message in cases.items():
        assert cli.main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_presets_tuned_by_default_and_the_dynamic_weighting_preset():
    specs = bench.preset("acga-ablation-tuned")
    assert {s.task for s in specs} == {"digits", "fashion"} and {s.workers for s in specs} == {8}
    assert bench.TUNED_PRESETS["acga-ablation-tuned"][1] == {
        "lr": ["3e-4", "1e-3", "3e-3", "1e-2", "3e-2"]}
    assert all(s.group == "acga-ablation-tuned" for s in specs)
    assert "acga-ablation-tuned" not in {s.group for s in bench.preset("all")}

    dw = bench.preset("dynamic-weighting")
    assert len(dw) == 2 * 3 * 2 * 2 * 3  # optimizers x periods x weightings x N x seeds
    assert {s.algo for s in dw} == {"easgd"} and {s.workers for s in dw} == {4, 8}
    eight = [s for s in dw if s.workers == 8 and s.label == "adahessian-p4-dynamic"]
    assert {s.seed for s in eight} == {0, 1, 2}
    spec = eight[0]
    assert spec.hyperparameters == {"period": 4, "weighting": "dynamic", "asynchronous": True}
    assert spec.train["optimizer"] == "adahessian"
    assert spec.train["faults"] == ["delay:rank=all,seconds=0.02", "delay:rank=7,seconds=0.04",
                                    "freeze:rank=2,start=80,end=160",
                                    "freeze:rank=5,start=80,end=160"]
    four = next(s for s in dw if s.workers == 4)
    assert [f for f in four.train["faults"] if f.startswith("freeze")] == [
        "freeze:rank=2,start=80,end=160"]
    bench.plan(dw, Path("/tmp/accord-plan-check"))  # every run validates


def test_runs_and_checkpoints_recorded_before_eval_split_existed_still_count(tmp_path):
    from accord.checkpoint import CheckpointError, _compare

    cfg = bench.plan(bench.custom(["allreduce"], [], ["digits"], [2], [0], 4), tmp_path)[0]
    old = cfg.to_json()
    del old["eval_split"]  # a header written before the field existed ran on the test split
    write_metrics(cfg, config=old)
    assert bench.previous(cfg).action == "reuse"
    cfg.eval_split = "val"
    assert bench.previous(cfg).reason == "the config changed (eval_split \"test\" -> \"val\")"
    added = TrainConfig.ADDED_DEFAULTS
    _compare(tmp_path, {"world_size": 2, "config": {"algo": "acga"}}, 2,
             {"algo": "acga", "eval_split": "test"}, added)
    with pytest.raises(CheckpointError, match="eval_split was 'test', this run has 'val'"):
        _compare(tmp_path, {"world_size": 2, "config": {"algo": "acga"}}, 2,
                 {"algo": "acga", "eval_split": "val"}, added)
    with pytest.raises(CheckpointError, match="eval_split was None, this run has 'test'"):
        _compare(tmp_path, {"world_size": 2, "config": {"algo": "acga"}}, 2,
                 {"algo": "acga", "eval_split": "test"})  # no defaults: nothing assumed


def test_a_real_tuned_bench_and_its_report(tmp_path, capsys):
    """Real runs: 2 grid points on the tuning seed (validation split), one seed at the
    better one (test split); then the report's tuning section."""
    from accord.report import write_report

    args = ["bench", "--algos", "allreduce", "--tasks", "digits", "--workers", "2",
            "--seeds", "0", "--steps", "20", "--set", "log_every=10", "--no-progress",
            "--tune", "lr=1e-5,0.1", "--tune-seed", "100", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    said = capsys.readouterr().out
    assert "tuned allreduce digits x2: lr=0.1" in said  # 1e-5 cannot learn in 20 steps
    group = tmp_path / "custom-tuned"
    runs = sorted(p.parent.relative_to(group).as_posix() for p in group.rglob("metrics.jsonl"))
    assert runs == ["digits/w2/allreduce/seed0", "digits/w2/allreduce/tune-lr-0.1/seed100",
                    "digits/w2/allreduce/tune-lr-1e-5/seed100"]
    split = {r: read_metrics(group / r / "metrics.jsonl")[0]["config"]["eval_split"]
             for r in runs}
    assert split == {runs[0]: "test", runs[1]: "val", runs[2]: "val"}
    assert read_metrics(group / runs[0] / "metrics.jsonl")[0]["config"]["lr"] == 0.1
    # resumed: nothing runs again
    assert cli.main(args) == 0
    assert "0 runs done (0 diverged), 3 reused" in capsys.readouterr().out
    text = write_report(group).read_text()
    assert "Tuning" in text and "**" in text.split("Tuning", 1)[1]
    assert (group / "figures" / "tuning_digits_w2.png").exists()


def test_the_network_preset_puts_each_link_in_its_own_directory():
    specs = bench.preset("network")
    assert len(specs) == 10 * 3 * 3  # arms x links x seeds
    by_group = {}
    for s in specs:
        by_group.setdefault(s.group, set()).add((s.label, s.train["network"]))
    assert set(by_group) == {"network-10gbit", "network-1gbit", "network-100mbit"}
    assert {link for _, link in by_group["network-100mbit"]} == {"100mbit,5ms"}
    # the same labels on every link, so the report compares each arm across links
    labels = [{label for label, _ in v} for v in by_group.values()]
    assert labels[0] == labels[1] == labels[2] and "allreduce-powersgd" in labels[0]
    assert {s.task for s in specs} == {"shakespeare"} and {s.workers for s in specs} == {8}
    assert "network-1gbit" not in {s.group for s in bench.preset("quick")}


def test_the_frontier_preset_runs_every_family_with_every_codec_between_two_hosts():
    from accord.bench.presets import FRONTIER_LINKS, frontier_profile
    from accord.comm.network import load_network_profile

    specs = bench.preset("frontier")
    assert len(specs) == (4 * 4 + 1) * 2 * 3  # (families x codecs + islands) x links x seeds
    assert {s.group for s in specs} == {f"frontier-{link}" for link in FRONTIER_LINKS}
    labels = {s.label: (s.algo, s.train.get("compress", "none")) for s in specs}
    assert labels["sdiloco-p32-f4-d5-int4"] == ("streaming_diloco", "int4")
    assert labels["allreduce-topk"] == ("allreduce", "topk")
    assert labels["islands-diloco"] == ("hierarchical", "none")
    for link in FRONTIER_LINKS:
        group = [s for s in specs if s.group == f"frontier-{link}"]
        assert {s.train["network_profile"] for s in group} == {frontier_profile(link)}
        profile = load_network_profile(frontier_profile(link))
        profile.check_ranks(4)
        # inside a host: 10 Gbit/s; between the hosts (and for a collective over all four
        # ranks): the named link
        inside = profile.seconds("allreduce", 10**6, [0, 1])
        across = profile.seconds("allreduce", 10**6, [0, 2])
        everyone = profile.seconds("allreduce", 10**6, [0, 1, 2, 3])
        bandwidth = {"100mbit": 100e6, "10mbit": 10e6}[link] / 8
        assert across == pytest.approx(2 * 5e-3 + 10**6 / bandwidth)
        assert inside < across / 50 and everyone > across


def test_tuning_part_of_a_group_keeps_the_other_arms_tuning(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "launch", Landscape())
    grid = {"lr": GRID}
    everything = _specs(seeds=(0,))
    for part in ([s for s in everything if s.label == "acga"],
                 [s for s in everything if s.label == "allreduce"]):
        bench.run_tuned(part, grid, 100, tmp_path, progress=False, echo=lambda _: None)
    record = json.loads((tmp_path / "custom-tuned" / "tuning.json").read_text())
    assert sorted(a["label"] for a in record["arms"]) == ["acga", "allreduce"]
    # another grid replaces the file
    bench.run_tuned(everything[:1], {"lr": GRID[:2]}, 100, tmp_path, progress=False,
                    echo=lambda _: None)
    record = json.loads((tmp_path / "custom-tuned" / "tuning.json").read_text())
    assert [a["label"] for a in record["arms"]] == [everything[0].label]


# -- several tuning seeds: each point judged by its mean over them ----------------------------

SEEDS = [100, 101, 102]
#: (label, lr) -> final val accuracy per tuning seed (None: diverges). On seed 100 alone
#: allreduce's best is 3e-2 (an edge-of-stability lr, lucky once) and acga's 3e-2; over the
#: three seeds allreduce's best mean is 1e-2, acga's 3e-2 diverges on seed 101 (never
#: chosen, though the mean of its two finished seeds is the highest), and acga's 1e-3 and
#: 3e-3 tie (0.7 + 0.8 + 0.9 in two orders): the first in grid order wins
SEED_VALUES = {
    ("allreduce", 1e-3): [0.80, 0.81, 0.79], ("allreduce", 3e-3): [0.85, 0.86, 0.87],
    ("allreduce", 1e-2): [0.90, 0.91, 0.92], ("allreduce", 3e-2): [0.97, 0.60, 0.70],
    ("acga", 1e-3): [0.70, 0.80, 0.90], ("acga", 3e-3): [0.90, 0.80, 0.70],
    ("acga", 1e-2): [0.60, 0.60, 0.60], ("acga", 3e-2): [0.99, None, 0.99],
}


class PerSeed:
    """Stands in for launch(): a tuning run's final eval_acc is SEED_VALUES[label, lr] at
    its seed's position (diverged where None); an evaluation run ends at 0.5."""

    def __init__(self) -> None:
        self.calls: list = []

    def __call__(self, cfg, quiet: bool = False) -> LaunchResult:
        self.calls.append(cfg)
        if cfg.eval_split == "val":
            value = SEED_VALUES[cfg.label, cfg.lr][SEEDS.index(cfg.seed)]
            if value is None:
                write_metrics(cfg, "diverged", steps=4, nan_at=2)
            else:
                write_metrics(cfg, steps=4, summary={"eval_acc": value})
        else:
            write_metrics(cfg, steps=4, summary={"eval_acc": 0.5})
        return LaunchResult(0, None, "")


def expected_choice(root: Path, label: str, seeds: list[int]) -> float | None:
    """The lr with the best mean final eval_acc over ``seeds``, read from the tuning runs'
    own metrics.jsonl (not from tuning.json): a point with a seed that did not end ok is
    out; the first in grid order on a tie."""
    best, best_mean = None, None
    for lr in GRID:
        finals = []
        for seed in seeds:
            records = read_metrics(root / "digits" / "w2" / label / f"tune-lr-{lr}" /
                                   f"seed{seed}" / "metrics.jsonl")
            finals.append(records[-1]["eval_acc"] if records[-1]["status"] == "ok" else None)
        if None in finals:
            continue
        mean = sum(sorted(finals)) / len(finals)  # sorted: the same sum in any seed order
        if best_mean is None or mean > best_mean:
            best, best_mean = float(lr), mean
    return best


def test_each_point_is_judged_by_its_mean_over_the_tuning_seeds(tmp_path, monkeypatch):
    import statistics

    fake = PerSeed()
    monkeypatch.setattr(bench, "launch", fake)
    said: list[str] = []
    configs, result, tuning = bench.run_tuned(_specs(), {"lr": GRID}, SEEDS, tmp_path,
                                              progress=False, echo=said.append)
    group = tmp_path / "custom-tuned"
    tune_runs, eval_runs = fake.calls[:24], fake.calls[24:]
    # every (arm, point, seed) once, on the validation split
    assert sorted((c.label, c.lr, c.seed) for c in tune_runs) == sorted(
        (label, lr, seed) for label, lr in SEED_VALUES for seed in SEEDS)
    assert all(c.eval_split == "val" for c in tune_runs)
    assert said[0] == ("bench: tuning lr (4 points) on seeds 100, 101, 102, each point judged "
                       "by its mean over them, on the validation split: 24 runs")

    # the choice by the mean differs from the one a single tuning seed makes
    assert expected_choice(group, "allreduce", SEEDS) == 1e-2
    assert expected_choice(group, "allreduce", [100]) == 3e-2
    assert expected_choice(group, "acga", SEEDS) == 1e-3
    assert expected_choice(group, "acga", [100]) == 3e-2
    assert tuning.chosen[("custom-tuned", "digits", 2, "allreduce")] == {"lr": "1e-2"}
    assert tuning.chosen[("custom-tuned", "digits", 2, "acga")] == {"lr": "1e-3"}
    assert sorted((c.label, c.lr, c.seed) for c in eval_runs) == [
        ("acga", 1e-3, 0), ("acga", 1e-3, 1), ("allreduce", 1e-2, 0), ("allreduce", 1e-2, 1)]
    assert configs == eval_runs and result.ran == 24 + 4 and len(result.diverged) == 1
    mean = statistics.mean([0.90, 0.91, 0.92])
    std = statistics.stdev([0.90, 0.91, 0.92])
    assert f"tuned allreduce digits x2: lr=1e-2 (eval_acc {mean:.4g} +- {std:.2g} over 3 " \
           "seeds)" in said

    # tuning.json: the seeds, each point's mean, spread, status and per-seed runs
    record = json.loads((group / "tuning.json").read_text())
    assert record["version"] == 2 and record["seeds"] == SEEDS
    arms = {a["label"]: a for a in record["arms"]}
    for (label, lr), values in SEED_VALUES.items():
        point = arms[label]["points"][GRID.index(next(g for g in GRID if float(g) == lr))]
        assert point["setting"] == {"lr": lr}
        assert [r["seed"] for r in point["runs"]] == SEEDS
        assert [r["value"] for r in point["runs"]] == pytest.approx(values)
        assert [r["run"] for r in point["runs"]] == [
            f"digits/w2/{label}/tune-lr-{lr:.0e}".replace("e-0", "e-") + f"/seed{s}"
            for s in SEEDS]
        if None in values:
            assert point["status"] == "diverged"
            assert [r["status"] for r in point["runs"]] == ["ok", "diverged", "ok"]
            assert point["value"] is None and point["std"] is None
        else:
            assert point["status"] == "ok"
            assert point["value"] == pytest.approx(statistics.mean(values))
            assert point["std"] == pytest.approx(statistics.stdev(values))
    assert arms["allreduce"]["chosen"] == {"lr": 1e-2}
    assert arms["allreduce"]["chosen_value"] == pytest.approx(mean)
    assert arms["acga"]["chosen"] == {"lr": 1e-3}
    assert arms["acga"]["chosen_value"] == pytest.approx(0.8)

    # the report reads the file the bench wrote: mean +- std, then every seed's value
    from accord.report import write_report

    text = write_report(group, figures=False, warn=lambda m: None).read_text()
    tuning_part = text.split("## Tuning")[1]
    assert "Tuning seeds: 100, 101, 102 (each point judged by its mean over them)" in \
        tuning_part
    assert ("| allreduce | 0.8 ± 0.01 (0.8, 0.81, 0.79) | 0.86 ± 0.01 (0.85, 0.86, 0.87) | "
            "**0.91 ± 0.01 (0.9, 0.91, 0.92)** | 0.7567 ± 0.19 (0.97, 0.6, 0.7) | "
            "lr=0.01 (0.91 ± 0.01) |") in tuning_part
    assert "| diverged (0.99, diverged, 0.99) |" in tuning_part


def test_more_tuning_seeds_reuse_the_finished_point_seed_runs(tmp_path, monkeypatch):
    fake = PerSeed()
    monkeypatch.setattr(bench, "launch", fake)
    quiet = {"progress": False, "echo": lambda _: None}
    _, _, one = bench.run_tuned(_specs(), {"lr": GRID}, 100, tmp_path, **quiet)
    assert len(fake.calls) == 8 + 4
    assert one.chosen[("custom-tuned", "digits", 2, "allreduce")] == {"lr": "3e-2"}
    fake.calls.clear()
    # seed 100's runs are reused: only seeds 101 and 102 run, then the evaluation seeds at
    # the new choices (both arms' choice changed)
    _, result, three = bench.run_tuned(_specs(), {"lr": GRID}, SEEDS, tmp_path, **quiet)
    assert sorted((c.label, c.lr, c.seed) for c in fake.calls[:16]) == sorted(
        (label, lr, seed) for label, lr in SEED_VALUES for seed in (101, 102))
    assert len(fake.calls) == 16 + 4 and result.skipped == 8
    assert three.chosen[("custom-tuned", "digits", 2, "allreduce")] == {"lr": "1e-2"}
    fake.calls.clear()
    _, result, _ = bench.run_tuned(_specs(), {"lr": GRID}, SEEDS, tmp_path, **quiet)
    assert fake.calls == [] and result.skipped == 24 + 4


def test_tune_seeds_from_the_command_line(tmp_path, monkeypatch, capsys):
    fake = PerSeed()
    monkeypatch.setattr(bench, "launch", fake)
    args = ["bench", "--algos", "allreduce", "--workers", "2", "--seeds", "0", "--steps", "4",
            "--no-progress", "--tune", "lr=1e-3,1e-2", "--out", str(tmp_path)]
    assert cli.main([*args, "--tune-seeds", "101,100"]) == 0
    assert [(c.lr, c.seed) for c in fake.calls] == [
        (1e-3, 101), (1e-3, 100), (1e-2, 101), (1e-2, 100), (1e-2, 0)]
    record = json.loads((tmp_path / "custom-tuned" / "tuning.json").read_text())
    assert record["seeds"] == [101, 100]
    assert record["arms"][0]["points"][1]["value"] == pytest.approx((0.91 + 0.90) / 2)
    assert "tuned allreduce digits x2: lr=1e-2 (eval_acc 0.905 +- 0.0071 over 2 seeds)" in \
        capsys.readouterr().out
    fake.calls.clear()
    # --tune-seed S is --tune-seeds S: its one run per point is reused from above
    assert cli.main([*args, "--tune-seed", "100"]) == 0
    assert [(c.lr, c.seed) for c in fake.calls] == []
    record = json.loads((tmp_path / "custom-tuned" / "tuning.json").read_text())
    assert record["seeds"] == [100]


def test_the_tuned_presets_tune_on_three_seeds(tmp_path, monkeypatch):
    seen = []

    def fake_run_tuned(specs, grid, seeds, out, **kwargs):
        seen.append((specs[0].group, grid, list(seeds)))
        return [], bench.BenchResult(), None

    monkeypatch.setattr(bench, "run_tuned", fake_run_tuned)
    monkeypatch.setattr(bench, "launch", lambda *a, **k: pytest.fail("a run started"))
    base = ["bench", "--no-progress", "--out", str(tmp_path), "--tasks", "digits"]
    assert cli.main([*base, "--preset", "acga-ablation-tuned"]) == 0
    assert cli.main([*base, "--preset", "elastic-tuned"]) == 0
    assert cli.main([*base, "--preset", "elastic", "--tune", "lr=0.1,0.3"]) == 0
    assert cli.main([*base, "--preset", "elastic-tuned", "--tune-seed", "7"]) == 0
    assert seen == [("acga-ablation-tuned", {"lr": ["3e-4", "1e-3", "3e-3", "1e-2", "3e-2"]},
                     [100, 101, 102]),
                    ("elastic-tuned", {"lr": ["0.01", "0.03", "0.1", "0.3"]}, [100, 101, 102]),
                    ("elastic-tuned", {"lr": ["0.1", "0.3"]}, [100, 101, 102]),
                    ("elastic-tuned", {"lr": ["0.01", "0.03", "0.1", "0.3"]}, [7])]
    assert bench.TUNE_SEEDS == (100, 101, 102)


@pytest.mark.parametrize("extra, message", [
    (["--tune-seed", "100", "--tune-seeds", "101,102"],
     "--tune-seed and --tune-seeds given together; allowed: one of them (--tune-seed S is "
     "--tune-seeds S)"),
    (["--tune-seeds", "100,x"],
     "--tune-seeds: expected comma-separated integers (e.g. 100,101,102), got '100,x'"),
    (["--tune-seeds", "100,,101"],
     "--tune-seeds: expected comma-separated integers (e.g. 100,101,102), got '100,,101'"),
    (["--tune-seeds", ""], "--tune-seeds: got no seed; allowed: at least one (e.g. 100,101,102)"),
    (["--tune-seeds", "100,-1"],
     "--tune-seeds: got -1; allowed: integers from 0 to 2**63 - 1"),
    (["--tune-seeds", str(2**63)],
     f"--tune-seeds: got {2**63}; allowed: integers from 0 to 2**63 - 1"),
    (["--tune-seed", "-3"], "--tune-seed: got -3; allowed: integers from 0 to 2**63 - 1"),
    (["--tune-seeds", "100,101,100"],
     "--tune-seeds: 100 given twice; allowed: each seed once"),
    (["--tune-seeds", "100,1"],
     "--tune-seeds: 1 is also an evaluation seed; allowed: seeds not in 0, 1"),
    (["--tune-seeds", "1"], "--tune-seeds: 1 is also an evaluation seed; allowed: a seed not "
                            "in 0, 1"),
])
def test_bad_tuning_seeds_are_one_line_and_write_nothing(tmp_path, monkeypatch, capsys,
                                                         extra, message):
    monkeypatch.setattr(bench, "launch", lambda *a, **k: pytest.fail("a run started"))
    out = tmp_path / "out"
    args = ["bench", "--algos", "allreduce", "--workers", "2", "--seeds", "0,1", "--steps",
            "4", "--no-progress", "--tune", "lr=0.1,0.3", "--out", str(out), *extra]
    assert cli.main(args) == 2
    assert capsys.readouterr().err == f"accord bench: error: {message}\n"
    assert not out.exists()


@pytest.mark.parametrize("flag, value", [("--tune-seeds", "100,101"), ("--tune-seed", "100")])
def test_tuning_seeds_without_tuning_are_refused(tmp_path, monkeypatch, capsys, flag, value):
    monkeypatch.setattr(bench, "launch", lambda *a, **k: pytest.fail("a run started"))
    out = tmp_path / "out"
    assert cli.main(["bench", "--algos", "allreduce", "--no-progress", "--out", str(out),
                     flag, value]) == 2
    assert capsys.readouterr().err == (
        f"accord bench: error: {flag}: nothing is tuned; allowed: with --tune or a tuned "
        "preset (acga-ablation-tuned, elastic-tuned)\n")
    assert not out.exists()
