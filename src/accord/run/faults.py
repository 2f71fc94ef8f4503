"""Seeded fault and straggler injection in a worker's loop, usable with every algorithm.

Specs are ``KIND:key=value,...`` strings (``accord train --fault SPEC``, repeatable), all
parsed and checked before any worker starts. Steps count optimizer steps from 0; a window
``start=A,end=B`` covers steps A..B-1 (default: the whole run). Bounds: a delay's
``seconds`` or ``median`` at most the run's idle timeout, ``sigma`` at most 3, a slow
``factor`` at most 1000.

* ``delay:rank=R,seconds=X[,start=A,end=B]`` -- rank R sleeps X seconds after its
  forward/backward of every step in the window (before the aggregator's first hook, i.e.
  as extra compute).
* ``delay:rank=R,median=X,sigma=S[,start,end]`` -- a lognormal delay per step with median
  X seconds and log-standard-deviation S.
* ``slow:rank=R,factor=F[,start,end]`` -- rank R's compute takes F times as long: after
  its forward/backward it sleeps (F - 1) times the measured seconds of that compute.
* ``rank=random`` (delay and slow): at every step ONE rank, drawn from a generator seeded
  by (run seed, fault index, step) and therefore identical on every rank, gets the delay:
  a transient straggler. ``rank=all`` (delay only): every rank, e.g. to emulate a fixed
  compute time per step.
* ``freeze:rank=R,start=A,end=B`` -- for steps A..B-1 rank R's compute is frozen: it keeps
  taking part in every communication (both aggregator hooks and the optimizer step run,
  so collectives match) but does not learn. Precisely: its parameters and float buffers
  are snapshot at the start of step A (before that step's forward); at every step of the
  window, after forward/backward and before ``after_backward``, its gradients are zeroed
  and the snapshot is copied back (undoing e.g. batch-norm statistics the forward
  updated); after ``optimizer.step()`` and before ``after_step`` it is copied back again
  (undoing momentum, weight decay, Adam's step and whatever ``after_backward`` mixed in),
  so the aggregator sees exactly the frozen model in both hooks whatever the optimizer;
  after ``after_step`` it is copied back once more, undoing what the aggregator pulled
  in. So it offers the same stale model in every exchange of the window and starts step
  B from it. Optimizer state and the aggregator's own state are not frozen. Under a
  second-order optimizer (``adahessian``) the zeroed gradient carries no graph for the
  Hessian-vector product, so a frozen rank skips the optimizer step (its state does not
  advance in the window); the optimizer keeps no collective, so ranks still match.
* ``nan:rank=R,step=S[,value=nan|inf]`` -- after backward at step S, rank R's gradients
  are filled with NaN (or +inf). What happens next is the training loop's non-finite
  guard (``--nonfinite``).
* ``crash:rank=R,step=S`` -- rank R raises :class:`InjectedFault` at the start of step S.
* ``kill:rank=R,step=S`` -- rank R's process dies at once (SIGKILL) at step S.
* ``hang:rank=R,step=S`` -- rank R stops for good at the start of step S without dying
  (it sleeps until killed, as a deadlocked worker would): its peers wait in their next
  collective until it times out. Fires once per run directory, like crash and kill.

Random draws come from ``torch.Generator`` seeded from (run seed, fault index, step, and
the rank for lognormal delays), so a run reproduces its delays exactly; the fault index
is the spec's position among the run's ``--fault`` options. Every injected event is
recorded as a dict ``{"step", "rank", "kind", ...}`` that the loop drains and logs in
``metrics.jsonl``: ``crash``, ``kill``, ``hang``; ``delay`` and ``slow`` with ``seconds`` slept;
``freeze`` (first step of a window) and ``unfreeze`` (its last step); ``nan`` with
``value``. The loop's non-finite guard adds ``nonfinite_grad`` events.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

KEYS = {
    "crash": {"rank", "step"},
    "kill": {"rank", "step"},
    "hang": {"rank", "step"},
    "nan": {"rank", "step", "value"},
    "freeze": {"rank", "start", "end"},
    "delay": {"rank", "seconds", "median", "sigma", "start", "end"},
    "slow": {"rank", "factor", "start", "end"},
}
REQUIRED = {
    "crash": ("rank", "step"), "kill": ("rank", "step"), "hang": ("rank", "step"),
    "nan": ("rank", "step"),
    "freeze": ("rank", "start", "end"), "delay": ("rank",), "slow": ("rank", "factor"),
}
RANDOM, ALL = -1, -2
# Stated maxima: a lognormal draw of exp(3 z) already spans a factor of 10^5 between
# z = -2 and z = 2; a compute 1000 times slower is a dead worker, better injected as one.
MAX_SIGMA = 3.0
MAX_SLOW_FACTOR = 1000.0
MAX_DELAY_S = 7 * 24 * 3600.0  # without an idle timeout to bound them (the config's maximum)


class InjectedFault(RuntimeError):
    """The exception an injected ``crash`` raises."""


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int  # RANDOM or ALL for the per-step choice / every rank
    spec: str
    step: int = -1
    start: int = 0
    end: int = 1 << 62
    seconds: float | None = None
    median: float | None = None
    sigma: float | None = None
    factor: float | None = None
    value: str = "nan"

    def active(self, step: int) -> bool:
        return self.start <= step < self.end


def parse(spec: str, workers: int, steps: int, max_seconds: float | None = None) -> Fault:
    """One spec -> Fault; ValueError naming the spec, the problem and what is allowed.

    ``max_seconds`` (the run's idle timeout) bounds a fixed delay and a lognormal median:
    a longer sleep would only make the other ranks' waits time out."""
    if not isinstance(spec, str):
        raise TypeError(f"fault: got {spec!r} ({type(spec).__name__}), allowed: a spec "
                        "string such as 'crash:rank=1,step=5'")
    kind, _, rest = spec.partition(":")
    if kind not in KEYS:
        raise ValueError(f"fault {spec!r}: unknown kind {kind!r}; allowed: "
                         f"{', '.join(KEYS)}")

    def bad(msg: str) -> ValueError:
        return ValueError(f"fault {spec!r}: {msg}")

    raw: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in KEYS[kind]:
            raise bad(f"bad item {item!r}; allowed keys: {', '.join(sorted(KEYS[kind]))}")
        if key in raw:
            raise bad(f"{key} given twice")
        raw[key] = value.strip()
    missing = [k for k in REQUIRED[kind] if k not in raw]
    if missing:
        raise bad(f"missing {', '.join(missing)}; {kind} needs {', '.join(REQUIRED[kind])}"
                  f" (allowed keys: {', '.join(sorted(KEYS[kind]))})")

    def integer(key: str) -> int:
        try:
            return int(raw[key])
        except ValueError:
            raise bad(f"{key} must be an integer, got {raw[key]!r}") from None

    def number(key: str, low: float, low_open: bool = False, high: float | None = None,
               why: str = "") -> float:
        try:
            x = float(raw[key])
        except ValueError:
            raise bad(f"{key} must be a number, got {raw[key]!r}") from None
        if not math.isfinite(x) or x < low or (low_open and x == low) or \
                (high is not None and x > high):
            upper = f" and <= {high:g}{why}" if high is not None else ""
            raise bad(f"{key} must be a number {'>' if low_open else '>='} {low:g}{upper}, "
                      f"got {raw[key]!r}")
        return x

    # a delay longer than the idle timeout can only fail the run; else a stated maximum
    if max_seconds is not None:
        delay_max, delay_why = max_seconds, " (the idle timeout, --idle-timeout)"
    else:
        delay_max, delay_why = MAX_DELAY_S, ""

    fields: dict[str, Any] = {}
    text = raw["rank"]
    if text == "random" and kind in ("delay", "slow"):
        fields["rank"] = RANDOM
    elif text == "all" and kind == "delay":
        fields["rank"] = ALL
    else:
        extra = {"delay": ", 'random' or 'all'", "slow": " or 'random'"}.get(kind, "")
        try:
            rank = int(text)
        except ValueError:
            rank = -1
        if not 0 <= rank < workers:
            raise bad(f"rank must be in [0, {workers - 1}]{extra}, got {text!r}")
        fields["rank"] = rank
    if "step" in raw:
        fields["step"] = integer("step")
        if not 0 <= fields["step"] < steps:
            raise bad(f"step must be in [0, {steps - 1}], got {raw['step']!r}")
    for key in ("start", "end"):
        if key in raw:
            fields[key] = integer(key)
    if "start" in fields or "end" in fields:
        start, end = fields.get("start", 0), fields.get("end", steps)
        if not 0 <= start < end <= steps:
            raise bad(f"need 0 <= start < end <= {steps} (the run's steps), got start="
                      f"{start}, end={end}")
        fields["start"], fields["end"] = start, end
    if kind == "delay":
        fixed = "seconds" in raw
        lognormal = "median" in raw or "sigma" in raw
        if fixed == lognormal:
            raise bad("give seconds=X (fixed) or median=X,sigma=S (lognormal)")
        if fixed:
            fields["seconds"] = number("seconds", 0.0, high=delay_max, why=delay_why)
        else:
            if "median" not in raw or "sigma" not in raw:
                raise bad("a lognormal delay needs both median and sigma")
            fields["median"] = number("median", 0.0, low_open=True, high=delay_max,
                                      why=delay_why)
            fields["sigma"] = number("sigma", 0.0, high=MAX_SIGMA)
    if kind == "slow":
        fields["factor"] = number("factor", 1.0, high=MAX_SLOW_FACTOR)
    if kind == "nan":
        value = raw.get("value", "nan")
        if value not in ("nan", "inf"):
            raise bad(f"value must be 'nan' or 'inf', got {value!r}")
        fields["value"] = value
    return Fault(kind=kind, spec=spec, **fields)


def _generator(*seeds: int) -> torch.Generator:
    """A generator seeded from several integers (no Python hash: stable across runs)."""
    seed = 0
    for s in seeds:
        seed = (seed * 1_000_003 + int(s) + 7919) % (2 ** 63 - 1)
    return torch.Generator().manual_seed(seed)


def random_rank(seed: int, index: int, step: int, workers: int) -> int:
    """The rank a ``rank=random`` fault hits at ``step``: identical on every rank."""
    return int(torch.randint(workers, (1,), generator=_generator(seed, index, step, 1)))


def lognormal_delay(fault: Fault, seed: int, index: int, rank: int, step: int) -> float:
    """The lognormal delay (seconds) of ``fault`` on ``rank`` at ``step``."""
    z = float(torch.randn(1, generator=_generator(seed, index, step, rank, 2)))
    return fault.median * math.exp(fault.sigma * z)


class Injector:
    """The faults of one rank, with the hooks the training loop calls:

    * ``before_step(step)`` -- at the start of a step: crash, kill, hang.
    * ``after_compute(step, compute_s)`` -- after the forward/backward of all micro-steps:
      sleeps the delay and slow time owed; returns the seconds slept.
    * ``corrupt_grads(step, params)`` -- after backward: nan.
    * ``freeze_active(step)``; ``freeze_snapshot(step, tensors)`` before the forward,
      ``freeze_grads(step, tensors, params)`` before ``after_backward``,
      ``hold(tensors)`` before ``after_step`` and ``restore(step, tensors)`` after it, at
      every frozen step.

    Events accumulate in ``events`` until the loop takes them with :meth:`drain`.
    """

    def __init__(self, faults: Iterable[Fault], rank: int, workers: int, seed: int = 0,
                 sleep=time.sleep, fired_dir: Path | None = None) -> None:
        self.all = list(faults)
        # crash, kill and hang faults fire once per run directory: a marker left here before
        # firing keeps a restarted or resumed run from dying again at the same step
        self.fired_dir = None if fired_dir is None else Path(fired_dir)
        self.rank = rank
        self.workers = workers
        self.seed = seed
        self.sleep = sleep
        self.events: list[dict[str, Any]] = []
        self._snapshot: list[torch.Tensor] | None = None

    def _mine(self, kinds: tuple[str, ...]):
        return [(i, f) for i, f in enumerate(self.all)
                if f.kind in kinds and (f.rank == self.rank or f.rank in (RANDOM, ALL))]

    def before_step(self, step: int) -> None:
        for i, f in self._mine(("crash", "kill", "hang")):
            if f.step != step:
                continue
            if self.fired_dir is not None:
                marker = self.fired_dir / f"fault{i}-rank{self.rank}.fired"
                if marker.exists():
                    continue
                marker.write_text(f"{f.spec}\n")
            self.events.append({"step": step, "rank": self.rank, "kind": f.kind})
            if f.kind == "crash":
                raise InjectedFault(f"injected crash on rank {f.rank} at step {step}")
            if f.kind == "hang":
                while True:  # until a signal ends the process
                    time.sleep(3600.0)
            os.kill(os.getpid(), signal.SIGKILL)

    def delay_seconds(self, step: int, compute_s: float) -> list[tuple[Fault, float]]:
        """The delays this rank owes at ``step`` (without sleeping)."""
        out = []
        for i, f in self._mine(("delay", "slow")):
            if not f.active(step):
                continue
            if f.rank == RANDOM and random_rank(self.seed, i, step, self.workers) != self.rank:
                continue
            if f.kind == "slow":
                seconds = (f.factor - 1.0) * compute_s
            elif f.seconds is not None:
                seconds = f.seconds
            else:
                seconds = lognormal_delay(f, self.seed, i, self.rank, step)
            out.append((f, seconds))
        return out

    def after_compute(self, step: int, compute_s: float) -> float:
        """Sleep the delays owed at ``step``; returns the seconds slept."""
        total = 0.0
        for f, seconds in self.delay_seconds(step, compute_s):
            if seconds > 0:
                self.sleep(seconds)
            total += seconds
            if f.rank != ALL:  # a delay on every rank is the emulated compute, not an event
                self.events.append({"step": step, "rank": self.rank, "kind": f.kind,
                                    "seconds": round(seconds, 6)})
        return total

    def corrupt_grads(self, step: int, params: Iterable[torch.Tensor]) -> bool:
        hit = False
        for _, f in self._mine(("nan",)):
            if f.step != step:
                continue
            value = float("nan") if f.value == "nan" else float("inf")
            for p in params:
                if p.grad is not None:
                    p.grad.fill_(value)
            self.events.append({"step": step, "rank": self.rank, "kind": "nan",
                                "value": f.value})
            hit = True
        return hit

    def freeze_active(self, step: int) -> bool:
        """Whether this rank's compute is frozen at ``step``."""
        return any(f.active(step) for _, f in self._mine(("freeze",)))

    frozen = freeze_active

    @torch.no_grad()
    def freeze_snapshot(self, step: int, tensors: list[torch.Tensor]) -> None:
        """At a frozen step, before the forward: the first one of a window snapshots
        ``tensors`` (parameters and float buffers)."""
        if self._snapshot is None:
            self._snapshot = [t.detach().clone() for t in tensors]
            self.events.append({"step": step, "rank": self.rank, "kind": "freeze"})

    @torch.no_grad()
    def freeze_grads(self, step: int, tensors: list[torch.Tensor],
                     params: Iterable[torch.Tensor]) -> None:
        """At a frozen step, before the aggregator: zero the gradients and copy the
        snapshot back (the forward may have updated buffers)."""
        if self._snapshot is None:  # a caller that skipped freeze_snapshot
            self.freeze_snapshot(step, tensors)
        for p in params:
            if p.grad is None:
                continue
            if p.grad.grad_fn is not None:  # a second-order step's gradient and its graph:
                p.grad = torch.zeros_like(p)  # dropped, so the snapshot may be copied back
            else:
                p.grad.zero_()
        for t, s in zip(tensors, self._snapshot, strict=True):
            t.copy_(s)

    @torch.no_grad()
    def hold(self, tensors: list[torch.Tensor]) -> None:
        """At a frozen step, after the optimizer step: back to the snapshot."""
        if self._snapshot is not None:
            for t, s in zip(tensors, self._snapshot, strict=True):
                t.copy_(s)

    @torch.no_grad()
    def restore(self, step: int, tensors: list[torch.Tensor]) -> None:
        """At a frozen step, after the aggregator's last hook: back to the snapshot; the
        snapshot is dropped after the window's last step."""
        if self._snapshot is None:
            return
        for t, s in zip(tensors, self._snapshot, strict=True):
            t.copy_(s)
        if not self.freeze_active(step + 1):
            self._snapshot = None
            self.events.append({"step": step, "rank": self.rank, "kind": "unfreeze"})

    def drain(self) -> list[dict[str, Any]]:
        out, self.events = self.events, []
        return out
