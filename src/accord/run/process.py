"""What started this process: accord's local launcher, torchrun, or the user directly."""

from __future__ import annotations

import os

LAUNCHED = "ACCORD_LAUNCHED"  # set in workers started by accord's local launcher


def launched_here() -> bool:
    """True in a worker started by accord's local launcher (not by torchrun)."""
    return os.environ.get(LAUNCHED) == "1"


def under_torchrun() -> bool:
    """True inside a process started by torchrun (or by accord's local launcher)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ
