"""``accord report``: tuning runs (val split) set aside, the Tuning section from tuning.json,
and the per-section verdict; on hand-written run directories with known numbers."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from test_report import PNG_SIGNATURE, header, read_csv

from accord import report


def make_run(root: Path, rel: str, *, label: str, seed: int, curve: list[tuple],
             task: str = "digits", workers: int = 2, split: str | None = None,
             lr: float | None = None, status: str = "ok", hyper: dict | None = None) -> None:
    """A run directory whose step records are ``curve``: (step, time_s, MB, test metric);
    the metric is eval_acc on digits, eval_loss otherwise. ``split`` is config.eval_split
    (absent when None, as in runs written before it existed)."""
    run_dir = root / rel
    run_dir.mkdir(parents=True)
    algo = "allreduce" if label == "allreduce" else "acga"
    head = header(algo, task, workers, seed, curve[-1][0], 1, label, str(run_dir))
    head["config"]["lr"] = lr
    if hyper is not None:
        head["hyperparameters"] = head["config"]["hyperparameters"] = hyper
    if split is not None:
        head["config"]["eval_split"] = split
    metric = "eval_acc" if task == "digits" else "eval_loss"
    records = [head]
    for step, time_s, mb, value in curve:
        records.append({"type": "step", "step": step, "loss": 1.0 / step, metric: value,
                        "time_s": time_s, "comm_bytes": mb * 1e6, "consensus_distance": 0.0})
    last = records[-1]
    if status == "diverged":
        records.append({"type": "summary", "status": "diverged", "diverged_step": last["step"],
                        "steps": last["step"]})
    else:
        records.append({"type": "summary", "status": "ok", "steps": last["step"],
                        "time_s": last["time_s"], "comm_bytes": last["comm_bytes"],
                        metric: last[metric]})
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n",
                                           encoding="utf-8")


def rising(final: float, hit_step: int, hit_time: float, hit_mb: float,
           steps: int = 40) -> list[tuple]:
    """Accuracy 0.1 until hit_step, then 0.6 (the target 0.5 is first reached there, at
    hit_time and hit_mb), ending at ``final`` at ``steps``."""
    curve = [(s, hit_time * s / hit_step, hit_mb * s / hit_step,
              0.1 if s < hit_step else 0.6) for s in range(10, steps, 10)]
    return curve + [(steps, hit_time * steps / hit_step, hit_mb * steps / hit_step, final)]


def section_of(text: str, title: str) -> str:
    return text.split(f"## {title}")[1].split("\n## ")[0]


def table_rows(text: str) -> dict[str, list[str]]:
    """Markdown table rows by their first cell: the cells, stripped."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| label"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


# -- tuning runs are set aside ------------------------------------------------------------------

def test_val_split_runs_are_set_aside(tmp_path):
    root = tmp_path / "runs"
    finals = {0: 0.80, 1: 0.82}
    for seed, final in finals.items():
        make_run(root, f"digits/allreduce/seed{seed}", label="allreduce", seed=seed,
                 curve=rising(final, 20, 2.0, 1.0))
    # a tuning run of the same group with a wildly different metric, and a diverged one
    make_run(root, "digits/allreduce/tune-lr-0.1/seed1000", label="allreduce", seed=1000,
             curve=rising(0.05, 30, 9.0, 9.0), split="val", lr=0.1)
    make_run(root, "digits/allreduce/tune-lr-1/seed1000", label="allreduce", seed=1000,
             curve=rising(0.05, 30, 9.0, 9.0), split="val", lr=1.0, status="diverged")
    make_run(root, "digits/allreduce/seed2-test", label="allreduce", seed=2,
             curve=rising(0.84, 20, 2.0, 1.0), split="test")  # explicit test split: counted
    warnings: list[str] = []
    text = report.write_report(root, target_acc=0.5, figures=False,
                               warn=warnings.append).read_text(encoding="utf-8")
    assert warnings == []

    row = read_csv(root / "summary.csv")[0]
    assert row["n_seeds"] == "3" and row["seeds"] == "0;1;2"
    assert float(row["eval_acc_mean"]) == statistics.mean([0.80, 0.82, 0.84])
    assert float(row["time_to_target_mean"]) == 2.0  # not the tuning run's 9 s
    assert {r["seed"] for r in read_csv(root / "points.csv")} == {"0", "1", "2"}
    assert ("Set aside: 2 tuning runs (`eval_split` val, evaluated on a held-out part of the "
            "training data: 1 diverged, 1 finished); they are in no number, table or figure of the "
            "sections; no tuning.json describes them.") in text
    assert "3 runs under" in text and "3 finished, 0 diverged" in text
    assert "## Diverged runs" not in text and "Not in these numbers" not in text
    assert "seed1000" not in text and "## Tuning" not in text


