"""CatchUpBuffer (no rclpy): one input set every ``spacing_s`` of stamp time, the last
``max_sets`` of them, handed out once, oldest first, newer than a given stamp."""

from __future__ import annotations

import pytest

from end2reg_ros.ros.catch_up import CatchUpBuffer

MS = 1_000_000


def test_keeps_one_set_per_spacing_and_the_last_max_sets():
    buf = CatchUpBuffer(max_sets=3, spacing_s=0.25)
    kept = [s for s in range(0, 2000, 100) if buf.offer(s * MS, f"set{s}")]
    # 0, 300, 600, ... (100 and 200 ms are closer than 250 ms to 0)
    assert kept == [0, 300, 600, 900, 1200, 1500, 1800]
    assert len(buf) == 3
    assert buf.take_after(0) == [(1200 * MS, "set1200"), (1500 * MS, "set1500"),
                                 (1800 * MS, "set1800")]


def test_take_after_returns_newer_sets_oldest_first_and_empties_the_buffer():
    buf = CatchUpBuffer(max_sets=10, spacing_s=0.25)
    for s in (0, 250, 500, 750):
        assert buf.offer(s * MS, s)
    assert [item for _, item in buf.take_after(250 * MS)] == [500, 750]
    assert len(buf) == 0 and buf.take_after(0) == []
    # the spacing still counts from the last set kept, taken out or not
    assert not buf.offer(900 * MS, 900) and buf.offer(1000 * MS, 1000)
    assert not buf.offer(1100 * MS, 1100)
    buf.clear()  # forgets that too
    assert buf.offer(1150 * MS, 1150)


def test_time_going_back_starts_afresh():
    buf = CatchUpBuffer(max_sets=10, spacing_s=0.25)
    for s in (5000, 5250, 5500):
        buf.offer(s * MS, s)
    assert buf.offer(1000 * MS, "replay restarted")  # older stamp: the others are dropped
    assert buf.take_after(0) == [(1000 * MS, "replay restarted")]


def test_zero_sets_keeps_nothing_and_bad_settings_are_errors():
    buf = CatchUpBuffer(max_sets=0, spacing_s=0.25)
    assert not buf.offer(0, "x") and len(buf) == 0 and buf.take_after(-1) == []
    with pytest.raises(ValueError, match="max_sets"):
        CatchUpBuffer(max_sets=-1, spacing_s=0.25)
    with pytest.raises(ValueError, match="spacing_s"):
        CatchUpBuffer(max_sets=4, spacing_s=0.0)
