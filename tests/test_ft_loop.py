"""One loop on both launch modes: the local launcher's workers and ``--fault-tolerant``
workers run the same loop (accord.run.loop), so what the fault-tolerant copy lacked now holds
there too. A probe task (a user task file written here) reports, before every loss, the
gradients the loop left.

Divergence on both modes: tests/test_failures.py and tests/test_ft_cli.py,
``test_a_diverged_run_says_so_and_exits_3``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchft")

SRC = Path(__file__).resolve().parent.parent / "src"
RUN_LIMIT = 120.0

PROBE = '''
import json, os

from accord.tasks.digits import Digits


class Probe(Digits):
    def train_stream(self, rank, batch_size):
        self.rank = rank
        return super().train_stream(rank, batch_size)

    def loss(self, model, batch):
        grads = [p.grad for p in model.parameters()]
        line = {"none": sum(g is None for g in grads),
                "zero": all(g is None or not bool(g.any()) for g in grads),
                "ptr": [None if g is None else g.data_ptr() for g in grads]}
        with open(os.path.join(os.environ["PROBE_DIR"], f"rank{self.rank}.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\\n")
        return super().loss(model, batch)
'''

MODES = {"local": (), "fault-tolerant": ("--fault-tolerant",)}


def probe_run(tmp_path: Path, mode: str, *args: str) -> dict[int, list[dict]]:
    """``accord train`` of the probe task on 2 workers; each rank's probe lines."""
    task = tmp_path / "probe_task.py"
    task.write_text(PROBE)
    probes = tmp_path / "probes"
    probes.mkdir()
    env = {**os.environ, "RUST_LOG": "warn", "OMP_NUM_THREADS": "1", "PROBE_DIR": str(probes),
           "PYTHONPATH": str(SRC) + (os.pathsep + os.environ["PYTHONPATH"]
                                     if os.environ.get("PYTHONPATH") else "")}
    for var in ("RANK", "WORLD_SIZE", "TORCHFT_TIMEOUT_SEC", "TORCHFT_QUORUM_TIMEOUT_SEC",
                "TORCHFT_CONNECT_TIMEOUT_SEC"):
        env.pop(var, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "accord", "train", "--task", f"{task}:Probe", "--workers", "2",
         "--out", str(tmp_path / "run"), "--no-progress", *MODES[mode], *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        _, err = proc.communicate(timeout=RUN_LIMIT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err
    return {int(p.stem[4:]): [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted(probes.glob("rank*.jsonl"))}


@pytest.mark.parametrize("mode", MODES)
def test_gradients_are_zeroed_in_place_on_both_launch_modes(tmp_path: Path, mode: str) -> None:
    """zero_grad(set_to_none=False): from the second step on, every loss finds each
    gradient present, zero, and the same tensor as the step before (allreduce binds them
    to its flat buffer; the fault-tolerant loop set them to None, and backward allocated
    fresh ones every step)."""
    lines = probe_run(tmp_path, mode, "--algo", "allreduce", "--steps", "4", "--log-every", "2")
    assert sorted(lines) == [0, 1]
    for rank, seen in lines.items():
        assert len(seen) == 4, rank
        assert seen[0]["none"] > 0  # before the first backward
        for before, now in zip(seen[1:], seen[2:], strict=False):
            assert now["none"] == 0 and now["zero"], (rank, now)
            assert now["ptr"] == before["ptr"], rank  # the same memory: zeroed in place
        assert seen[1]["none"] == 0 and seen[1]["zero"]


def test_both_launch_modes_build_the_worker_with_the_run_timeouts(tmp_path: Path,
                                                                 world_of_one) -> None:
    """The local launcher's and the fault-tolerant workers both build their parts with
    accord.run.loop.build_worker: an algorithm that takes ``timeout`` and ``idle_timeout``
    (easgd) and was not given its own gets the run's (the fault-tolerant loop built it
    without them). A validated config already holds the algorithm's defaults, which stay."""
    import torch

    from accord.ft import launcher as ft_run
    from accord.run.config import TrainConfig
    from accord.run.loop import build_worker

    assert "build_worker" in ft_run._ft_worker.__code__.co_names or \
        "build_worker" in ft_run._ft_worker.__code__.co_varnames
    for fault_tolerant in (False, True):
        cfg = TrainConfig(algo="easgd", task="linreg", workers=1, steps=2, timeout=20.0,
                          idle_timeout=40.0, out=str(tmp_path), fault_tolerant=fault_tolerant,
                          hyperparameters={"alpha": 0.5})
        w = build_worker(cfg, 0, 1, torch.device("cpu"), tmp_path)
        try:
            assert w.agg.hp["timeout"] == 20.0 and w.agg.hp["alpha"] == 0.5
        finally:
            w.agg.close()
        cfg.hyperparameters = {"alpha": 0.5, "timeout": 7.0}
        w = build_worker(cfg, 0, 1, torch.device("cpu"), tmp_path)
        try:
            assert w.agg.hp["timeout"] == 7.0  # its own
        finally:
            w.agg.close()