# -- the Tuning section ------------------------------------------------------------------------

GRID = [0.001, 0.003, 0.01, 0.03]


def tuning_file(arms: list[dict], grid: dict | None = None) -> dict:
    """Version 1, as accord wrote it with one tuning seed (still read)."""
    return {"version": 1, "grid": grid or {"lr": GRID}, "seed": 1000, "split": "val",
            "arms": arms}


def arm(label: str, values: list, statuses: list[str], chosen: float | None,
        task: str = "digits", workers: int = 2) -> dict:
    points = [{"setting": {"lr": lr}, "value": v, "status": st,
               "run": f"{task}/{label}/tune-lr-{lr:g}/seed1000"}
              for lr, v, st in zip(GRID, values, statuses, strict=True)]
    best = dict(zip(GRID, values, strict=True)).get(chosen)
    return {"task": task, "workers": workers, "label": label, "metric": "eval_acc",
            "higher": True, "points": points,
            "chosen": None if chosen is None else {"lr": chosen}, "chosen_value": best}


def test_tuning_table_figure_and_settings_note(tmp_path):
    root = tmp_path / "runs"
    bench = root / "quick"
    data = tuning_file([
        arm("allreduce", [0.88, 0.9, 0.92, 0.85], ["ok"] * 4, 0.01),
        arm("acga", [0.91, 0.93, 0.9, None], ["ok", "ok", "ok", "diverged"], 0.003),
        arm("local", [None, None, None, None], ["failed", "diverged", "not run", "not run"],
            None)])
    for a in data["arms"]:
        for p in a["points"]:
            make_run(bench, p["run"], label=a["label"], seed=1000, split="val",
                     lr=p["setting"]["lr"], curve=rising(0.3, 20, 1.0, 1.0))
    (bench / "tuning.json").write_text(json.dumps(data), encoding="utf-8")
    for seed in (0, 1):
        make_run(bench, f"digits/allreduce/seed{seed}", label="allreduce", seed=seed, lr=0.01,
                 curve=rising(0.9, 20, 2.0, 1.0))
        make_run(bench, f"digits/acga/seed{seed}", label="acga", seed=seed, lr=0.003,
                 curve=rising(0.91, 10, 3.0, 2.0))
    warnings: list[str] = []
    text = report.write_report(root, target_acc=0.5,
                               warn=warnings.append).read_text(encoding="utf-8")
    assert warnings == []
    assert "Set aside: 12 tuning runs" in text and "see Tuning." in text

    tuning = section_of(text, "Tuning")
    assert "### `quick`" in tuning
    assert ("Grid: lr in {0.001, 0.003, 0.01, 0.03}. Tuning seed: 1000. Split: val. "
            "Metric: `eval_acc` (higher is better).") in tuning
    rows = table_rows(tuning)
    header_line = next(line for line in tuning.splitlines() if line.startswith("| label"))
    assert header_line == "| label | lr=0.001 | lr=0.003 | lr=0.01 | lr=0.03 | chosen |"
    assert rows["allreduce"] == ["allreduce", "0.88", "0.9", "**0.92**", "0.85",
                                 "lr=0.01 (0.92)"]
    assert rows["acga"] == ["acga", "0.91", "**0.93**", "0.9", "diverged", "lr=0.003 (0.93)"]
    assert rows["local"] == ["local", "failed", "diverged", "not run", "not run", "none"]
    assert list(rows) == ["allreduce", "acga", "local"]  # baseline first, then by label

    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", tuning)
    assert images == ["figures/tuning_digits_w2.png"]
    data_png = (root / images[0]).read_bytes()
    assert data_png[:8] == PNG_SIGNATURE and len(data_png) > 10_000

    # the evaluation section: only the evaluation seeds, with a note on the tuned lr
    digits = section_of(text, "digits, 2 workers")
    assert ("lr chosen per arm on the val split, seed 1000 (allreduce: lr=0.01; acga: "
            "lr=0.003): see Tuning (`quick`).") in digits
    assert "Note:" not in digits
    summary = {r["label"]: r for r in read_csv(root / "summary.csv")}
    assert set(summary) == {"allreduce", "acga"} and summary["acga"]["seeds"] == "0;1"

    # an evaluation run not at the chosen value is pointed out
    make_run(bench, "digits/acga/seed2", label="acga", seed=2, lr=0.01,
             curve=rising(0.91, 10, 3.0, 2.0))
    text = report.write_report(root, target_acc=0.5, figures=False,
                               warn=lambda m: None).read_text(encoding="utf-8")
    assert "Note: acga ran with lr=0.01, not the chosen 0.003." in \
        section_of(text, "digits, 2 workers")


