"""The period rule, typed hyperparameters and the algorithm registry (no process group)."""

from __future__ import annotations

import math

import pytest

import accord.algorithms as algorithms
from accord.core import Hyper, due, resolve_hyperparameters

# ---------------------------------------------------------------------------------------
# due()
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("period", "warmup", "expected"),
    [
        (1, 0, list(range(16))),
        (4, 0, [3, 7, 11, 15]),
        (3, 0, [2, 5, 8, 11, 14]),
        (1, 3, list(range(3, 16))),
        (4, 2, [5, 9, 13]),
        (5, 10, [14]),
        (20, 0, []),
        (4, 16, []),
    ],
)
def test_due_steps(period, warmup, expected):
    assert [s for s in range(16) if due(s, period, warmup)] == expected


def test_due_default_warmup_is_zero():
    assert [s for s in range(10) if due(s, 2)] == [1, 3, 5, 7, 9]


@pytest.mark.parametrize("period", [0, -1])
def test_due_rejects_non_positive_period(period):
    with pytest.raises(ValueError, match="period"):
        due(5, period)


# ---------------------------------------------------------------------------------------
# Hyper.coerce
# ---------------------------------------------------------------------------------------

INT = Hyper(3, int, "an int", low=1)
FLOAT = Hyper(0.5, float, "a float")
UNIT = Hyper(0.9, float, "in [0, 1)", low=0.0, high=1.0, high_open=True)
POSITIVE = Hyper(1e-8, float, "> 0", low=0.0, low_open=True)
CLOSED = Hyper(2, int, "in [0, 4]", low=0, high=4)
FLAG = Hyper(False, bool, "a flag")
TEXT = Hyper("x", str, "free text")
CHOICE = Hyper("uniform", str, "a choice", choices=("uniform", "shift", "clamp"))


@pytest.mark.parametrize(
    ("hyper", "value", "expected"),
    [
        (INT, 3, 3),
        (INT, "3", 3),
        (INT, " 7 ", 7),
        (INT, "3.0", 3),
        (INT, 4.0, 4),
        (INT, "1e3", 1000),
        (FLOAT, "0.5", 0.5),
        (FLOAT, "-2.5e-3", -2.5e-3),
        (FLOAT, 2, 2.0),
        (FLOAT, 0.25, 0.25),
        (UNIT, "0", 0.0),
        (UNIT, 0.999, 0.999),
        (POSITIVE, "1e-12", 1e-12),
        (CLOSED, 0, 0),
        (CLOSED, "4", 4),
        (FLAG, True, True),
        (FLAG, False, False),
        (FLAG, "true", True),
        (FLAG, "True", True),
        (FLAG, " yes ", True),
        (FLAG, "on", True),
        (FLAG, "1", True),
        (FLAG, "false", False),
        (FLAG, "FALSE", False),
        (FLAG, "no", False),
        (FLAG, "off", False),
        (FLAG, "0", False),
        (TEXT, "anything", "anything"),
        (CHOICE, "shift", "shift"),
        (CHOICE, "clamp", "clamp"),
    ],
)
def test_coerce_accepts(hyper, value, expected):
    got = hyper.coerce("k", value)
    assert got == expected
    assert type(got) is hyper.kind


@pytest.mark.parametrize(
    ("hyper", "value"),
    [
        (INT, "abc"),
        (INT, "1.5"),
        (INT, 1.5),
        (INT, True),
        (INT, ""),
        (INT, None),
        (INT, 0),  # below low
        (INT, "0"),
        (FLOAT, "abc"),
        (FLOAT, True),
        (FLOAT, None),
        (FLOAT, "inf"),
        (FLOAT, "-inf"),
        (FLOAT, "nan"),
        (FLOAT, math.inf),
        (FLOAT, -math.inf),
        (FLOAT, math.nan),
        (UNIT, 1.0),  # open upper bound
        (UNIT, "1"),
        (UNIT, -0.1),
        (UNIT, 1.5),
        (POSITIVE, 0.0),  # open lower bound
        (POSITIVE, "0"),
        (POSITIVE, -1e-9),
        (CLOSED, -1),
        (CLOSED, 5),
        (FLAG, "maybe"),
        (FLAG, "2"),
        (FLAG, 1),
        (FLAG, 0),
        (FLAG, None),
        (TEXT, 3),
        (CHOICE, "median"),
        (CHOICE, ""),
    ],
)
def test_coerce_rejects(hyper, value):
    with pytest.raises(ValueError) as info:
        hyper.coerce("my_key", value)
    message = str(info.value)
    assert "'my_key'" in message
    assert repr(value) in message
    assert "allowed: " + hyper.allowed() in message


