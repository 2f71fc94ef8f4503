"""Every test file belongs to one tier (tests/conftest.py), so `make test` can report the
tiers and `pytest -m TIER` runs one."""

from __future__ import annotations

from pathlib import Path

from conftest import TIER_OF, TIERS, tier_of


def test_every_test_file_has_exactly_one_tier():
    files = sorted(p.stem for p in Path(__file__).parent.glob("test_*.py"))
    assert [f for f in files if f not in TIER_OF] == []
    listed = [m for modules in TIERS.values() for m in modules]
    assert len(listed) == len(set(listed))  # no file in two tiers


def test_a_node_id_maps_to_its_file_tier():
    assert tier_of("tests/test_ft_cli.py::test_kill_survivors_finish[easgd]") == "ft"
    assert tier_of("tests/test_core.py::test_due") == "unit"
    assert tier_of("tests/test_new_thing.py::x") == "unclassified"
