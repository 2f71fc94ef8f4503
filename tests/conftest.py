import sys
from pathlib import Path

# worlds.py is imported by forkserver children by module name
sys.path.insert(0, str(Path(__file__).parent))

import os

import pytest

try:  # the hostile-input tier (tests/test_hostile.py); the other tests do without it
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover - hypothesis is in the dev extra
    settings = None
if settings is not None:
    # the same examples on every run and machine, a fixed budget per property (CI's time is
    # counted), no example database left in the tree; HYPOTHESIS_PROFILE=explore searches
    # afresh with ten times the budget (and keeps what it finds in .hypothesis/)
    settings.register_profile(
        "ci", derandomize=True, max_examples=100, deadline=None, database=None,
        print_blob=False, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                 HealthCheck.too_slow])
    settings.register_profile(
        "explore", max_examples=1000, deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

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


@pytest.fixture
def world_of_one():
    """A gloo process group of one in this process (the Python API's checks need one)."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