def test_several_keys_one_panel_per_key(tmp_path):
    root = tmp_path / "runs"
    grid = {"lr": [0.01, 0.1], "momentum": [0.0, 0.9]}
    values = {(0.01, 0.0): 0.5, (0.01, 0.9): 0.6, (0.1, 0.0): 0.7, (0.1, 0.9): None}
    points = [{"setting": {"lr": lr, "momentum": m}, "value": v,
               "status": "ok" if v is not None else "diverged", "run": "x"}
              for (lr, m), v in values.items()]
    data = tuning_file([{"task": "digits", "workers": 4, "label": "acga", "metric": "eval_acc",
                         "higher": True, "points": points,
                         "chosen": {"lr": 0.1, "momentum": 0.0}, "chosen_value": 0.7}],
                       grid)
    (root / "b").mkdir(parents=True)
    (root / "b" / "tuning.json").write_text(json.dumps(data), encoding="utf-8")
    make_run(root, "eval", label="acga", seed=0, workers=4, lr=0.1,
             curve=rising(0.8, 20, 1.0, 1.0))
    text = report.write_report(root, warn=lambda m: None).read_text(encoding="utf-8")
    tuning = section_of(text, "Tuning")
    assert "(every combination)" in tuning
    assert "other keys are at that arm's chosen values" in tuning
    header_line = next(line for line in tuning.splitlines() if line.startswith("| label"))
    assert header_line == ("| label | lr=0.01, momentum=0 | lr=0.01, momentum=0.9 | "
                           "lr=0.1, momentum=0 | lr=0.1, momentum=0.9 | chosen |")
    assert table_rows(tuning)["acga"] == ["acga", "0.5", "0.6", "**0.7**", "diverged",
                                          "lr=0.1, momentum=0 (0.7)"]
    assert (root / "figures" / "tuning_digits_w4.png").read_bytes()[:8] == PNG_SIGNATURE
    # the panels' lines: the other key at the chosen value
    t = report.load_tunings(root, lambda m: None)[0]
    assert report._tuning_lines(t, t.arms[0], "lr") == ([(0.01, 0.5), (0.1, 0.7)], [], 0.1)
    assert report._tuning_lines(t, t.arms[0], "momentum") == ([(0.0, 0.7)], [0.9], 0.0)


def test_tuned_hyperparameter_checked_against_the_evaluation_runs(tmp_path):
    """``--tune algo.beta=...``: the note compares the runs' hyperparameter (as written by
    ``--set``, maybe a string) with the chosen number."""
    root = tmp_path / "runs"
    points = [{"setting": {"algo.beta": b}, "value": v, "status": "ok", "run": "x"}
              for b, v in ((0.9, 0.7), (0.99, 0.8))]
    data = tuning_file([{"task": "digits", "workers": 2, "label": "acga", "metric": "eval_acc",
                         "higher": True, "points": points, "chosen": {"algo.beta": 0.99},
                         "chosen_value": 0.8}], {"algo.beta": [0.9, 0.99]})
    root.mkdir()
    (root / "tuning.json").write_text(json.dumps(data), encoding="utf-8")
    make_run(root, "s0", label="acga", seed=0, hyper={"beta": "0.99"},
             curve=rising(0.8, 20, 1.0, 1.0))
    text = report.write_report(root, figures=False, warn=lambda m: None).read_text()
    digits = section_of(text, "digits, 2 workers")
    assert ("algo.beta chosen per arm on the val split, seed 1000 (acga: algo.beta=0.99): "
            "see Tuning (`runs`).") in digits
    assert "Note:" not in digits
    make_run(root, "s1", label="acga", seed=1, hyper={"beta": 0.9},
             curve=rising(0.8, 20, 1.0, 1.0))
    text = report.write_report(root, figures=False, warn=lambda m: None).read_text()
    assert "Note: acga ran with algo.beta=0.9, not the chosen 0.99." in text


