"""``accord report``'s figures: colour per algorithm, line style per variant, the consensus,
observables and time-breakdown figures, ``--log-y`` / ``--smooth`` / ``--formats``, the
3-seed rule of "separable", and ``accord bench --tensorboard``; on hand-written run
directories (no worker is started)."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import pytest
from test_report import PNG_SIGNATURE, header, parse, read_csv

from accord import report
from accord.report.style import label_styles, smooth, variant_kinds


def write(root: Path, rel: str, *, algo: str, seed: int, label: str | None = None,
          steps: int = 40, config: dict | None = None, algo_values=None,
          summary: dict | None = None, final: float | None = None) -> None:
    """A finished digits run of 2 workers logging every 10 steps; ``algo_values(step)``
    gives the step records' ``algo`` object; ``final`` the last eval_acc."""
    run_dir = root / rel
    run_dir.mkdir(parents=True)
    head = header(algo, "digits", 2, seed, steps, 10, label, str(run_dir))
    head["config"].update(config or {})
    records = [head]
    for step in range(10, steps + 1, 10):
        acc = 0.5 + 0.01 * step + 0.001 * seed
        if final is not None and step == steps:
            acc = final
        records.append({
            "type": "step", "step": step, "loss": 2.0 / step, "eval_loss": 1.0 / step,
            "eval_acc": acc, "rank0_eval_acc": acc - 0.01 * (algo != "allreduce"),
            "consensus_distance": 0.0 if algo == "allreduce" else 0.1 / step,
            "time_s": 0.1 * step, "comm_bytes": 1000 * step, "comm_s": 0.04 * step,
            "algo": algo_values(step) if algo_values else {}})
    last = records[-1]
    records.append({"type": "summary", "status": "ok", "steps": steps,
                    "time_s": last["time_s"] + 0.5, "train_s": last["time_s"] + 0.1,
                    "worker_time_s": [last["time_s"], last["time_s"] + 0.2],
                    "comm_bytes": last["comm_bytes"], "comm_s": last["comm_s"],
                    "eval_acc": last["eval_acc"], "eval_loss": last["eval_loss"],
                    **(summary or {})})
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n",
                                           encoding="utf-8")


def images(text: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)


# -- colours and line styles ----------------------------------------------------------------

def test_an_algorithm_has_one_colour_in_every_report():
    from accord import algorithms

    builtins = sorted(algorithms.REGISTRY)
    colours = {a: report.algorithm_colour(a) for a in builtins}
    assert colours["allreduce"] == "#000000"  # the baseline
    assert len(set(colours.values())) == len(builtins)  # no two built-ins alike
    assert report.algorithm_colour("my_plugin_algo") == report.algorithm_colour("my_plugin_algo")
    assert report.algorithm_colour("my_plugin_algo") in report.PALETTE

    def run(label: str, algo: str, config: dict | None = None) -> report.Run:
        head = header(algo, "digits", 2, 0, 10, 5, label, "/x")
        head["config"].update(config or {})
        return report.Run(path=Path("/x"), name=label, header=head)

    # two reports with other labels around: the same colour for the same algorithm, and
    # a variant of it (another label, a straggler) keeps the algorithm's colour
    one = label_styles([run("acga", "acga"), run("wagma", "wagma")])
    two = label_styles([run("adasum", "adasum"), run("acga-b0", "acga"),
                        run("acga-slow3x", "acga", {"faults": ["slow:rank=1,factor=3"]}),
                        run("zz", "easgd")])
    assert one["acga"].colour == two["acga-b0"].colour == two["acga-slow3x"].colour \
        == colours["acga"]
    assert one["wagma"].colour == colours["wagma"] != colours["acga"]
    # the straggler is dashed; the two plain acga labels differ by a marker
    assert two["acga-slow3x"].linestyle == "--" and two["acga-b0"].linestyle == "-"
    assert one["acga"].marker is None and two["acga-b0"].marker is None
    three = label_styles([run("acga", "acga"), run("acga-b0", "acga"), run("acga-b9", "acga")])
    assert [three[k].marker for k in ("acga", "acga-b0", "acga-b9")] == [None, "o", "s"]


