import sys
from pathlib import Path

# worlds.py is imported by forkserver children by module name
sys.path.insert(0, str(Path(__file__).parent))

import os

import pytest

#: ``ACCORD_SLOW_TESTS=1 make test`` also runs the tests marked slow (variants of a case
#: that a faster test already covers; left out of CI's time budget)
SLOW = os.environ.get("ACCORD_SLOW_TESTS") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a variant left out unless ACCORD_SLOW_TESTS=1")


def pytest_collection_modifyitems(config, items):
    if SLOW:
        return
    skip = pytest.mark.skip(reason="slow variant: set ACCORD_SLOW_TESTS=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
