"""Shared argument checks: what they accept, what they refuse, and that the message names who and what."""

import math
import re

import pytest
import torch

from obc_lightning import exact_obc
from obc_lightning.checks import (
    check_flags,
    check_fraction,
    check_int,
    check_nonnegative,
    check_positive,
    check_positive_int,
    is_number,
)
from obc_lightning.finetune import CentroidQuantizer, NoiseQuantizer


def test_is_number_refuses_bools_non_finite_and_non_numbers():
    assert is_number(0) and is_number(2.5) and is_number(-1)
    for bad in (True, False, math.nan, math.inf, "1", None, torch.tensor(1.0)):
        assert not is_number(bad)


@pytest.mark.parametrize(
    "check,good,bad,message",
    [
        (check_positive_int, [1, 7], [0, -1, 1.0, True, "2", None], "a positive integer"),
        (check_nonnegative, [0, 0.0, 3, 1e-9], [-1e-9, math.nan, math.inf, True, "0", None], "a finite number >= 0"),
        (check_positive, [1e-9, 2], [0, -1, math.inf, True, None], "a positive number"),
        (check_fraction, [1, 0.5, 1e-6], [0, 1.0001, -0.5, math.nan, True, "0.5", None], r"in \(0, 1\]"),
    ],
)
def test_value_checks(check, good, bad, message):
    for value in good:
        check("who", "arg", value)
    for value in bad:
        with pytest.raises(ValueError, match=rf"^who: arg must be {message}.*, got {re.escape(repr(value))}$"):
            check("who", "arg", value)


def test_int_with_a_minimum():
    check_int("who", "seed", 0, 0)
    check_int("who", "n", None, 1, optional=True)
    for bad in (-1, 0.0, True, "0"):
        with pytest.raises(ValueError, match=rf"^who: seed must be an integer >= 0, got {re.escape(repr(bad))}$"):
            check_int("who", "seed", bad, 0)


@pytest.mark.parametrize("check", [check_positive_int, check_nonnegative, check_positive])
def test_optional_accepts_none_and_says_so(check):
    check("who", "arg", None, optional=True)
    with pytest.raises(ValueError, match="or None, got -5"):
        check("who", "arg", -5, optional=True)


def test_flags_are_bools():
    check_flags("who", a=True, b=False)
    with pytest.raises(ValueError, match="^who: b must be a bool, got 1$"):
        check_flags("who", a=True, b=1)


def test_entry_points_now_refuse_what_they_used_to_let_through():
    W, H = torch.randn(4, 8), torch.eye(8)
    with pytest.raises(ValueError, match="exact_obc: damp must be a finite number >= 0, got True"):
        exact_obc(W, H, damp=True)
    with pytest.raises(ValueError, match="NoiseQuantizer: need 1 <= min_bits"):
        NoiseQuantizer(W, min_bits="2")
    with pytest.raises(ValueError, match=r"CentroidQuantizer: noise_rate must be in \(0, 1\], got 'all'"):
        CentroidQuantizer(torch.randn(4, 2), torch.zeros(4, 4, dtype=torch.long), noise_rate="all")