@pytest.mark.parametrize(("config", "kinds", "style"), [
    ({}, (), "-"),
    ({"faults": ["slow:rank=1,factor=3"]}, ("straggler",), "--"),
    ({"faults": ["delay:rank=all,seconds=0.04"]}, (), "-"),  # emulated compute of everyone
    ({"faults": ["crash:rank=1,step=5"]}, ("fault",), None),
    ({"compress": "int8"}, ("compression",), ":"),
    ({"network": "100mbit,5ms"}, ("link",), "-."),
    ({"compress": "topk", "network": "1gbit"}, ("compression", "link"), None),
])
def test_line_style_by_variant(config, kinds, style):
    assert variant_kinds(config) == kinds
    from accord.report.style import variant_style

    got = variant_style(kinds)
    if style is not None:
        assert got == style
    else:  # dashes of their own, none of the plain ones
        assert isinstance(got, tuple) and got[0] == 0 and len(got[1]) >= 2


def test_the_report_draws_each_algorithm_in_its_colour(tmp_path):
    root = tmp_path / "runs"
    for seed in (0, 1):
        write(root, f"allreduce/{seed}", algo="allreduce", seed=seed)
        write(root, f"acga/{seed}", algo="acga", seed=seed)
        write(root, f"wagma/{seed}", algo="wagma", seed=seed,
              config={"faults": ["slow:rank=1,factor=4"]}, label="wagma-slow")
    report.write_report(root, formats="svg", warn=lambda m: None)
    svg = (root / "figures" / "digits_w2_step.svg").read_text(encoding="utf-8")
    for algo in ("allreduce", "acga", "wagma"):
        assert f"stroke: {report.algorithm_colour(algo)}" in svg, algo
    assert "stroke-dasharray" in svg  # the straggler's dashes


# -- separable: from 3 seeds ----------------------------------------------------------------

def test_separable_needs_three_seeds_per_group(tmp_path):
    root = tmp_path / "runs"
    for seed in (0, 1):  # far apart, but 2 seeds each
        write(root, f"allreduce/{seed}", algo="allreduce", seed=seed, final=0.80 + seed / 100)
        write(root, f"acga/{seed}", algo="acga", seed=seed, final=0.95 + seed / 100)
    text = report.write_report(root, figures=False, warn=lambda m: None).read_text()
    assert ("acga vs allreduce: final eval_acc +0.15 (acga better); not separable at this "
            "scale (acga has 2 finished seeds; 3 needed).") in text
    assert ("Separable is judged only from at least 3 finished seeds per group; too few "
            "here: allreduce (2), acga (2).") in text
    write(root, "allreduce/2", algo="allreduce", seed=2, final=0.82)
    write(root, "acga/2", algo="acga", seed=2, final=0.97)
    text = report.write_report(root, figures=False, warn=lambda m: None).read_text()
    assert ("acga vs allreduce: final eval_acc +0.15 (acga better); separable (seed ranges "
            "[0.95, 0.97] and [0.8, 0.82] do not overlap).") in text
    assert "too few here" not in text
    assert report.SEPARABLE_SEEDS == 3


# -- the time breakdown ---------------------------------------------------------------------

