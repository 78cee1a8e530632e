"""benchmark-node's bookkeeping (no node, no DDS): the mode a result came from, the per-stage
medians it prints, and the mapping of looped stamps back to the recording."""

from __future__ import annotations

from end2reg_ros.ros.soak import LoopStamps, result_mode, stage_medians


def test_result_mode_follows_the_stages_listed():
    assert result_mode({"search": 900.0, "refinement": 100.0}) == "global"
    assert result_mode({"refinement": 12.0, "verify": 3.0}) == "tracking"
    assert result_mode({"input": 1.0}) == "none"


def test_stage_medians_over_the_results_that_list_each_stage():
    rows = [{"stages": {"input": 1.0, "refinement": 10.0}},
            {"stages": {"input": 3.0, "refinement": 14.0, "search": 900.0}},
            {"stages": {"input": 2.0, "refinement": 12.0}},
            {"processing_ms": 5.0}]  # a row without stages counts for none
    assert stage_medians(rows) == {"input": 2.0, "refinement": 12.0, "search": 900.0}
    assert stage_medians([]) == {}


def test_looped_stamps_map_back_to_the_recording():
    stamps = [1_000, 1_100, 1_200]
    loop = LoopStamps(stamps)
    assert loop.original(1_100) == (1_100, 0)
    # pass k adds k * (span + period) = k * 300
    assert loop.original(1_100 + 2 * 300) == (1_100, 2)
    assert loop.original(1_150)[0] is None  # not one of the recording's stamps
