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


#: The tiers of the suite, by what a test needs (``pytest -m worlds`` runs one tier;
#: ``make test`` reports each tier's count and time at the end):
#: unit - no process group, no worker process (maths, parsing, records, analysis);
#: worlds - real gloo process groups of 2 to 8 ranks started by the test (tests/worlds.py);
#: app - the command line and the launcher: worker processes, run directories, resume;
#: integrations - Lightning, accelerate, Ray, the optional extras;
#: ft - the fault-tolerant mode on torchft, and several hosts over network namespaces.
TIERS = {
    "unit": ("test_core", "test_docs", "test_layout", "test_loop", "test_network", "test_report",
             "test_report_figures", "test_report_network", "test_report_tuning", "test_tiers",
             "test_imports"),
    "worlds": ("test_acga_math", "test_acga_sketch", "test_adasum", "test_buffers",
               "test_compress", "test_compress_comm", "test_ddp_hooks", "test_decentralized",
               "test_devices", "test_dynamic_weighting", "test_faults", "test_hierarchical",
               "test_model_averaging", "test_network_comm", "test_observe", "test_state",
               "test_streaming_diloco", "test_wait_avoiding", "test_worlds", "test_wrap"),
    "app": ("test_adahessian", "test_bad_inputs", "test_bench", "test_bench_tune",
            "test_checkpoint", "test_cli", "test_data_tasks", "test_eval_split",
            "test_failures", "test_hostile", "test_input_holes", "test_plugins",
            "test_optim", "test_resume", "test_storage", "test_user_task"),
    "integrations": ("test_accelerate", "test_extras", "test_lightning", "test_ray_example"),
    "ft": ("test_ft", "test_ft_cli", "test_ft_loop", "test_real_links", "test_testbed"),
}
TIER_OF = {module: tier for tier, modules in TIERS.items() for module in modules}


def tier_of(path: str) -> str:
    """The tier of a test file (a path or node id); "unclassified" when none names it."""
    return TIER_OF.get(Path(path.split("::")[0]).stem, "unclassified")


@pytest.fixture(autouse=True)
def _registry_as_found():
    """Each test leaves the algorithm registry as it found it: a plugin one test loads
    (``--plugin``, ``accord.register``) is not a built-in for the next test in the same
    worker process (the every-algorithm tests compare their tables with the registry)."""
    from accord import algorithms

    registry = dict(algorithms.REGISTRY)
    modules = {m for m in sys.modules if m.startswith("accord_plugin_")}
    yield
    algorithms.REGISTRY.clear()
    algorithms.REGISTRY.update(registry)
    for m in [m for m in sys.modules if m.startswith("accord_plugin_") and m not in modules]:
        del sys.modules[m]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a variant left out unless ACCORD_SLOW_TESTS=1")
    for tier in TIERS:
        config.addinivalue_line("markers", f"{tier}: the {tier} tier (tests/conftest.py)")
    if not hasattr(config, "workerinput"):
        # build ACGA's native sketch kernel once, before any test world starts (about 25 s
        # on a fresh machine; later processes load it from the cache)
        from accord.algorithms import _sketch_native

        _sketch_native.kernel()


#: the order the tiers run in: the long multi-process tests first, so that with -n 2 the
#: last tests handed out are short ones and neither worker idles while the other finishes
#: a minute-long test (the files' own order put test_resume and test_testbed last)
RUN_ORDER = ("ft", "app", "integrations", "worlds", "unclassified", "unit")


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(getattr(pytest.mark, tier_of(item.nodeid)))
    items.sort(key=lambda item: RUN_ORDER.index(tier_of(item.nodeid)))  # stable in a tier
    if SLOW:
        return
    skip = pytest.mark.skip(reason="slow variant: set ACCORD_SLOW_TESTS=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    """Each tier's passed / failed / skipped count and the seconds its tests took (summed
    over the workers: with -n 2 the wall time is about half)."""
    rows: dict[str, list[float]] = {}
    for outcome in ("passed", "failed", "skipped", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            nodeid = getattr(report, "nodeid", "")
            if not nodeid:
                continue
            row = rows.setdefault(tier_of(nodeid), [0, 0, 0, 0.0])
            if report.when == "call" or outcome in ("skipped", "error"):
                index = {"passed": 0, "failed": 1, "skipped": 2, "error": 1}[outcome]
                row[index] += 1
            row[3] += getattr(report, "duration", 0.0)
    if not rows:
        return
    terminalreporter.section("tiers")
    for tier in [*TIERS, "unclassified"]:
        if tier in rows:
            p, f, s, secs = rows[tier]
            terminalreporter.write_line(f"{tier:<13} {int(p):>5} passed {int(f):>3} failed "
                                        f"{int(s):>3} skipped {secs:>8.1f} s")


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
