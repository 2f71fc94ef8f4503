"""The emulated network at the Communicator: every operation of a real gloo world waits
exactly its alpha-beta time on a fake clock (a lower bound: the fake clock does not move
while the real call runs, so the whole emulated time is waited), and nothing waits when
no network is emulated. Expected times are written out here from the formulas, not taken
from accord.comm.network."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from worlds import run_world

from accord import comm as comm_mod
from accord.comm import Communicator
from accord.comm.network import FakeClock, Link, Network

BW = 1.25e8  # 1 Gbit/s in bytes per second
LAT = 0.005  # 5 ms
N_FLOATS = 1000  # 4000 bytes


def _expected(op: str, n: int, m: int, received: int | None = None) -> float:
    a, b = LAT, 1.0 / BW
    if n == 1:
        return 0.0
    if op == "allreduce":
        return 2 * (n - 1) * a + 2 * (n - 1) / n * m * b
    if op == "allgather":  # one peer at n = 2: send and receive add up
        return (n - 1) * a + (2 if n == 2 else n - 1) * m * b
    if op == "broadcast":
        return math.ceil(math.log2(n)) * (a + m * b)
    if op in ("send", "recv"):
        return a + m * b
    r = received if received is not None else m  # exchanges: one peer, the sum
    return a + ((m + r) if op == "exchange" or n == 2 else max(m, r)) * b


def _every_op(rank: int, world: int) -> list[tuple[str, float]]:
    clock = FakeClock()
    comm_mod.emulate_network(Link(BW, LAT), clock)
    try:
        c = Communicator()
        t = torch.ones(N_FLOATS)
        out = []

        def note(op):
            out.append((op, sum(clock.sleeps)))
            clock.sleeps.clear()

        c.all_reduce_(t)
        note("allreduce")
        c.all_reduce_(t, op="avg")
        note("allreduce")
        c.all_reduce_async_(t, op="avg").wait()
        note("allreduce")
        c.all_gather(torch.ones(10))
        note("allgather")
        c.broadcast_(t, src=0)
        note("broadcast")
        right, left = (rank + 1) % world, (rank - 1) % world
        if rank % 2 == 0 and rank + 1 < world:
            c.send(t, rank + 1)
            note("send")
        elif rank % 2 == 1:
            c.recv_(torch.empty(N_FLOATS), rank - 1)
            note("recv")
        # a ring exchange: send right, receive from the left
        c.multi_exchange_([(torch.ones(N_FLOATS), right)], [(torch.empty(N_FLOATS), left)])
        note("multi_exchange")
        if world == 2:  # unequal directions: both pay for both messages
            sizes = (N_FLOATS, 2 * N_FLOATS) if rank == 0 else (2 * N_FLOATS, N_FLOATS)
            c.exchange_(torch.ones(sizes[0]), torch.empty(sizes[1]), 1 - rank)
            note("exchange")
        return out
    finally:
        comm_mod.emulate_network(None)


@pytest.mark.parametrize("world", [2, 3])
def test_every_operation_waits_its_formula(world):
    results = run_world(_every_op, world)
    m = 4 * N_FLOATS
    for rank, ops in enumerate(results):
        names = [op for op, _ in ops]
        assert names[:5] == ["allreduce"] * 3 + ["allgather", "broadcast"]
        for op, waited in ops:
            size = {"allgather": 40}.get(op, m)
            received = 2 * m if op == "exchange" else None  # m one way, 2m the other
            assert waited == pytest.approx(_expected(op, world, size, received),
                                           rel=1e-12), (rank, op)
        assert ("exchange" in names) == (world == 2)
        assert ("send" in names or "recv" in names) == (rank < world - world % 2)


def _profile(rank: int, world: int) -> list[float]:
    clock = FakeClock()
    slow = Link(1.25e6, 0.05)  # 10 Mbit/s, 50 ms between ranks 0 and 2
    comm_mod.emulate_network(Network(Link(BW, LAT), {(0, 2): slow}), clock)
    try:
        c = Communicator()
        c.all_reduce_(torch.ones(N_FLOATS))
        waits = [sum(clock.sleeps)]
        clock.sleeps.clear()
        group = dist.new_group([0, 1])  # a subgroup without the slow pair
        if rank in (0, 1):
            Communicator(group).all_reduce_(torch.ones(N_FLOATS))
            waits.append(sum(clock.sleeps))
        return waits
    finally:
        comm_mod.emulate_network(None)


def test_a_profile_prices_the_slowest_link_of_the_group():
    results = run_world(_profile, 3)
    m = 4 * N_FLOATS
    slowest = 2 * 2 * 0.05 + 2 * 2 / 3 * m / 1.25e6  # the world's allreduce: the slow pair
    fast = 2 * 1 * LAT + 2 * 1 / 2 * m / BW  # ranks 0 and 1 only
    for rank, waits in enumerate(results):
        assert waits[0] == pytest.approx(slowest, rel=1e-12)
        if rank < 2:
            assert waits[1] == pytest.approx(fast, rel=1e-12)


def _real(rank: int, world: int) -> int:
    from accord.comm import network

    def never(*args, **kwargs):
        raise AssertionError("an emulated wait without an emulated network")

    network.wait_for = never  # this worker process only
    comm_mod.emulate_network(None)
    c = Communicator()
    c.all_reduce_(torch.ones(N_FLOATS))
    c.all_gather(torch.ones(3))
    c.all_reduce_async_(torch.ones(N_FLOATS)).wait()
    return c.stats.calls


def test_no_emulation_no_wait():
    """Without --network no call reaches the emulated wait at all (not a timing check)."""
    assert run_world(_real, 2) == [3, 3]
    assert comm_mod.emulated_network() is None


def test_train_with_an_emulated_network_computes_the_same_and_reports_it(tmp_path):
    """--network slows communication only: the same numbers as on the real network, the
    header records the link, the report says the network was emulated; a bad link is one
    line before any worker starts."""
    import subprocess
    import sys

    from accord.report import write_report
    from accord.run.metrics import read_metrics

    def train(out, *extra):
        return subprocess.run([sys.executable, "-m", "accord", "train", "--task", "digits",
                               "--workers", "2", "--steps", "10", "--log-every", "10",
                               "--no-progress", "--out", str(tmp_path / out), *extra],
                              capture_output=True, text=True, timeout=120)

    assert train("real").returncode == 0
    slow = train("slow", "--network", "100mbit,20ms", "--label", "slow")
    assert slow.returncode == 0, slow.stderr
    real = read_metrics(tmp_path / "real" / "metrics.jsonl")
    emulated = read_metrics(tmp_path / "slow" / "metrics.jsonl")
    assert emulated[0]["config"]["network"] == "100mbit,20ms"
    assert emulated[-1]["eval_loss"] == real[-1]["eval_loss"]
    # 10 allreduces of 38,440 bytes: at least 10 x (2 x 20 ms + 38,440 / 1.25e7 s)
    assert emulated[-1]["time_s"] >= 10 * (0.04 + 38440 / 1.25e7)
    text = write_report(tmp_path).read_text()
    assert "**Emulated network** (slow: 100mbit,20ms)" in text
    bad = train("bad", "--network", "1gb")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "--network: got '1gb'" in bad.stderr