def test_malformed_tuning_files_are_one_warning_each(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "eval", label="allreduce", seed=0, curve=rising(0.8, 20, 1.0, 1.0))
    make_run(root, "tune", label="allreduce", seed=1000, split="val", lr=0.1,
             curve=rising(0.8, 20, 1.0, 1.0))
    bad = {"torn": '{"version": 1, "grid": {"lr": [0.1',
           "shape": json.dumps({"version": 1, "grid": {"lr": [0.1]}, "arms": {"a": 1}}),
           "future": json.dumps(tuning_file([]) | {"version": 3}),
           "point": json.dumps(tuning_file([{"task": "digits", "workers": 2, "label": "a",
                                              "points": [{"value": 0.5}]}]))}
    for name, content in bad.items():
        (root / name).mkdir()
        (root / name / "tuning.json").write_text(content, encoding="utf-8")
    (root / "binary").mkdir()
    (root / "binary" / "tuning.json").write_bytes(b"\xff\xfe\x00garbage")
    warnings: list[str] = []
    text = report.write_report(root, figures=False,
                               warn=warnings.append).read_text(encoding="utf-8")
    assert len(warnings) == 5
    by_file = {w.split(":")[0]: w for w in warnings}
    assert set(by_file) == {f"{n}/tuning.json" for n in [*bad, "binary"]}
    assert by_file == {  # one schema (accord.bench.tuning.SCHEMAS): the field and what was expected
        "torn/tuning.json": "torn/tuning.json: not a tuning file (expected JSON, got "
                            "Expecting ',' delimiter at line 1 column 35); skipped",
        "shape/tuning.json": "shape/tuning.json: not a tuning file (field 'arms': expected a "
                             "list of objects, got {\"a\": 1}); skipped",
        "future/tuning.json": "future/tuning.json: not a tuning file (field 'version': "
                              "expected 1 or 2 (the versions this accord reads), got 3); "
                              "skipped",
        "point/tuning.json": "point/tuning.json: not a tuning file (field "
                             "'arms[0].points[0].setting': expected an object (a grid "
                             "point's setting), got nothing (missing)); skipped",
        "binary/tuning.json": "binary/tuning.json: not a tuning file (expected UTF-8 text, "
                              "got UTF-16 text (it starts with a UTF-16 byte order mark)); "
                              "skipped"}
    assert "## Tuning" not in text and "## Warnings" in text
    assert "Set aside: 1 tuning run " in text and "no tuning.json describes them" in text
    assert read_csv(root / "summary.csv")[0]["n_seeds"] == "1"


def seeds_point(lr: float, values: list, statuses: list[str]) -> dict:
    """A version-2 point over seeds 100, 101, 102, its mean and std computed here."""
    ok = all(st == "ok" for st in statuses)
    status = "ok" if ok else next(s for s in ("diverged", "failed", "not run") if s in statuses)
    return {"setting": {"lr": lr}, "status": status,
            "value": statistics.mean(values) if ok else None,
            "std": statistics.stdev(values) if ok else None,
            "runs": [{"seed": seed, "value": v, "status": st,
                      "run": f"digits/acga/tune-lr-{lr:g}/seed{seed}"}
                     for seed, v, st in zip((100, 101, 102), values, statuses, strict=True)]}


