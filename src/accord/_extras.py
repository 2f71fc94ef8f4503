"""Optional integrations: import a third-party package or fail with one line naming the
extra that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the pip extra."""


def require(module: str, extra: str) -> ModuleType:
    """``importlib.import_module(module)``, or :class:`MissingExtra` with the one line a
    user needs: which package is missing and the ``pip install 'accord[extra]'`` that
    brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(
            f"this needs the optional package {module.split('.')[0]!r}, which is not "
            f"installed ({exc}); install it with: pip install 'accord[{extra}]'") from None
