"""Schedules: a malformed keep_rate / r / locations is a ScheduleError naming the value, never a silent schedule."""

from __future__ import annotations

import numpy as np
import pytest

import tokvis
from tests.models import make_model
from tokvis.errors import ScheduleError
from tokvis.schedule import make_schedule


@pytest.mark.parametrize("locations", [[2.5], [True], [1, True], [3, 4.0], ["3"], "3", 3, [None]])
def test_locations_must_be_ints(locations):
    with pytest.raises(ScheduleError, match="locations must be a list of block indices"):
        make_schedule(12, keep_rate=0.5, locations=locations)
    with pytest.raises(ScheduleError, match="locations"):
        tokvis.patch(make_model(), "topk", keep_rate=0.5, locations=locations)


def test_locations_accept_numpy_ints():
    assert make_schedule(12, keep_rate=0.5, locations=np.array([2, 5])).locations == (2, 5)


@pytest.mark.parametrize("r", ["111111111111", "4", "0.5", b"4"])
def test_r_string_is_not_a_list_or_a_number(r):
    with pytest.raises(ScheduleError, match=r"r must be an int >= 0 .* list .*: got the string"):
        make_schedule(12, r=r)


@pytest.mark.parametrize(
    "r,match",
    [
        (True, "r must be"),
        (False, "r must be"),
        (-1, r"r must be an integer >= 0: got -1"),
        (float("nan"), r"r must be a number in \(0, 1\)"),
        (1.5, r"r must be a number in \(0, 1\)"),
        (-0.2, r"r must be a number in \(0, 1\)"),
        ([1] * 11 + [True], r"r\[11\] must be"),
        ([1] * 11 + ["1"], r"r\[11\] must be .*got the string '1'"),
        ([1] * 11 + [-2], r"r\[11\] must be an integer >= 0"),
        ([1] * 11 + [float("nan")], r"r\[11\] must be a number in \(0, 1\)"),
        (None.__class__, "r must be"),
    ],
)
def test_bad_r_values(r, match):
    with pytest.raises(ScheduleError, match=match):
        make_schedule(12, r=r)


def test_good_r_values_still_work():
    assert make_schedule(12, r=4).r == (4,) * 12
    assert make_schedule(12, r=np.int64(4)).r == (4,) * 12
    assert make_schedule(12, r=0.25).r == (0.25,) * 12
    assert make_schedule(12, r=0.0).r == (0,) * 12
    assert make_schedule(4, r=[0, 2, np.int32(3), 0.5]).r == (0, 2, 3, 0.5)
    assert make_schedule(4, r=(1, 1, 1, 1)).r == (1, 1, 1, 1)


@pytest.mark.parametrize(
    "keep_rate", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), "0.5", True, False, None.__class__]
)
def test_bad_keep_rate(keep_rate):
    with pytest.raises(ScheduleError, match=r"keep_rate must be a number in \(0, 1\]"):
        make_schedule(12, keep_rate=keep_rate)


def test_good_keep_rates():
    assert make_schedule(12, keep_rate=1).keep_rate == 1.0
    assert make_schedule(12, keep_rate=np.float32(0.5)).keep_rate == 0.5
    assert make_schedule(12, keep_rate=0.7).locations == (3, 6, 9)