def test_several_tuning_seeds_show_mean_spread_and_each_seed(tmp_path):
    root = tmp_path / "runs"
    points = [seeds_point(0.001, [0.7, 0.8, 0.9], ["ok"] * 3),
              seeds_point(0.003, [0.9, 0.8, 0.7], ["ok"] * 3),
              seeds_point(0.01, [0.6, 0.6, 0.6], ["ok"] * 3),
              seeds_point(0.03, [0.99, None, None], ["ok", "diverged", "not run"])]
    data = {"version": 2, "grid": {"lr": GRID}, "seeds": [100, 101, 102], "split": "val",
            "arms": [{"task": "digits", "workers": 2, "label": "acga", "metric": "eval_acc",
                      "higher": True, "points": points, "chosen": {"lr": 0.001},
                      "chosen_value": 0.8}]}
    root.mkdir()
    (root / "tuning.json").write_text(json.dumps(data), encoding="utf-8")
    make_run(root, "s0", label="acga", seed=0, lr=0.001, curve=rising(0.8, 20, 1.0, 1.0))
    warnings: list[str] = []
    text = report.write_report(root, warn=warnings.append).read_text(encoding="utf-8")
    assert warnings == []
    tuning = section_of(text, "Tuning")
    assert ("Grid: lr in {0.001, 0.003, 0.01, 0.03}. Tuning seeds: 100, 101, 102 (each point "
            "judged by its mean over them). Split: val.") in tuning
    assert table_rows(tuning)["acga"] == [
        "acga", "**0.8 ± 0.1 (0.7, 0.8, 0.9)**", "0.8 ± 0.1 (0.9, 0.8, 0.7)",
        "0.6 ± 0 (0.6, 0.6, 0.6)", "diverged (0.99, diverged, not run)", "lr=0.001 (0.8 ± 0.1)"]
    assert ("lr chosen per arm on the val split, seeds 100, 101, 102 (acga: lr=0.001): see "
            "Tuning (`runs`).") in section_of(text, "digits, 2 workers")
    assert (root / "figures" / "tuning_digits_w2.png").read_bytes()[:8] == PNG_SIGNATURE
    t = report.load_tunings(root, lambda m: None)[0]
    assert t.seeds == [100, 101, 102]
    assert [p.std for p in t.arms[0].points][:3] == [statistics.stdev([0.7, 0.8, 0.9])] * 2 + [0]

    # a point whose recorded mean or status does not follow from its runs is refused
    points[1]["value"] = 0.85
    (root / "tuning.json").write_text(json.dumps(data), encoding="utf-8")
    report.write_report(root, figures=False, warn=warnings.append)
    assert warnings == ["tuning.json: not a tuning file (field 'arms[0].points[1].value': "
                        "expected the mean of its runs (0.8), got 0.85); skipped"]
    points[1]["value"] = 0.8
    points[3]["status"] = "ok"
    (root / "tuning.json").write_text(json.dumps(data), encoding="utf-8")
    warnings.clear()
    report.write_report(root, figures=False, warn=warnings.append)
    assert warnings == ["tuning.json: not a tuning file (field 'arms[0].points[3].status': "
                        "expected \"diverged\" (what its runs say), got \"ok\"); skipped"]


# -- the verdict -------------------------------------------------------------------------------

def verdict_of(text: str, title: str) -> list[str]:
    part = section_of(text, title).split("**Verdict.**")[1].split("###")[0]
    return [line[2:] for line in part.strip().splitlines() if line.startswith("- ")]


