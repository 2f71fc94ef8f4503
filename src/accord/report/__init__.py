"""``accord report`` (being split into the modules of this package; for now all of it is in
``figures``, whose names this package exports)."""

from __future__ import annotations

from .figures import *  # noqa: F403
from .figures import (
    __doc__,  # noqa: F401
    _tuning_lines,  # noqa: F401  (the tuning tests call it)
)
