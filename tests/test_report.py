"""``accord report``: synthetic run directories shaped like real ones, checked number by number
against their metrics.jsonl; plus one end-to-end report of two tiny real runs."""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
from pathlib import Path

import pytest

from accord import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BYTES_PER_STEP = {"allreduce": 38440, "acga": 76888}
ERROR = "InjectedFault: injected crash on rank 1 at step 12"


def header(algo: str, task: str, workers: int, seed: int, steps: int, log_every: int,
           label: str | None, out: str) -> dict:
    config = {"algo": algo, "task": task, "workers": workers, "steps": steps, "seed": seed,
              "out": out, "lr": None, "batch_size": None, "accum_steps": 1, "optimizer": "sgd",
              "momentum": None, "weight_decay": 0.0, "oracle_lr": False,
              "log_every": log_every, "timeout": 60.0, "backend": "gloo", "data_dir": None,
              "progress": False, "label": label, "hyperparameters": {}, "faults": []}
    return {"type": "header", "config": config, "algorithm": algo, "hyperparameters": {},
            "world_size": workers, "accord_version": "0.1.0", "torch_version": "2.13.0+cpu",
            "python_version": "3.11.7", "platform": "Linux-test", "hostname": "testhost",
            "cpu_count": 2, "git_revision": f"abc123{seed}",
            "started": "2026-11-22T08:55:44+0000", "argv": ["accord", "train"]}


def step_record(algo: str, task: str, seed: int, step: int) -> dict:
    speed = 1.0 if algo == "allreduce" else 1.6  # acga learns faster per step
    loss = 2.3 * math.exp(-speed * step / (25 + 3 * seed))
    if task == "linreg":  # spans several decades: the report's log scale
        loss = 1e3 * math.exp(-step / (4 + seed))
    rec = {"type": "step", "step": step, "loss": loss * 1.02, "eval_loss": loss}
    if task == "digits":
        acc = min(0.97, 0.1 + speed * 0.015 * step + 0.01 * seed)
        rec.update({"eval_acc": acc, "rank0_eval_loss": loss, "rank0_eval_acc": acc})
    else:
        rec["rank0_eval_loss"] = loss
    comm = BYTES_PER_STEP[algo] * step
    rec.update({"consensus_distance": 0.0,
                "time_s": step * (0.01 if algo == "allreduce" else 0.03) * (1 + 0.1 * seed),
                "comm_bytes": comm, "comm_calls": step, "comm_s": step * 0.001,
                "algo": {"grad_norm": 0.5}})
    return rec


def write_run(root: Path, rel: str, *, algo: str, seed: int, task: str = "digits",
              workers: int = 2, steps: int = 60, log_every: int = 5, label: str | None = None,
              fail_at: int | None = None, stop_at: int | None = None,
              garbage: bool = False, diverge_at: int | None = None,
              legacy_nan_at: int | None = None, events: int = 0,
              summary: dict | None = None) -> list[dict]:
    """A run directory as ``accord train`` leaves it; returns the records written.

    diverge_at: the loss is NaN from that logged step on (null in the file) and the run
    ends with status "diverged"; legacy_nan_at: the same values, but the run ends "ok" with
    null eval values, as files written before the "diverged" status; events: event records
    written before each step record; summary: keys added to (or replacing) the summary."""
    run_dir = root / rel
    (run_dir / "logs").mkdir(parents=True)
    records = [header(algo, task, workers, seed, steps, log_every, label, str(run_dir))]
    last = min(x for x in (fail_at, stop_at, diverge_at, steps) if x is not None)
    logged = [s for s in range(log_every, steps + 1, log_every)]
    if logged[-1] != steps:
        logged.append(steps)
    for s in logged:
        if s > last:
            break
        records += [{"type": "event", "step": s - 1, "rank": i % workers, "kind": "delay",
                     "seconds": 0.04} for i in range(events)]
        rec = step_record(algo, task, seed, s)
        nan_from = diverge_at if diverge_at is not None else legacy_nan_at
        if nan_from is not None and s >= nan_from:
            rec.update({k: None for k in rec if k == "loss" or "eval_" in k})
        records.append(rec)
    evals = {k: v for k, v in records[-1].items() if k in ("eval_loss", "eval_acc")}
    if diverge_at is not None:
        records.append({"type": "summary", "status": "diverged", "diverged_step": diverge_at,
                        "diverged_reason": "non-finite eval_loss of the consensus model",
                        "steps": diverge_at, "time_s": records[-1]["time_s"],
                        "comm_bytes": records[-1]["comm_bytes"], **evals, **(summary or {})})
    elif fail_at is not None:
        records.append({"type": "summary", "status": "failed", "error": ERROR,
                        "failed_rank": 1, **evals, **(summary or {})})
    elif stop_at is None:
        comm = BYTES_PER_STEP[algo] * steps
        t = records[-1]["time_s"] + 0.001
        records.append({"type": "summary", "status": "ok", "steps": steps, "time_s": t,
                        "steps_per_s": steps / t, "comm_bytes": comm,
                        "comm_bytes_mean": float(comm), "comm_calls": steps,
                        "comm_s": steps * 0.001, "comm": {}, **evals, **(summary or {})})
    lines = [json.dumps(r) for r in records]
    if garbage:
        lines.insert(2, '{"type": "step", "step": 7, "loss": ')  # a torn line
        lines.insert(3, "not json at all")
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return records


@pytest.fixture
def runs(tmp_path):
    """2 labels x 2 seeds on digits (one with a malformed line), a linreg pair, one failed
    and one incomplete run. Returns (root, {(label, seed): records})."""
    root = tmp_path / "runs"
    finished = {}
    for seed in (0, 1):
        finished["allreduce", seed] = write_run(root, f"digits/allreduce/seed{seed}",
                                                algo="allreduce", seed=seed,
                                                garbage=seed == 1)
        finished["acga-fast", seed] = write_run(root, f"digits/acga-fast/seed{seed}",
                                                algo="acga", seed=seed, label="acga-fast")
    for algo in ("allreduce", "acga"):
        finished[f"linreg-{algo}", 0] = write_run(root, f"linreg/{algo}", algo=algo, seed=0,
                                                  task="linreg", steps=40, log_every=4,
                                                  label=f"linreg-{algo}")
    write_run(root, "broken/crash", algo="acga", seed=0, label="acga-crash", fail_at=12)
    write_run(root, "broken/cut", algo="acga", seed=3, label="acga-cut", stop_at=20)
    return root, finished


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def first_reach(records: list[dict], target: float) -> dict | None:
    return next((r for r in records if r["type"] == "step" and r["eval_acc"] >= target), None)


def test_report_files_and_numbers(runs, tmp_path):
    root, finished = runs
    warnings: list[str] = []
    target = 0.6
    path = report.write_report(root, target_acc=target, warn=warnings.append)
    assert path == root / "report.md"
    text = path.read_text(encoding="utf-8")

    # every label, the failed run with its error, the incomplete run, the environment
    for label in ("allreduce", "acga-fast", "linreg-allreduce", "linreg-acga"):
        assert label in text
    problems = text.split("## Failed, interrupted and incomplete runs")[1]
    assert "broken/crash" in problems and ERROR in problems and "failed" in problems
    assert "broken/cut" in problems and "incomplete" in problems
    for value in ("2.13.0+cpu", "3.11.7", "testhost", "abc1230", "abc1231", "0.1.0"):
        assert value in text.split("## digits")[0]
    # the malformed lines are skipped with one warning for the file, the run still counts
    assert [w for w in warnings if "malformed JSON" in w] == [
        "digits/allreduce/seed1/metrics.jsonl: 2 malformed JSON lines skipped (lines 3, 4)"]
    assert not any("differ" in w for w in warnings)  # the groups' runs share their settings
    assert "## Warnings" in text and "digits/allreduce/seed1/metrics.jsonl: 2 malformed" in text

    # every referenced figure exists and is a real PNG
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    # 2 sections x (step, time, MB, consensus, time breakdown); their algo numbers are
    # constant (grad_norm 0.5): no observables figure, a line of text instead
    assert len(images) == 10
    assert "Observables that keep one value: grad_norm (allreduce 0.5, acga-fast 0.5)" in text
    for image in images:
        data = (root / image).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 10_000, image

    # points.csv: one row per step record of every finished run, values as in the files
    points = read_csv(root / "points.csv")
    expected = {(label, seed, r["step"]): r for (label, seed), recs in finished.items()
                for r in recs if r["type"] == "step"}
    assert len(points) == len(expected)
    for row in points:
        rec = expected[row["label"], int(row["seed"]), int(row["step"])]
        assert float(row["loss"]) == pytest.approx(rec["loss"], rel=1e-12)
        assert float(row["eval_loss"]) == pytest.approx(rec["eval_loss"], rel=1e-12)
        assert float(row["time_s"]) == pytest.approx(rec["time_s"], rel=1e-12)
        assert float(row["mb_sent"]) == pytest.approx(rec["comm_bytes"] / 1e6, rel=1e-12)
        if row["task"] == "digits":
            assert float(row["eval_acc"]) == pytest.approx(rec["eval_acc"], rel=1e-12)
        else:
            assert row["eval_acc"] == ""

    # summary.csv: final metrics, bytes per step, steps/time to target, ratios
    summary = {row["label"]: row for row in read_csv(root / "summary.csv")}
    assert set(summary) == {"allreduce", "acga-fast", "linreg-allreduce", "linreg-acga"}
    to_target = {}
    for label in ("allreduce", "acga-fast"):
        row = summary[label]
        finals = [finished[label, s][-1]["eval_acc"] for s in (0, 1)]
        assert row["n_seeds"] == "2" and row["seeds"] == "0;1"
        assert float(row["eval_acc_mean"]) == pytest.approx(statistics.mean(finals))
        assert float(row["eval_acc_std"]) == pytest.approx(statistics.stdev(finals))
        times = [finished[label, s][-1]["time_s"] for s in (0, 1)]
        assert float(row["time_s_mean"]) == pytest.approx(statistics.mean(times))
        algo = "allreduce" if label == "allreduce" else "acga"
        assert float(row["bytes_per_step_mean"]) == BYTES_PER_STEP[algo]
        assert float(row["bytes_per_step_mean_workers_mean"]) == BYTES_PER_STEP[algo]
        hits = [first_reach(finished[label, s], target) for s in (0, 1)]
        assert all(hits)
        assert float(row["target"]) == target and row["n_reached"] == "2"
        to_target[label] = (statistics.mean(h["step"] for h in hits),
                            statistics.mean(h["time_s"] for h in hits))
        assert float(row["steps_to_target_mean"]) == pytest.approx(to_target[label][0])
        assert float(row["time_to_target_mean"]) == pytest.approx(to_target[label][1])
    steps_ratio = to_target["acga-fast"][0] / to_target["allreduce"][0]
    time_ratio = to_target["acga-fast"][1] / to_target["allreduce"][1]
    assert steps_ratio < 1 < time_ratio  # fewer steps, more time per step
    fast = summary["acga-fast"]
    assert float(fast["steps_to_target_vs_allreduce"]) == pytest.approx(steps_ratio)
    assert float(fast["time_to_target_vs_allreduce"]) == pytest.approx(time_ratio)
    assert float(summary["allreduce"]["steps_to_target_vs_allreduce"]) == 1.0
    # ... and the same numbers in the markdown table
    row = next(line for line in text.splitlines()
               if line.startswith("| acga-fast |") and "x |" in line)
    assert f"{steps_ratio:.3g}x" in row and f"{time_ratio:.3g}x" in row
    assert f"{BYTES_PER_STEP['acga']:,}" in row

    # linreg has no accuracy: eval_loss and the default loss target from its allreduce
    lin = summary["linreg-acga"]
    assert lin["target_metric"] == "eval_loss" and lin["eval_acc_mean"] == ""
    reference = finished["linreg-allreduce", 0][-1]["eval_loss"]
    assert float(lin["target"]) == pytest.approx(1.05 * reference)
    assert "--target-acc" not in lin["target_rule"]