def test_verdict_first_to_target_and_separability(tmp_path):
    root = tmp_path / "runs"
    # allreduce: target at step 30, 3.0 s, 0.3 MB; finals 0.80..0.82
    for seed, final in enumerate((0.80, 0.81, 0.82)):
        make_run(root, f"allreduce/{seed}", label="allreduce", seed=seed,
                 curve=rising(final, 30, 3.0, 0.3))
    # fast: fewest steps (10) but slow (5 s); finals 0.90..0.92 above allreduce's range
    for seed, final in enumerate((0.90, 0.91, 0.92)):
        make_run(root, f"fast/{seed}", label="fast", seed=seed,
                 curve=rising(final, 10, 5.0, 0.2))
    # quick: 20 steps but 1 s and the fewest MB; finals 0.78..0.82 overlap allreduce's
    for seed, final in enumerate((0.78, 0.80, 0.82)):
        make_run(root, f"quick/{seed}", label="quick", seed=seed,
                 curve=rising(final, 20, 1.0, 0.1))
    # lone: one seed, far above: still not separable; pair: two seeds, far above: neither
    # (3 finished seeds per group are needed)
    make_run(root, "lone/0", label="lone", seed=0, curve=rising(0.99, 40, 8.0, 0.8))
    for seed, final in enumerate((0.97, 0.98)):
        make_run(root, f"pair/{seed}", label="pair", seed=seed,
                 curve=rising(final, 40, 8.0, 0.8))
    # a loss section (lower is better) with a worse group, and one without allreduce
    for seed, (base, worse) in enumerate(((0.10, 0.30), (0.12, 0.32), (0.11, 0.31))):
        curve = [(10, 1.0, 1.0, 1.0), (20, 2.0, 2.0, 0.5)]
        make_run(root, f"lin/allreduce/{seed}", label="allreduce", seed=seed, task="linreg",
                 curve=[*curve, (30, 3.0, 3.0, base)])
        make_run(root, f"lin/worse/{seed}", label="worse", seed=seed, task="linreg",
                 curve=[*curve, (30, 3.0, 3.0, worse)])
    make_run(root, "alone/0", label="solo", seed=0, workers=8,
             curve=rising(0.7, 20, 1.0, 1.0))
    text = report.write_report(root, target_acc=0.5, target_loss=0.01, figures=False,
                               warn=lambda m: None).read_text(encoding="utf-8")

    lines = verdict_of(text, "digits, 2 workers")
    assert lines[0] == ("First to the target: in steps, fast (10 steps, 3/3 seeds reached it); "
                        "in wall time, quick (1 s, 3/3 seeds reached it); "
                        "in MB, quick (0.1 MB, 3/3 seeds reached it).")
    by_label = {line.split(" vs ")[0]: line for line in lines[1:-1]}
    assert list(by_label) == ["fast", "lone", "pair", "quick"]
    assert by_label["fast"] == ("fast vs allreduce: final eval_acc +0.1 (fast better); "
                                "separable (seed ranges [0.9, 0.92] and [0.8, 0.82] do not "
                                "overlap).")
    assert by_label["quick"] == ("quick vs allreduce: final eval_acc -0.01 (allreduce "
                                 "better); not separable at this scale (seed ranges [0.78, "
                                 "0.82] and [0.8, 0.82] overlap).")
    assert by_label["lone"] == ("lone vs allreduce: final eval_acc +0.18 (lone better); not "
                                "separable at this scale (lone has 1 finished seed; 3 "
                                "needed).")
    assert by_label["pair"] == ("pair vs allreduce: final eval_acc +0.165 (pair better); not "
                                "separable at this scale (pair has 2 finished seeds; 3 "
                                "needed).")
    assert lines[-1] == ("Separable is judged only from at least 3 finished seeds per group; "
                         "too few here: lone (1), pair (2).")
    # the verdict comes right after the time-to-target table
    digits = section_of(text, "digits, 2 workers")
    after = digits.split("### Communication and time to target")[1]
    assert re.search(r"\|\n\n\*\*Verdict\.\*\*\n", after)

    loss = verdict_of(text, "linreg, 2 workers")
    assert loss[0] == ("First to the target: in steps, none reached the target; in wall time, "
                       "none reached the target; in MB, none reached the target.")
    assert loss[1:] == ["worse vs allreduce: final eval_loss +0.2 (allreduce better); "
                        "separable (seed ranges [0.3, 0.32] and [0.1, 0.12] do not overlap)."]
    alone = verdict_of(text, "digits, 8 workers")
    assert alone[1] == ("No allreduce group in this section: no baseline to compare the final "
                        "metric with.")

    summary = {(r["task"], r["label"]): r for r in read_csv(root / "summary.csv")}
    assert summary["digits", "fast"]["separable_vs_allreduce"] == "yes"
    assert float(summary["digits", "fast"]["final_diff_vs_allreduce"]) == \
        statistics.mean((0.90, 0.91, 0.92)) - statistics.mean((0.80, 0.81, 0.82))
    assert summary["digits", "quick"]["separable_vs_allreduce"] == "no"
    assert summary["digits", "lone"]["separable_vs_allreduce"] == "no"
    assert summary["digits", "pair"]["separable_vs_allreduce"] == "no"
    assert summary["linreg", "worse"]["separable_vs_allreduce"] == "yes"
    for key in (("digits", "allreduce"), ("digits", "solo")):
        assert summary[key]["separable_vs_allreduce"] == ""
        assert summary[key]["final_diff_vs_allreduce"] == ""