@pytest.mark.parametrize("value", ["inf", "1e400", math.inf, math.nan])
def test_coerce_int_rejects_non_finite_with_message(value):
    with pytest.raises(ValueError, match="hyperparameter 'k'"):
        INT.coerce("k", value)


@pytest.mark.parametrize(
    ("hyper", "text"),
    [
        (UNIT, "a number >= 0 and < 1"),
        (POSITIVE, "a number > 0"),
        (CLOSED, "an integer >= 0 and <= 4"),
        (FLAG, "true or false"),
        (CHOICE, "one of 'uniform', 'shift', 'clamp'"),
        (FLOAT, "a number"),
    ],
)
def test_allowed_text(hyper, text):
    assert hyper.allowed() == text


# ---------------------------------------------------------------------------------------
# resolve_hyperparameters
# ---------------------------------------------------------------------------------------

SPEC = {"alpha": UNIT, "period": INT, "flag": FLAG}


def test_resolve_defaults_and_overrides():
    assert resolve_hyperparameters("algo", SPEC, {}) == {"alpha": 0.9, "period": 3,
                                                         "flag": False}
    got = resolve_hyperparameters("algo", SPEC, {"alpha": "0.25", "flag": "true"})
    assert got == {"alpha": 0.25, "period": 3, "flag": True}


def test_resolve_unknown_key_names_it_and_lists_allowed():
    with pytest.raises(ValueError) as info:
        resolve_hyperparameters("algo", SPEC, {"alpha": 0.1, "betta": 0.5})
    message = str(info.value)
    assert "'betta'" in message
    assert "'algo'" in message
    assert "allowed: alpha, flag, period" in message


def test_resolve_unknown_key_with_empty_spec():
    with pytest.raises(ValueError, match=r"'lr'.*allowed: none"):
        resolve_hyperparameters("plain", {}, {"lr": 0.1})


def test_resolve_bad_value_names_key():
    with pytest.raises(ValueError, match="'period'"):
        resolve_hyperparameters("algo", SPEC, {"period": "1.5"})


# ---------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------


def test_validate_acga_rejects_momentum_one():
    with pytest.raises(ValueError) as info:
        algorithms.validate("acga", {"momentum": 1.0})
    assert "'momentum'" in str(info.value)


def test_validate_acga_coerces_and_fills_defaults():
    hp = algorithms.validate("acga", {"momentum": "0.5", "guard": "shift", "per_layer": "on"})
    assert hp["momentum"] == 0.5
    assert hp["guard"] == "shift"
    assert hp["per_layer"] is True
    assert hp["reference_order"] is False
    assert hp["restore_scale"] == "none"
    assert hp["eps"] == pytest.approx(1e-8)


def test_validate_acga_unknown_key():
    with pytest.raises(ValueError, match=r"'beta'.*allowed: .*momentum"):
        algorithms.validate("acga", {"beta": 0.9})


def test_get_unknown_algorithm_lists_allowed():
    with pytest.raises(ValueError) as info:
        algorithms.get("nope")
    message = str(info.value)
    assert "'nope'" in message
    for name in ("acga", "allreduce", "normalized"):
        assert name in message.split("allowed:")[1]


def test_get_known_algorithm():
    cls = algorithms.get("acga")
    assert cls.name == "acga"


def test_list_algorithms():
    listed = algorithms.list_algorithms()
    for name in ("allreduce", "normalized", "acga"):
        assert name in listed
        assert isinstance(listed[name], str) and listed[name].strip()
    assert list(listed) == sorted(listed)