def test_default_target_and_not_reached(runs, tmp_path):
    root, finished = runs
    out = tmp_path / "elsewhere"
    path = report.write_report(root, out, figures=False, warn=lambda m: None)
    assert path == out / "report.md" and not (root / "report.md").exists()
    summary = {row["label"]: row for row in read_csv(out / "summary.csv")}
    base = statistics.mean(finished["allreduce", s][-1]["eval_acc"] for s in (0, 1))
    target = 0.95 * base
    assert float(summary["acga-fast"]["target"]) == pytest.approx(target)
    assert "0.95 x the allreduce group" in summary["acga-fast"]["target_rule"]
    text = path.read_text(encoding="utf-8")
    assert f"eval_acc >= {target:.4g}" in text
    for label in ("allreduce", "acga-fast"):
        hits = [first_reach(finished[label, s], target) for s in (0, 1)]
        reached = [h["step"] for h in hits if h is not None]
        assert int(summary[label]["n_reached"]) == len(reached)
        if reached:
            assert float(summary[label]["steps_to_target_mean"]) == statistics.mean(reached)

    # a target nobody reaches: "not reached", no ratio
    report.write_report(root, out, target_acc=0.99, figures=False, warn=lambda m: None)
    summary = {row["label"]: row for row in read_csv(out / "summary.csv")}
    assert summary["acga-fast"]["n_reached"] == "0"
    assert summary["acga-fast"]["steps_to_target_vs_allreduce"] == ""
    assert "not reached" in (out / "report.md").read_text(encoding="utf-8")