def test_breakdown_parts_sum_to_the_run_time(tmp_path):
    root = tmp_path / "runs"
    write(root, "allreduce/0", algo="allreduce", seed=0)  # time_s 4.5, loop 4.0, comm 1.6
    write(root, "easgd/0", algo="easgd", seed=0,  # a background thread: comm beyond the loop
          summary={"comm_s": 9.0})
    write(root, "old/0", algo="acga", seed=0, label="old",  # written before worker_time_s
          summary={"worker_time_s": None, "train_s": None})
    runs = {r.label: r for r in (report.load_run(d, root, print) for d in report.find_runs(root))}
    for label, run in runs.items():
        parts = report.time_breakdown(run)
        assert set(parts) == set(report.TIME_PARTS)
        assert sum(parts.values()) == pytest.approx(run.summary["time_s"], abs=1e-9), label
        assert all(v >= 0 for v in parts.values()), label
    assert report.time_breakdown(runs["allreduce"]) == pytest.approx(
        {"compute": 4.0 - 1.6, "communication": 1.6, "waiting": 0.5})
    assert report.time_breakdown(runs["easgd"]) == pytest.approx(
        {"compute": 0.0, "communication": 4.0, "waiting": 0.5})
    assert report.time_breakdown(runs["old"]) == pytest.approx(
        {"compute": 4.5 - 1.6, "communication": 1.6, "waiting": 0.0})
    del runs["old"].summary["comm_s"]
    assert report.time_breakdown(runs["old"]) is None

    text = report.write_report(root, warn=lambda m: None).read_text(encoding="utf-8")
    table = text.split("### Time breakdown")[1].split("###")[0]
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ")]
    assert [r[0].strip() for r in rows[1:]] == ["allreduce", "easgd", "old"]
    for row in rows[1:]:
        compute, comm, wait, total = (float(x) for x in row[1:5])
        assert compute + comm + wait == pytest.approx(total, rel=2e-3)
    assert "`comm_s`" in table and "`worker_time_s[0]`" in table  # what each is made of
    summary = {r["label"]: r for r in read_csv(root / "summary.csv")}
    assert float(summary["allreduce"]["communication_s_mean"]) == pytest.approx(1.6)
    assert sum(float(summary["easgd"][f"{p}_s_mean"]) for p in report.TIME_PARTS) == \
        pytest.approx(4.5)
    assert "figures/digits_w2_breakdown.png" in images(text)


# -- consensus and observables ---------------------------------------------------------------

def test_consensus_and_observables_figures(tmp_path):
    root = tmp_path / "runs"
    for seed in (0, 1):
        write(root, f"allreduce/{seed}", algo="allreduce", seed=seed,
              algo_values=lambda s: {"grad_norm": 1.0 / s})
        write(root, f"acga/{seed}", algo="acga", seed=seed,
              algo_values=lambda s: {"coef_min": 0.1 + s / 100, "guard_hits": 0.0,
                                     "grad_norm": 2.0 / s})
    text = report.write_report(root, warn=lambda m: None).read_text(encoding="utf-8")
    drawn = images(text)
    for name in ("consensus", "observables", "breakdown", "step", "time", "mb"):
        path = f"figures/digits_w2_{name}.png"
        assert path in drawn, name
        data = (root / path).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 10_000, name
    from accord.report.panels import constants, observables

    section = report.build_sections(
        [report.load_run(d, root, print) for d in report.find_runs(root)], None, None, print)[0]
    # by the first group reporting them (allreduce, then acga); guard_hits never changes
    assert observables(section) == ["grad_norm", "coef_min"]
    assert constants(section) == ["guard_hits (acga 0)"]
    assert "Observables that keep one value: guard_hits (acga 0)." in text


# -- options: --log-y, --smooth, --formats ---------------------------------------------------

def test_formats_are_written_beside_the_png(tmp_path):
    root = tmp_path / "runs"
    write(root, "allreduce/0", algo="allreduce", seed=0)
    write(root, "acga/0", algo="acga", seed=0)
    text = report.write_report(root, formats="png,svg,pdf", warn=lambda m: None).read_text()
    pngs = images(text)
    assert len(pngs) == 5 and all(p.endswith(".png") for p in pngs)
    for png in pngs:
        assert (root / png).read_bytes()[:8] == PNG_SIGNATURE
        assert (root / png).with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
        svg = (root / png).with_suffix(".svg").read_text(encoding="utf-8")
        assert svg.startswith("<?xml") and "<svg" in svg
    assert "Each figure is also written as SVG and PDF beside its PNG file" in text
    names = sorted(p.name for p in (root / "figures").iterdir())
    assert not [n for n in names if n.endswith(".tmp")]
    # the default: PNG only
    out = tmp_path / "png"
    report.write_report(root, out, warn=lambda m: None)
    assert {p.suffix for p in (out / "figures").iterdir()} == {".png"}


@pytest.mark.parametrize(("argv", "error"), [
    (["--log-y", "yes"], "--log-y: got 'yes', allowed: auto, on, off"),
    (["--smooth", "1"], "--smooth: got '1', allowed: a number from 0 (no smoothing) up to "
                        "but not including 1"),
    (["--smooth", "-0.2"], "--smooth: got '-0.2', allowed:"),
    (["--smooth", "nan"], "--smooth: got 'nan', allowed:"),
    (["--smooth", "lots"], "--smooth: got 'lots', allowed:"),
    (["--formats", "png,jpg"], "--formats: got 'png,jpg', allowed: a comma-separated list of "
                               "png, svg, pdf (PNG is always written)"),
    (["--formats", ""], "--formats: got"),
])
def test_bad_figure_options_are_one_line(tmp_path, capsys, argv, error):
    root = tmp_path / "runs"
    write(root, "allreduce/0", algo="allreduce", seed=0)
    assert report.run(parse([str(root), *argv])) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"accord report: error: {error}") and err.count("\n") == 1
    assert not (root / "report.md").exists()  # refused before anything is written


def test_log_axis_and_smoothing(tmp_path):
    root = tmp_path / "runs"
    for seed in (0, 1):
        write(root, f"allreduce/{seed}", algo="allreduce", seed=seed)
        write(root, f"acga/{seed}", algo="acga", seed=seed)
    code = report.run(parse([str(root), "--log-y", "on", "--smooth", "0.6"]))
    assert code == 0
    text = (root / "report.md").read_text(encoding="utf-8")
    assert "exponential moving average of weight 0.6" in text and "`--log-y on`" in text

    from matplotlib.figure import Figure

    from accord.report.figures import curve, y_scale
    from accord.report.style import figure_options

    section = report.build_sections(
        [report.load_run(d, root, print) for d in report.find_runs(root)], None, None, print)[0]
    loss = [curve(g, "loss") for g in section.groups]  # 0.2 .. 0.05: one decade
    distance = [curve(g, "consensus_distance") for g in section.groups]  # 0 for allreduce
    acc = [curve(g, "eval_acc") for g in section.groups]
    for log_y, want in (("auto", ("linear", "linear", "linear")),
                        ("on", ("log", "symlog", "linear")),
                        ("off", ("linear", "linear", "linear"))):
        options = figure_options(log_y)
        got = tuple(y_scale(Figure().add_subplot(), curves, options, loglike)
                    for curves, loglike in ((loss, True), (distance, True), (acc, False)))
        assert got == want, log_y
    wide = [curve(g, lambda rec: 10.0 ** (-rec["step"] / 10)) for g in section.groups]
    assert y_scale(Figure().add_subplot(), wide, figure_options("auto"), False) == "log"

    assert smooth([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])  # debiased
    assert smooth([0.0, 1.0], 0.0) == [0.0, 1.0]
    got = smooth([0.0, math.nan, 1.0], 0.5)
    assert got[0] == 0.0 and math.isnan(got[1]) and got[2] == pytest.approx(0.5 / 0.75)


# -- accord bench --tensorboard --------------------------------------------------------------

def test_bench_tensorboard_reaches_every_run(tmp_path):
    from accord import bench
    from accord.cli import _bench_specs

    args = argparse.Namespace(preset="quick", algos="", variant=[], tasks=None, workers=None,
                              seeds=None, steps=None, set=[], fault=[], plugins=[], tune=[],
                              tune_seed=None, tune_seeds=None, out=str(tmp_path),
                              no_progress=True, tensorboard=True)
    specs, _, _ = _bench_specs(args)
    configs = bench.plan(specs, tmp_path, create=False)
    assert configs and all(c.tensorboard for c in configs)
    args.tensorboard = False
    assert not any(c.tensorboard for c in bench.plan(_bench_specs(args)[0], tmp_path,
                                                     create=False))
