"""Fault-tolerant mode on torchft (accord.ft.membership): real replica processes
(tests/ft_driver.py),
a Lighthouse in this process, short timeouts; every process is bounded and killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("RUST_LOG", "warn")  # before torchft starts its logger
pytest.importorskip("torchft")

from accord.ft import membership as ft

DRIVER = Path(__file__).with_name("ft_driver.py")
#: short, checked: dead replica dropped after ~1 s (join) or 1.5 s (heartbeat)
TIMEOUTS = {"heartbeat": 1.5, "join": 1.0, "quorum": 10.0, "process_group": 15.0,
            "step_deadline": 30.0}
RUN_LIMIT = 120.0  # seconds any one test may take, processes included


# -- helpers ------------------------------------------------------------------------------

class Cluster:
    """A Lighthouse here and driver processes, all stopped by :meth:`close`."""

    def __init__(self, tmp: Path, min_replicas: int, workers: int, steps: int,
                 algorithm: str = "allreduce", hp: tuple[str, ...] = (),
                 sleep: float = 0.0) -> None:
        self.tmp, self.workers, self.steps = tmp, workers, steps
        self.min, self.algorithm, self.hp, self.sleep = min_replicas, algorithm, hp, sleep
        self.server, self.address = ft.start_lighthouse(
            min_replicas, join_timeout_ms=int(TIMEOUTS["join"] * 1000), quorum_tick_ms=50,
            heartbeat_timeout_ms=int(TIMEOUTS["heartbeat"] * 1000))
        self.procs: dict[str, subprocess.Popen] = {}
        self.started = time.monotonic()
        self.go = tmp / "go"

    def out(self, name: str) -> Path:
        return self.tmp / f"{name}.jsonl"

    def spawn(self, replica: int, name: str | None = None, die_at: int | None = None,
              hold: str | None = None, extra: tuple[str, ...] = ()) -> str:
        name = name or f"r{replica}"
        cmd = [sys.executable, str(DRIVER), "--replica", str(replica),
               "--lighthouse", self.address, "--min", str(self.min),
               "--workers", str(self.workers), "--steps", str(self.steps),
               "--algorithm", self.algorithm, "--sleep", str(self.sleep),
               "--timeouts", json.dumps(TIMEOUTS), "--out", str(self.out(name)),
               "--go", str(self.go)]
        for kv in self.hp:
            cmd += ["--hp", kv]
        if die_at is not None:
            cmd += ["--die-at", str(die_at)]
        if hold is not None:
            cmd += ["--hold", hold]
        cmd += list(extra)
        env = {**os.environ, "RUST_LOG": "warn", "OMP_NUM_THREADS": "1"}
        for var in ft.TORCHFT_TIMEOUT_ENV:
            env.pop(var, None)
        self.procs[name] = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                            stderr=open(self.tmp / f"{name}.err", "w"))
        return name

    def start(self, replicas: int, **kwargs) -> list[str]:
        """Spawn replicas 0..replicas-1 and release them together once all are up (the
        first quorum then has all of them, whatever min_replicas is)."""
        names = [self.spawn(i, die_at=kwargs.get("die_at", {}).get(i), hold=kwargs.get("hold"))
                 for i in range(replicas)]
        for name in names:
            self.wait_until(name, lambda recs: any(r.get("ready") for r in recs), "start-up")
        self.go.touch()
        return names

    def left(self) -> float:
        return max(0.1, RUN_LIMIT - (time.monotonic() - self.started))

    def records(self, name: str) -> list[dict]:
        path = self.out(name)
        if not path.exists():
            return []
        lines = path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]

    def wait_until(self, name: str, predicate, what: str) -> list[dict]:
        deadline = time.monotonic() + self.left()
        while time.monotonic() < deadline:
            recs = self.records(name)
            if predicate(recs):
                return recs
            proc = self.procs[name]
            if proc.poll() is not None and not predicate(self.records(name)):
                raise AssertionError(f"{name} exited ({proc.returncode}) before {what}: "
                                     f"{self.stderr(name)}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {name}: {what}")

    def wait(self, name: str) -> int:
        try:
            return self.procs[name].wait(timeout=self.left())
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} did not finish: {self.stderr(name)}") from None

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(timeout=10)

    def stderr(self, name: str) -> str:
        path = self.tmp / f"{name}.err"
        return path.read_text()[-3000:] if path.exists() else ""

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        self.server.shutdown()


@pytest.fixture
def cluster(tmp_path):
    made: list[Cluster] = []

    def make(*args, **kwargs) -> Cluster:
        made.append(Cluster(tmp_path, *args, **kwargs))
        return made[-1]

    yield make
    for c in made:
        c.close()


def steps_of(recs: list[dict]) -> list[dict]:
    return [r for r in recs if "committed" in r]


def committed(recs: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in steps_of(recs) if r["committed"]}


def membership(recs: list[dict]) -> list[dict]:
    return [r for r in recs if r.get("kind") == "membership"]


def done(recs: list[dict]) -> dict | None:
    return next((r for r in recs if r.get("done")), None)


def assert_agree(a: list[float], b: list[float], tol: float = 1e-6) -> None:
    assert len(a) == len(b)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= tol


# -- no processes ---------------------------------------------------------------------------

def test_timeout_hierarchy():
    ft.check_timeouts(2, 10, 30, 60)
    ft.FTTimeouts().check()
    ft.FTTimeouts(**TIMEOUTS).check()
    with pytest.raises(ValueError, match=r"heartbeat timeout \(10 s\) must be below the "
                                         r"quorum timeout \(5 s\)"):
        ft.check_timeouts(10, 5, 30, 60)
    with pytest.raises(ValueError, match=r"process-group timeout \(60 s\).*step deadline \(60 s\)"):
        ft.check_timeouts(2, 10, 60, 60)
    with pytest.raises(ValueError, match="quorum timeout .* process-group timeout"):
        ft.check_timeouts(2, 40, 30, 60)
    with pytest.raises(ValueError, match="join timeout"):
        ft.FTTimeouts(join=20.0).check()
    with pytest.raises(ValueError, match="heartbeat timeout plus the join timeout"):
        ft.FTTimeouts(heartbeat=6.0, join=5.0, quorum=10.0).check()
    with pytest.raises(ValueError, match="heartbeat interval"):
        ft.FTTimeouts(heartbeat_interval=3.0).check()
    with pytest.raises(ValueError, match="positive"):
        ft.check_timeouts(0, 10, 30, 60)
    with pytest.raises(ValueError) as info:
        ft.check_timeouts(10, 5, 30, 60)
    assert "\n" not in str(info.value)


def test_algorithm_rules():
    from accord.algorithms import REGISTRY

    allowed = ft.ft_algorithms()
    assert set(allowed) >= {"allreduce", "normalized", "acga", "local_sgd", "diloco", "easgd",
                            "grawa"}
    for name in allowed:
        ft.check_algorithm(name, {})
    # every other registered algorithm is refused with its class's one-line reason
    for name, cls in REGISTRY.items():
        if name in allowed:
            continue
        with pytest.raises(ValueError, match=f"algorithm '{name}' is refused") as info:
            ft.check_algorithm(name)
        assert cls.ft_refusal in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="asynchronous"):
        ft.check_algorithm("easgd", {"asynchronous": "true"})
    ft.check_algorithm("easgd", {"weighting": "dynamic"})  # synchronous: weights over
    # the participants of each exchange, a joiner fading in
    with pytest.raises(ValueError, match="'nope' is unknown; allowed: acga, allreduce"):
        ft.check_algorithm("nope")
    ft.check_algorithm("easgd", {"asynchronous": "false"})  # a CLI string, coerced


def test_membership_event_and_p2p_refused():
    first = ft.membership_event(0, [2, 0, 1], None, rank=0)
    assert first == {"type": "event", "kind": "membership", "step": 0,
                     "participants": [0, 1, 2], "joined": [0, 1, 2], "left": [], "rank": 0}
    change = ft.membership_event(7, [0, 2, 3], [0, 1, 2])
    assert (change["participants"], change["joined"], change["left"]) == ([0, 2, 3], [3], [1])
    comm = ft.FTCommunicator(manager=None, pg=None)
    import torch

    for call in (lambda: comm.send(torch.zeros(1), 1), lambda: comm.recv_(torch.zeros(1), 1),
                 lambda: comm.exchange_(torch.zeros(1), torch.zeros(1), 1),
                 lambda: comm.multi_exchange_([], [])):
        with pytest.raises(NotImplementedError, match="point-to-point"):
            call()


# -- real replicas -------------------------------------------------------------------------

# Replicas agreeing without a failure (steps 0-7 below) and SIGKILLed replicas with
# survivors going on (tests/test_ft_cli.py, through the launcher) are covered elsewhere.


def test_death_inside_allreduce_discards_the_step(cluster):
    """(b') A replica dies just before its allreduce, with its peers already inside it:
    the peers' collective fails, the step is discarded and rolled back on both, and the
    next quorum drops the dead one; the survivors redo the step and still agree."""
    c = cluster(min_replicas=2, workers=3, steps=16)
    names = c.start(3, die_at={2: 8})
    for name in names[:2]:
        assert c.wait(name) == 0, c.stderr(name)
    assert c.wait("r2") == -signal.SIGKILL
    runs = {name: c.records(name) for name in names[:2]}
    for name, recs in runs.items():
        assert done(recs)["step"] == 16, name
        assert done(recs)["discarded"] >= 1, name
        failed = [r for r in steps_of(recs) if not r["committed"]]
        assert failed and failed[0]["step"] == 8 and failed[0]["n"] == 3
        # rolled back: the discarded step's record holds the state committed at step 7
        assert_agree(failed[0]["params"], committed(recs)[7]["params"], tol=0.0)
        assert committed(recs)[8]["n"] == 2
        assert membership(recs)[-1]["left"] == [2]
    for step in set(committed(runs["r0"])) & set(committed(runs["r1"])):
        assert_agree(committed(runs["r1"])[step]["params"], committed(runs["r0"])[step]["params"])


def test_respawned_replica_receives_the_live_state(cluster):
    """(c) SIGKILL a replica, let the survivors go on alone, then respawn it with the same
    replica id: it joins the next quorum, receives a live peer's state (model, optimizer
    momentum, algorithm) instead of its own fresh initialisation, and trains in step."""
    c = cluster(min_replicas=2, workers=3, steps=30, sleep=0.05)
    release = c.tmp / "release"
    c.start(3, hold=f"15:{release}")  # the survivors wait at step 15 for the respawn
    c.wait_until("r2", lambda recs: len(committed(recs)) >= 4, "4 committed steps")
    c.kill("r2")
    c.wait_until("r0", lambda recs: len(committed(recs)) >= 15, "15 committed steps")
    c.spawn(2, name="r2b")
    c.wait_until("r2b", lambda recs: any(r.get("ready") for r in recs), "start-up")
    release.touch()
    for name in ["r0", "r1", "r2b"]:
        assert c.wait(name) == 0, c.stderr(name)
    runs = {name: c.records(name) for name in ["r0", "r1", "r2b"]}
    back = committed(runs["r2b"])
    first = min(back)
    assert first >= 15  # resumed at the live step, not from 0
    assert done(runs["r2b"])["step"] == 30
    events = membership(runs["r0"])
    assert [e["participants"] for e in events[-3:]] == [[0, 1, 2], [0, 1], [0, 1, 2]]
    assert events[-1]["joined"] == [2]
    # its own first record already has the participants' values (it was seeded
    # differently), and it stays with them until the end
    for step, rec in back.items():
        assert_agree(rec["params"], committed(runs["r0"])[step]["params"])
        assert rec["n"] == 3


#: (algorithm, hyperparameters, steps whose replicated state must agree: "all" or a period)
ALGORITHM_CASES = [
    ("local_sgd", ("period=2",), 2),
    ("diloco", ("period=2", "outer_lr=0.7"), 2),
    ("easgd", ("period=2",), "all"),  # the replicated centre (consensus_params)
    ("easgd", ("period=2", "weighting=dynamic"), "all"),
    ("grawa", ("period=2", "pull=1.0"), 2),  # pull 1: every model becomes the centre
    ("acga", (), "all"),
    ("normalized", (), "all"),
]
#: covered by a case above through the same code path (averages over the participants,
#: the centre's exchange): run with ACCORD_SLOW_TESTS=1
SLOW_CASES = {("easgd", ("period=2",)), ("grawa", ("period=2", "pull=1.0")),
              ("normalized", ())}


@pytest.mark.parametrize("algorithm,hp,agree", [
    pytest.param(*case, id=case[0] + "-".join(("",) + case[1][1:]),
                 marks=[pytest.mark.slow] if case[:2] in SLOW_CASES else [])
    for case in ALGORITHM_CASES])
def test_algorithms_survive_a_death(cluster, algorithm, hp, agree):
    """Every algorithm of FT_ALGORITHMS with three replicas, one dying before its
    collective of step 5 (a communication step of every case): the two others discard
    the step, continue as two, finish, and their replicated state (model after an
    average / outer step, EASGD's centre) is equal whenever it must be."""
    from accord.core import due

    c = cluster(min_replicas=2, workers=3, steps=10, algorithm=algorithm, hp=hp)
    names = c.start(3, die_at={2: 5})
    for name in names[:2]:
        assert c.wait(name) == 0, c.stderr(name)
    runs = {name: committed(c.records(name)) for name in names[:2]}
    for name in names[:2]:
        recs = c.records(name)
        assert done(recs)["step"] == 10, name
        assert done(recs)["discarded"] >= 1, name
        assert [e["participants"] for e in membership(recs)] == [[0, 1, 2], [0, 1]]
        assert [runs[name][s]["n"] for s in range(10)] == [3] * 5 + [2] * 5
    key = "consensus" if algorithm == "easgd" else "params"
    steps = range(10) if agree == "all" else [s for s in range(10) if due(s, agree)]
    for step in steps:
        assert_agree(runs["r0"][step][key], runs["r1"][step][key], tol=1e-5)
    if algorithm == "easgd":  # alpha follows N: the models stay apart, the centre agrees
        assert runs["r0"][9]["params"] != runs["r1"][9]["params"]


def test_failed_recovery_fails_the_peers_fast(cluster):
    """A joiner whose fetch of the peers' state fails skips the step's collectives and
    drops its process group, so the peers' allreduce fails at once (not after the
    process-group timeout); everyone discards the step, and the next quorum (a new id
    after a failed commit) reconfigures and the joiner recovers."""
    c = cluster(min_replicas=2, workers=3, steps=16, sleep=0.05)
    release = c.tmp / "release"
    c.start(2, hold=f"6:{release}")
    c.wait_until("r0", lambda recs: len(committed(recs)) >= 6, "6 committed steps")
    c.spawn(2, extra=("--fail-recovery-once",))
    c.wait_until("r2", lambda recs: any(r.get("ready") for r in recs), "start-up")
    release.touch()
    for name in ["r0", "r1", "r2"]:
        assert c.wait(name) == 0, c.stderr(name)
    runs = {name: c.records(name) for name in ["r0", "r1", "r2"]}
    assert "injected recovery failure" in c.stderr("r2")
    assert not any(r["step"] < 6 for r in steps_of(runs["r2"]))  # the lost step: no compute
    for name in ["r0", "r1"]:
        recs = steps_of(runs[name])
        failed = [r for r in recs if not r["committed"]]
        assert failed, name
        after = next(r for r in recs if r["committed"] and r["step"] == failed[-1]["step"])
        # well below the process-group timeout: the peers did not wait it out
        assert after["time"] - failed[-1]["time"] < TIMEOUTS["process_group"] / 2
    for step, rec in committed(runs["r2"]).items():
        assert_agree(rec["params"], committed(runs["r0"])[step]["params"])
    assert done(runs["r2"])["step"] == 16