def test_no_allreduce_group_uses_the_worst_group(tmp_path):
    root = tmp_path / "runs"
    finals = {}
    for label, algo in (("a", "acga"), ("b", "acga")):
        recs = write_run(root, label, algo=algo, seed=0, label=label,
                         steps=30 if label == "a" else 60)
        finals[label] = recs[-1]["eval_acc"]
    report.write_report(root, figures=False, warn=lambda m: None)
    rows = read_csv(root / "summary.csv")
    assert float(rows[0]["target"]) == pytest.approx(0.95 * min(finals.values()))
    assert all(r["steps_to_target_vs_allreduce"] == "" for r in rows)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="accord")
    report.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["report", *argv])


def test_cli_errors(tmp_path, capsys):
    assert report.run(parse([str(tmp_path / "missing")])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("accord report: error:") and "does not exist" in err
    assert len(err.splitlines()) == 1
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert report.run(parse([str(tmp_path / "empty")])) == 2
    assert "no runs" in capsys.readouterr().err


def test_cli_writes_the_report(tmp_path, capsys):
    root = tmp_path / "runs"
    write_run(root, "a", algo="allreduce", seed=0, steps=20, garbage=True)
    code = report.run(parse([str(root), "--out", str(tmp_path / "r"), "--target-acc", "0.5"]))
    assert code == 0
    out = capsys.readouterr()
    assert str(tmp_path / "r" / "report.md") in out.out and "malformed" in out.err
    assert "eval_acc >= 0.5 (given (--target-acc))" in \
        (tmp_path / "r" / "report.md").read_text(encoding="utf-8").replace("`", "")


# -- every status: diverged runs apart, causes of failures, events, unreadable files ----------

def test_diverged_runs_are_listed_apart_and_never_averaged(tmp_path):
    """A diverged seed (new status, and an old file marked ok with nulls) enters no mean,
    no to-target number, no point and no figure; it is listed with its step."""
    root = tmp_path / "runs"
    finished = {s: write_run(root, f"allreduce/seed{s}", algo="allreduce", seed=s)
                for s in (0, 1)}
    # finite values up to the divergence, all different from the finished seeds'
    write_run(root, "allreduce/seed2", algo="allreduce", seed=2, diverge_at=25)
    write_run(root, "allreduce/seed3", algo="allreduce", seed=3, legacy_nan_at=40)
    write_run(root, "acga/seed0", algo="acga", seed=0, diverge_at=10)  # a whole group
    warnings: list[str] = []
    path = report.write_report(root, target_acc=0.5, warn=warnings.append)
    text = path.read_text(encoding="utf-8")
    assert warnings == []

    rows = {row["label"]: row for row in read_csv(root / "summary.csv")}
    assert set(rows) == {"allreduce"}  # the all-diverged acga group has no numbers
    row = rows["allreduce"]
    assert row["n_seeds"] == "2" and row["seeds"] == "0;1"
    for key, rec in (("eval_acc", -1), ("eval_loss", -1), ("time_s", -1)):
        assert float(row[f"{key}_mean"]) == pytest.approx(
            statistics.mean(finished[s][rec][key] for s in (0, 1))), key
    assert float(row["mb_sent_mean"]) == pytest.approx(BYTES_PER_STEP["allreduce"] * 60 / 1e6)
    hits = [first_reach(finished[s], 0.5) for s in (0, 1)]
    assert row["n_reached"] == "2"
    assert float(row["steps_to_target_mean"]) == statistics.mean(h["step"] for h in hits)
    assert float(row["time_to_target_mean"]) == pytest.approx(
        statistics.mean(h["time_s"] for h in hits))
    assert {(r["label"], r["seed"]) for r in read_csv(root / "points.csv")} == {
        ("allreduce", "0"), ("allreduce", "1")}
    assert "2 finished, 3 diverged, 0 failed" in text

    digits = text.split("## digits")[1].split("## Diverged runs")[0]
    assert ("Not in these numbers: acga seed 0 (diverged at step 10), allreduce seed 2 "
            "(diverged at step 25), allreduce seed 3 (diverged at step 40)") in digits
    diverged = text.split("## Diverged runs")[1].split("\n## ")[0]
    lines = {line.split("|")[1].strip(" `"): line for line in diverged.splitlines()
             if line.startswith("| `")}
    assert set(lines) == {"allreduce/seed2", "allreduce/seed3", "acga/seed0"}
    assert lines["allreduce/seed2"].endswith(
        "| 25 | non-finite eval_loss of the consensus model |")
    assert "| 10 |" in lines["acga/seed0"]
    assert "| 40 |" in lines["allreduce/seed3"] and "inferred" in lines["allreduce/seed3"]
    assert "## Failed, interrupted and incomplete runs" not in text


def test_failed_and_interrupted_runs_show_their_cause(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "ok", algo="allreduce", seed=0)
    consequences = [{"rank": 0, "error": "ConnectionResetError: peer closed"},
                    {"rank": 3, "error": "ConnectionResetError: peer closed"}]
    write_run(root, "crash", algo="acga", seed=0, fail_at=12,
              summary={"failed_rank": 2, "error": "InjectedFault: crash on rank 2",
                       "consequences": consequences})
    # rank 0's error file came first, but the summary names the root cause
    (root / "crash" / "logs" / "rank0.error").write_text(
        json.dumps({"rank": 0, "time": 1.0, "error": "ConnectionResetError: peer closed"}))
    write_run(root, "stopped", algo="acga", seed=1, stop_at=20)
    with (root / "stopped" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"type": "summary", "status": "interrupted", "steps": 20}) + "\n")
    text = report.write_report(root, figures=False, warn=lambda m: None).read_text()
    problems = text.split("## Failed, interrupted and incomplete runs")[1]
    rows = {line.split("|")[1].strip(" `"): line.split("|") for line in problems.splitlines()
            if line.startswith("| `")}
    assert set(rows) == {"crash", "stopped"}
    assert rows["crash"][2].strip() == "failed"
    assert rows["crash"][-2].strip() == ("rank 2: InjectedFault: crash on rank 2 (then rank 0: "
                                         "ConnectionResetError: peer closed; +1 more)")
    assert rows["stopped"][2].strip() == "interrupted"
    assert rows["stopped"][-2].strip() == "interrupted (SIGINT or SIGTERM)"
    assert "1 finished, 0 diverged, 1 failed, 1 interrupted" in text


