"""``accord bench`` (being split into the modules of this package; for now all of it is in
``presets``, whose names this package exports)."""

from __future__ import annotations

from .presets import *  # noqa: F403
from .presets import (  # noqa: F401  (benchmarks/stragglers.py)
    __doc__,  # noqa: F401  (the command's description: its first paragraph)
    _decentralized_arms,
    _pair_arms,
)
