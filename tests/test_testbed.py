"""Several hosts on one machine (accord.run.testbed): network namespaces, torchrun --nnodes 2
and the fault-tolerant launcher across them, and a teardown that leaves nothing behind.

Skipped, with the reason, where namespaces cannot be made (not root, not Linux, a
container without CAP_NET_ADMIN). Every run is 2 hosts of 1 worker on digits for a few
steps; the runs that repeat what a faster test covers are marked slow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from accord.comm.network import Link, Network, parse_network
from accord.run import testbed
from accord.run.metrics import read_metrics

REASON = testbed.available()
needs_namespaces = pytest.mark.skipif(REASON is not None, reason=f"testbed: {REASON}")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PY = sys.executable
TRAIN = ["--algo", "allreduce", "--task", "digits", "--no-progress"]
# what must agree between two runs of one computation (not the times)
SAME = ("step", "loss", "eval_loss", "eval_acc", "rank0_eval_loss", "rank0_eval_acc",
        "consensus_distance", "comm_bytes", "comm_calls", "algo")


def _steps(path: Path) -> list[dict]:
    return [{k: r.get(k) for k in SAME} for r in read_metrics(path) if r["type"] == "step"]


def _summary(path: Path) -> dict:
    return read_metrics(path)[-1]


class OneHost:
    """The reference: the same run with the local launcher, 2 workers on one host. Started
    in the background when first asked for, so it runs while a testbed run starts up."""

    def __init__(self, out: Path) -> None:
        self.path = out / "metrics.jsonl"
        self.proc = subprocess.Popen(
            [PY, "-m", "accord", "train", *TRAIN, "--workers", "2", "--steps", "20",
             "--out", str(out)], env=ENV, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)

    def metrics(self) -> Path:
        _, err = self.proc.communicate(timeout=120)
        assert self.proc.returncode == 0, err
        return self.path


@pytest.fixture(scope="module")
def one_host(tmp_path_factory: pytest.TempPathFactory) -> OneHost:
    ref = OneHost(tmp_path_factory.mktemp("one-host"))
    yield ref
    if ref.proc.poll() is None:
        ref.proc.kill()
        ref.proc.wait()


# -- refusals (no namespace needed) ---------------------------------------------------
def test_refuses_in_one_line_when_not_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(testbed, "_AVAILABLE", [])
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "need root" in testbed.available()
    with pytest.raises(testbed.TestbedError, match=r"^testbed: .*need root") as e:
        testbed.Testbed(2)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("argv, says", [
    (["--link", "10mbit,5ms"], "latency needs the netem qdisc"),
    (["--link", "fast"], "--link: got 'fast'"),
    (["--link", "10mbit", "--link-profile", "x.json"], "give one"),
])
def test_bad_link_in_one_line(tmp_path: Path, argv: list[str], says: str,
                              capsys: pytest.CaptureFixture[str]) -> None:
    if REASON is not None and "netem" in says:
        pytest.skip(f"testbed: {REASON}")
    code = testbed.main(["torchrun", "--hosts", "2", *argv, "--out", str(tmp_path / "r"),
                         "--", *TRAIN])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], lines
    assert not (tmp_path / "r").exists()


def test_a_link_profile_names_hosts(tmp_path: Path) -> None:
    if REASON is not None:
        pytest.skip(f"testbed: {REASON}")
    with pytest.raises(ValueError, match=r"pair \[0, 2\] names a rank >= the world size 2"):
        testbed.Testbed(2, Network(Link(1e6), {(0, 2): Link(1e5)}))


# -- building and tearing down ---------------------------------------------------------
@needs_namespaces
def test_hosts_reach_each_other_and_teardown_leaves_nothing() -> None:
    tb = testbed.Testbed(3, Network(parse_network("100mbit"),
                                    {(0, 2): parse_network("10mbit")}))
    with pytest.raises(RuntimeError, match="a failure inside"), tb:
        server = tb.start(0, [PY, "-c", (
            "import socket; s = socket.create_server(('10.77.0.1', 5000)); "
            "c, _ = s.accept(); c.sendall(socket.gethostname().encode())")])
        out = subprocess.run(tb.argv(2, [PY, "-c", (
            "import socket, time\n"
            "for _ in range(100):\n"
            "    try: c = socket.create_connection(('host0', 5000)); break\n"
            "    except OSError: time.sleep(0.05)\n"
            "print(socket.gethostname(), socket.gethostbyname('host1'), c.recv(10).decode())"
        )]), capture_output=True, text=True, check=True, timeout=30)
        assert out.stdout.split() == ["host2", "10.77.0.2", "host0"]
        assert server.wait(timeout=10) == 0
        qdisc = subprocess.run(["tc", "-n", tb.ns(0), "class", "show", "dev", "tb0"],
                               capture_output=True, text=True, check=True).stdout
        assert "rate 10Mbit" in qdisc and "rate 100Mbit" in qdisc  # to host 2, to host 1
        sleepers = [tb.start(i, ["sleep", "1000"]) for i in range(3)]
        # a process that left its session is still inside the namespace: killed too
        tb.start(1, ["setsid", "sleep", "1000"])
        assert testbed.leftovers(tb.prefix)
        raise RuntimeError("a failure inside")
    assert testbed.leftovers(tb.prefix) == []
    assert all(p.poll() == -signal.SIGKILL for p in sleepers)
    assert not [line for line in subprocess.run(["ip", "-o", "link"], capture_output=True,
                text=True).stdout.splitlines() if "acctb" in line or " tb0" in line]


@needs_namespaces
def test_ctrl_c_tears_down(tmp_path: Path) -> None:
    p = subprocess.Popen([PY, "-m", "accord.run.testbed", "torchrun", "--hosts", "2",
                          "--link", "10mbit", "--out", str(tmp_path / "r"), "--", *TRAIN,
                          "--steps", "100000"], env=ENV, stderr=subprocess.PIPE, text=True)
    prefix = f"acctb-{p.pid}-"
    deadline = time.monotonic() + 30
    while not any("process" in x for x in testbed.leftovers(prefix)):
        assert time.monotonic() < deadline and p.poll() is None, "no host process started"
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=30) == 128 + signal.SIGINT
    assert testbed.leftovers(prefix) == []


@needs_namespaces
def test_a_sigkilled_testbed_is_swept() -> None:
    code = ("import time; from accord.run.testbed import Testbed; tb = Testbed(2).up(); "
            "tb.start(1, ['sleep', '1000']); print('up', flush=True); time.sleep(1000)")
    p = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV)
    assert p.stdout.readline().strip() == "up"
    prefix = f"acctb-{p.pid}-"
    assert testbed.leftovers(prefix)
    p.kill()  # no teardown can run
    p.wait()
    swept = testbed.sweep_stale()
    assert f"{prefix}h0" in swept and f"{prefix}sw" in swept
    assert testbed.leftovers(prefix) == []


# -- runs across hosts -----------------------------------------------------------------
@needs_namespaces
def test_two_hosts_equal_one_host_bit_for_bit(tmp_path: Path, one_host: OneHost) -> None:
    with testbed.Testbed(2, parse_network("100mbit")) as tb:
        run = testbed.run_torchrun(tb, 1, [*TRAIN, "--steps", "20"], tmp_path, timeout=120)
    assert run.ok, run.outputs
    metrics, reference = tmp_path / "metrics.jsonl", one_host.metrics()
    steps = _steps(metrics)
    assert [s["step"] for s in steps] == [10, 20]
    assert steps == _steps(reference)
    two, one = _summary(metrics), _summary(reference)
    assert two["status"] == "ok" and (two["eval_loss"], two["eval_acc"]) == \
        (one["eval_loss"], one["eval_acc"])
    # each host wrote its own ranks' files; collected into one run
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == \
        ["rank0.heartbeat", "rank1.heartbeat"]
    hosts = {b.read_text().split()[1] for b in (tmp_path / "logs").iterdir()}
    assert hosts == {"host0", "host1"}
    assert testbed.leftovers(tb.prefix) == []


@needs_namespaces
def test_a_rank_killed_on_the_second_host_is_named(tmp_path: Path) -> None:
    # shared=True: rank 0 reads the other host's heartbeat (a shared filesystem, as NFS)
    with testbed.Testbed(2) as tb:
        run = testbed.run_torchrun(tb, 1, [*TRAIN, "--steps", "40", "--timeout", "3",
                                           "--fault", "kill:rank=1,step=10"],
                                   tmp_path, shared=True, timeout=120)
    assert run.returncodes == [1, 1]
    summary = _summary(tmp_path / "metrics.jsonl")
    assert summary["status"] == "failed"
    assert summary["failed_rank"] == 1 and summary["failed_step"] == 10
    assert [c["rank"] for c in summary["consequences"]] == [0]
    assert "10.77.0.2" in summary["consequences"][0]["error"]  # rank 0 saw host 1 go


@needs_namespaces
@pytest.mark.slow
def test_fault_tolerant_survives_the_loss_of_a_host(tmp_path: Path) -> None:
    with testbed.Testbed(2) as tb:
        run = testbed.run_fault_tolerant(
            tb, 1, [*TRAIN, "--steps", "60", "--timeout", "12", "--fault",
                    "delay:rank=all,seconds=0.05"], tmp_path, timeout=240, lose_host=1,
            lose_at_step=15)
    assert run.returncodes == [0, -signal.SIGKILL]
    recs = read_metrics(tmp_path / "metrics.jsonl")
    summary = recs[-1]
    assert summary["status"] == "ok" and summary["steps"] == 60
    assert summary["participants"] == [0]
    members = [r["participants"] for r in recs if r.get("kind") == "membership"]
    assert members[0] == [0, 1] and members[-1] == [0]
    assert testbed.leftovers(tb.prefix) == []


@needs_namespaces
@pytest.mark.slow
def test_checkpoint_resume_across_hosts(tmp_path: Path, one_host: OneHost) -> None:
    """Each host's ranks write their own files into one shared directory; resumed to step
    20 the run equals the uninterrupted one-host run. Without a shared directory rank 0
    cannot commit the manifest, and says so in one line."""
    with testbed.Testbed(2) as tb:
        first = testbed.run_torchrun(tb, 1, [*TRAIN, "--steps", "10", "--checkpoint-every",
                                             "10"], tmp_path, shared=True, timeout=120)
        assert first.ok, first.outputs
        step = tmp_path / "checkpoints" / "step-10"
        assert sorted(p.name for p in step.iterdir()) == \
            ["manifest.json", "rank0.pt", "rank1.pt"]
        second = testbed.run_torchrun(tb, 1, [*TRAIN, "--steps", "20", "--resume", "auto"],
                                      tmp_path, shared=True, timeout=120)
        assert second.ok, second.outputs
        assert _steps(tmp_path / "metrics.jsonl") == _steps(one_host.metrics())
        apart = tmp_path / "apart"
        run = testbed.run_torchrun(tb, 1, [*TRAIN, "--steps", "10", "--checkpoint-every",
                                           "10"], apart, timeout=120)
    assert run.returncodes == [1, 1]
    summary = _summary(apart / "metrics.jsonl")
    assert summary["failed_rank"] == 0
    assert "checkpoints need one shared filesystem" in summary["error"]