def test_event_records_are_normal_and_unknown_types_warn_once(tmp_path):
    root = tmp_path / "runs"
    plain = write_run(root, "plain/seed0", algo="allreduce", seed=0, steps=60, log_every=1)
    write_run(root, "delayed/seed0", algo="allreduce", seed=0, steps=60, log_every=1,
              label="delayed", events=3)
    events = sum('"type": "event"' in line for line in
                 (root / "delayed/seed0/metrics.jsonl").read_text().splitlines())
    assert events == 180
    warnings: list[str] = []
    report.write_report(root, figures=False, warn=warnings.append)
    assert warnings == []
    rows = {row["label"]: row for row in read_csv(root / "summary.csv")}
    assert float(rows["delayed"]["eval_acc_mean"]) == plain[-1]["eval_acc"]
    assert rows["delayed"]["steps_to_target_mean"] == rows["allreduce"]["steps_to_target_mean"]

    path = root / "plain/seed0/metrics.jsonl"
    lines = path.read_text().splitlines()
    extra = [json.dumps({"type": kind, "x": 1}) for kind in ("mystery", "mystery", "later")]
    path.write_text("\n".join(lines[:5] + extra + lines[5:]) + "\n")
    warnings.clear()
    report.write_report(root, figures=False, warn=warnings.append)
    assert warnings == ["plain/seed0/metrics.jsonl: 3 records of unknown type skipped "
                        "('later', 'mystery')"]


