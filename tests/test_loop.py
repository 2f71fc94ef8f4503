"""The one training loop (accord.run.loop.run_loop) with fake objects, no process group: the
order of its named points, a discarded step, the stop at divergence."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from accord.core import StepContext
from accord.run.loop import Batches, Hook, Steps, Tally, run_loop


class Log(list):
    def add(self, *what: Any) -> None:
        self.append(what)


class FakeMembership:
    """Steps 0..n-1; ``lost`` are discarded at their commit."""

    def __init__(self, log: Log, n: int, lost: tuple[int, ...] = ()) -> None:
        self.log, self.n, self.lost = log, n, lost

    def __iter__(self):
        for step in range(self.n):
            self.log.add("next", step)
            yield step

    def commit(self, step: int) -> bool:
        self.log.add("commit", step)
        return step not in self.lost


class FakeStep:
    def __init__(self, log: Log) -> None:
        self.log = log

    def __call__(self, step: int) -> StepContext:
        self.log.add("step", step)
        return StepContext(step=step, loss=torch.tensor(float(step)))


class FakeRecorder:
    """Diverges at the record of ``diverge_at`` (a committed step stops the run)."""

    def __init__(self, log: Log, diverge_at: int | None = None) -> None:
        self.log, self.diverge_at = log, diverge_at
        self.diverged: dict[str, Any] | None = None
        self.flagged = None

    def on_record(self, step: int, ctx: StepContext) -> None:
        self.log.add("on_record", step)
        self.flagged = {"diverged_step": step + 1} if step == self.diverge_at else None

    def on_commit(self, step: int, committed: bool) -> None:
        self.log.add("on_commit", step, committed)
        if committed and self.flagged is not None:
            self.diverged = self.flagged

    def should_stop(self, step: int) -> bool:
        self.log.add("should_stop", step)
        return self.diverged is not None

    def finish(self) -> Any:
        self.log.add("finish")
        return self.diverged


class FakeHook(Hook):
    def __init__(self, log: Log, name: str) -> None:
        self.log, self.name = log, name

    def before_step(self, step: int) -> None:
        self.log.add(self.name, "before_step", step)

    def after_step(self, step: int, ctx: StepContext) -> None:
        self.log.add(self.name, "after_step", step)

    def after_commit(self, step: int) -> None:
        self.log.add(self.name, "after_commit", step)


def one_step(step: int, committed: bool = True, stop: bool = False) -> list[tuple]:
    out = [("next", step), ("a", "before_step", step), ("b", "before_step", step),
           ("step", step), ("a", "after_step", step), ("b", "after_step", step),
           ("on_record", step), ("commit", step), ("on_commit", step, committed)]
    if committed:
        out.append(("should_stop", step))
        if not stop:
            out += [("a", "after_commit", step), ("b", "after_commit", step)]
    return out


def run(n: int, lost: tuple[int, ...] = (), diverge_at: int | None = None) -> tuple[Log, Any]:
    log = Log()
    result = run_loop(FakeMembership(log, n, lost), FakeStep(log),
                      FakeRecorder(log, diverge_at), [FakeHook(log, "a"), FakeHook(log, "b")])
    return log, result


def test_the_named_points_in_order() -> None:
    log, result = run(3)
    assert log == [*one_step(0), *one_step(1), *one_step(2), ("finish",)]
    assert result is None


def test_a_discarded_step_neither_stops_nor_checkpoints() -> None:
    """A step the membership does not commit (fault-tolerant: lost in the quorum) is not
    asked to stop the run, and no after_commit point (the checkpoint) runs for it, even
    when its record flagged divergence: only a committed record stops the run."""
    log, result = run(3, lost=(1,), diverge_at=1)
    assert log == [*one_step(0), *one_step(1, committed=False), *one_step(2),
                   ("finish",)]
    assert result is None


def test_divergence_stops_at_that_committed_step() -> None:
    log, result = run(5, diverge_at=2)
    assert log == [*one_step(0), *one_step(1), *one_step(2, stop=True), ("finish",)]
    assert result == {"diverged_step": 3}


def test_fixed_world_membership_and_tally() -> None:
    steps = Steps(2, 5)
    assert list(steps) == [2, 3, 4] and steps.commit(3)
    tally = Tally(first=2)
    for step, loss in ((2, 1.0), (3, 3.0)):
        tally.after_step(step, StepContext(step=step, loss=torch.tensor(loss)))
    assert tally.steps_done == 4
    assert float(tally.running) == pytest.approx(1.0 + 0.1 * (3.0 - 1.0))


def test_batches_continue_at_a_step() -> None:
    """A resumed run or a replica that joins late skips to the micro-batches of its step;
    skipping to a step already reached consumes nothing."""
    batches = Batches(iter(range(100)), accum_steps=2)
    batches.skip_to(3)
    assert next(batches) == 6
    assert next(batches) == 7
    batches.skip_to(4)  # already there
    assert next(batches) == 8
