"""Fault injection in a worker's loop, for testing what a run does when a worker fails.

Specs are ``KIND:key=value,...`` strings, checked before any worker starts:

* ``crash:rank=R,step=S`` -- rank R raises an exception at the start of step S;
* ``kill:rank=R,step=S``  -- rank R's process dies at once (SIGKILL) at step S.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

KINDS = {"crash": ("rank", "step"), "kill": ("rank", "step")}


class InjectedFault(RuntimeError):
    """The exception an injected ``crash`` raises."""


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int
    step: int
    spec: str


def parse(spec: str, workers: int, steps: int) -> Fault:
    kind, _, rest = spec.partition(":")
    if kind not in KINDS:
        raise ValueError(f"fault {spec!r}: unknown kind {kind!r}; allowed: {', '.join(KINDS)}")
    fields: dict[str, int] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in KINDS[kind]:
            raise ValueError(f"fault {spec!r}: bad item {item!r}; allowed keys: "
                             f"{', '.join(KINDS[kind])}")
        try:
            fields[key] = int(value)
        except ValueError:
            raise ValueError(f"fault {spec!r}: {key} must be an integer, got {value!r}") from None
    missing = [k for k in KINDS[kind] if k not in fields]
    if missing:
        raise ValueError(f"fault {spec!r}: missing {', '.join(missing)}")
    if not 0 <= fields["rank"] < workers:
        raise ValueError(f"fault {spec!r}: rank must be in [0, {workers - 1}]")
    if not 0 <= fields["step"] < steps:
        raise ValueError(f"fault {spec!r}: step must be in [0, {steps - 1}]")
    return Fault(kind, fields["rank"], fields["step"], spec)


class Injector:
    def __init__(self, faults: list[Fault], rank: int) -> None:
        self.faults = [f for f in faults if f.rank == rank]

    def before_step(self, step: int) -> None:
        for f in self.faults:
            if f.step != step:
                continue
            if f.kind == "crash":
                raise InjectedFault(f"injected crash on rank {f.rank} at step {step}")
            if f.kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