def random_bytes(n: int) -> bytes:
    import random

    return random.Random(0).randbytes(n)


def test_a_file_of_random_bytes_is_one_line_and_no_readable_run_fails(tmp_path, capsys):
    root = tmp_path / "runs"
    (root / "noise").mkdir(parents=True)
    (root / "noise" / "metrics.jsonl").write_bytes(random_bytes(30_000))
    assert (root / "noise" / "metrics.jsonl").read_bytes().count(b"\n") > 100
    assert report.run(parse([str(root)])) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert err[0].startswith("accord report: warning: noise/metrics.jsonl: ")
    assert "not a metrics file (none of its 132 lines is a JSON record); skipped" in err[0]
    assert err[1].startswith("accord report: error: no readable run")
    assert not (root / "report.md").exists()

    # beside a good run: still one line for the bad file, and the report is written
    write_run(root, "good", algo="allreduce", seed=0)
    assert report.run(parse([str(root), "--target-acc", "0.5"])) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "noise/metrics.jsonl" in err[0]
    text = (root / "report.md").read_text(encoding="utf-8")
    problems = text.split("## Failed, interrupted and incomplete runs")[1]
    assert "`noise`" in problems and "unreadable" in problems
    assert [r["label"] for r in read_csv(root / "summary.csv")] == ["allreduce"]


def test_binary_metrics_file_is_one_line(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "good", algo="allreduce", seed=0)
    (root / "torn").mkdir()
    (root / "torn" / "metrics.jsonl").write_bytes(b"\xff\xfe\x00\n" * 50 + b'{"type": ')
    warnings: list[str] = []
    report.write_report(root, figures=False, warn=warnings.append)
    assert warnings == ["torn/metrics.jsonl: not a metrics file (none of its 51 lines is a "
                        "JSON record); skipped"]


def test_a_null_training_loss_alone_is_not_divergence(tmp_path):
    """One rank's NaN loss makes the logged mean loss null while the non-finite guard keeps
    the run healthy (finite evaluation): an ok run, in the numbers."""
    root = tmp_path / "runs"
    records = write_run(root, "guarded", algo="allreduce", seed=0)
    path = root / "guarded" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[3] = json.dumps({**json.loads(lines[3]), "loss": None})
    path.write_text("\n".join(lines) + "\n")
    text = report.write_report(root, figures=False, warn=lambda m: None).read_text()
    assert "## Diverged runs" not in text and "1 finished, 0 diverged" in text
    row = read_csv(root / "summary.csv")[0]
    assert float(row["eval_acc_mean"]) == records[-1]["eval_acc"]


def _with_membership(root: Path, rel: str, changes: list[tuple[int, list[int]]],
                     discarded: int, respawns: int) -> None:
    """Insert a fault-tolerant run's events (as ft_run merges them) into a written run."""
    path = root / rel / "metrics.jsonl"
    lines = path.read_text().splitlines()
    events = [{"type": "event", "kind": "membership", "step": step, "participants": who,
               "joined": [], "left": [], "time": 1.0 + step} for step, who in changes]
    events += [{"type": "event", "kind": "discarded", "step": 20, "rank": r, "time": 30.0}
               for r in range(discarded)]
    summary = json.loads(lines[-1])
    summary["respawns"] = respawns
    lines = lines[:1] + [json.dumps(e) for e in reversed(events)] + lines[1:-1] + \
        [json.dumps(summary)]
    path.write_text("\n".join(lines) + "\n")


def test_membership_of_fault_tolerant_runs(tmp_path):
    """Participants per step: each run's changes in step order (the file's order is the
    workers' merge, not the steps'), its fewest participants, discarded steps and
    respawns, and the participants figure; a fixed-world section has none of it."""
    root = tmp_path / "runs"
    write_run(root, "digits/allreduce/seed0", algo="allreduce", seed=0, workers=3)
    write_run(root, "digits/ft/seed0", algo="allreduce", seed=0, workers=3, label="ft")
    write_run(root, "digits/ft/seed1", algo="allreduce", seed=1, workers=3, label="ft")
    _with_membership(root, "digits/ft/seed0", [(0, [0, 1, 2]), (21, [0, 2])], 2, 0)
    _with_membership(root, "digits/ft/seed1", [(0, [0, 1, 2]), (21, [0, 2]),
                                               (34, [0, 1, 2])], 3, 1)
    write_run(root, "fixed/allreduce", algo="allreduce", seed=0, task="linreg")
    path = report.write_report(root)
    text = path.read_text()
    assert "| ft | 0 | 3 (step 0) → 2 (step 21) | 2 | 2 | 0 |" in text
    assert "| ft | 1 | 3 (step 0) → 2 (step 21) → 3 (step 34) | 2 | 3 | 1 |" in text
    assert text.count("### Membership (fault-tolerant runs)") == 1
    figure = root / "figures" / "digits_w3_participants.png"
    assert figure.read_bytes().startswith(PNG_SIGNATURE)
    assert "(figures/digits_w3_participants.png)" in text
    assert not (root / "figures" / "linreg_w2_participants.png").exists()


def test_a_metrics_file_nested_100000_deep_is_one_line_and_nothing_is_written(tmp_path,
                                                                              capsys):
    """json.loads raised RecursionError out of accord report."""
    root = tmp_path / "runs"
    (root / "deep").mkdir(parents=True)
    (root / "deep" / "metrics.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    assert report.run(parse([str(root)])) == 2
    assert capsys.readouterr().err.splitlines() == [
        "accord report: warning: deep/metrics.jsonl: not a metrics file (none of its 1 line "
        "is a JSON record); skipped",
        f"accord report: error: no readable run under {str(root)!r}: 1 run directory and "
        "none holds a metrics record (first: deep: metrics.jsonl: not a metrics file (none "
        "of its 1 line is a JSON record))"]
    assert sorted(p.name for p in root.rglob("*")) == ["deep", "metrics.jsonl"]
    # a deep record beside good ones: that line is skipped, the run still counts
    records = write_run(root, "good", algo="allreduce", seed=0)
    path = root / "good" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    deep = json.dumps({"type": "step", "step": 3, "algo": {}})
    deep = deep.replace("{}", "{\"x\": " * 70 + "1" + "}" * 70)
    path.write_text("\n".join(lines[:2] + [deep] + lines[2:]) + "\n")
    warnings: list[str] = []
    report.write_report(root, target_acc=0.5, figures=False, warn=warnings.append)
    assert "good/metrics.jsonl: 1 malformed JSON line skipped (line 3)" in warnings
    row = read_csv(root / "summary.csv")[0]
    assert float(row["eval_acc_mean"]) == records[-1]["eval_acc"]


def test_records_that_break_the_metrics_schema_are_one_warning_per_type(tmp_path):
    """Each type's first bad record names its line and field (a step record whose step was
    a string was "without an integer 'step'"; a header whose config was a list was read as
    a run of task '?'; a time_s of "fast" was taken as no time)."""
    root = tmp_path / "runs"
    records = write_run(root, "good", algo="allreduce", seed=0)
    write_run(root, "other", algo="acga", seed=0)
    path = root / "good" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[3] = json.dumps({**json.loads(lines[3]), "step": "5"})
    lines[4] = json.dumps({**json.loads(lines[4]), "time_s": "fast"})
    lines[5] = json.dumps({**json.loads(lines[5]), "eval_acc": [0.5]})
    path.write_text("\n".join(lines) + "\n")
    bad_header = root / "other" / "metrics.jsonl"
    other = bad_header.read_text().splitlines()
    other[0] = json.dumps({**json.loads(other[0]), "config": ["digits"]})
    bad_header.write_text("\n".join(other) + "\n")
    warnings: list[str] = []
    report.write_report(root, target_acc=0.5, figures=False, warn=warnings.append)
    assert warnings == [
        "good/metrics.jsonl: 3 step records skipped, not of the metrics schema (line 4: "
        "field 'step': expected an integer >= 0, got \"5\")",
        "other/metrics.jsonl: 1 header record skipped, not of the metrics schema (line 1: "
        "field 'config': expected an object (the run's config), got [\"digits\"])"]
    rows = read_csv(root / "summary.csv")
    assert [r["label"] for r in rows] == ["allreduce"]  # "other" has no header: not a result
    assert float(rows[0]["eval_acc_mean"]) == records[-1]["eval_acc"]
    text = (root / "report.md").read_text(encoding="utf-8")
    assert "`other`" in text.split("## Failed, interrupted and incomplete runs")[1]
