"""The safety gate publishes a registration only when every check passes, and says why not."""

from __future__ import annotations

import numpy as np
import pytest

from end2reg_ros.geometry import axis_angle_to_matrix, make_pose
from end2reg_ros.safety import OK, SafetyGate, SafetyLimits, check_pose

pytestmark = pytest.mark.timeout(30)

S = 1_000_000_000  # ns per second
GOOD_POSE = make_pose(axis_angle_to_matrix([0, 1, 0], np.pi), [10.0, -5.0, 350.0])


def good_kwargs(**overrides):
    kwargs = dict(
        cam_from_spine=GOOD_POSE, confidence=0.99, residual_mm=1.2, num_points=5000,
        stamp_ns=100 * S, now_ns=100 * S + S // 10,
    )
    kwargs.update(overrides)
    return kwargs


def test_good_registration_passes_with_reason_ok():
    assert SafetyGate().check(**good_kwargs()) == (True, OK)


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (dict(confidence=0.49), "confidence"),
        (dict(confidence=float("nan")), "confidence"),
        (dict(residual_mm=5.01), "residual"),
        (dict(residual_mm=float("inf")), "residual"),
        (dict(num_points=199), "min_points"),
        (dict(now_ns=100 * S + 3 * S), "old"),
        (dict(now_ns=100 * S - 2 * S), "future"),
        (dict(stamp_ns=0, now_ns=S), "no stamp"),
        (dict(level_margin=0.019), "level ambiguous"),
        (dict(level_margin=float("nan")), "min_level_margin"),
        (dict(reversal_margin=0.019), "reversal ambiguous"),
        (dict(reversal_margin=float("nan")), "min_reversal_margin"),
        (dict(final_move_mm=2.01), "final ICP disagrees"),
        (dict(final_move_mm=float("nan")), "max_final_move_mm"),
    ],
)
def test_each_threshold_rejects_with_a_reason_naming_it(overrides, words):
    valid, reason = SafetyGate().check(**good_kwargs(**overrides))
    assert not valid
    assert words in reason


def test_thresholds_are_inclusive_at_the_limit():
    limits = SafetyLimits(min_confidence=0.5, max_residual_mm=2.0, min_points=100)
    valid, reason = SafetyGate(limits).check(
        **good_kwargs(confidence=0.5, residual_mm=2.0, num_points=100)
    )
    assert valid, reason


def test_level_margin_floor_is_inclusive_and_skipped_when_unknown():
    gate = SafetyGate(SafetyLimits(min_level_margin=0.02))
    assert gate.check(**good_kwargs(level_margin=0.02)) == (True, OK)
    assert gate.check(**good_kwargs(level_margin=None)) == (True, OK)  # not verified: no check
    assert not gate.check_content(GOOD_POSE, 0.99, 1.2, 5000, level_margin=-0.01)[0]
    assert SafetyGate(SafetyLimits(min_level_margin=-1.0)).check(
        **good_kwargs(level_margin=-0.5)) == (True, OK)


def test_reversal_margin_floor_is_inclusive_skipped_when_unknown_and_after_the_level():
    gate = SafetyGate(SafetyLimits(min_reversal_margin=0.02))
    assert gate.check(**good_kwargs(reversal_margin=0.02)) == (True, OK)
    assert gate.check(**good_kwargs(reversal_margin=None)) == (True, OK)
    assert not gate.check_content(GOOD_POSE, 0.99, 1.2, 5000, reversal_margin=-0.03)[0]
    # both ambiguous: the level is named first
    valid, reason = gate.check_content(GOOD_POSE, 0.99, 1.2, 5000, level_margin=0.0,
                                       reversal_margin=-0.03)
    assert not valid and "level ambiguous" in reason
    assert SafetyGate(SafetyLimits(min_reversal_margin=-1.0)).check(
        **good_kwargs(reversal_margin=-0.5)) == (True, OK)


def test_final_move_limit_is_inclusive_skipped_when_unknown_or_off_and_after_the_margins():
    """A global registration whose dense final ICP wanted to move it more than
    ``max_final_move_mm`` (the pipeline then keeps the unrefined pose) is refused; a tracked
    frame (None) is not checked, and 0 switches the check off."""
    gate = SafetyGate(SafetyLimits(max_final_move_mm=2.0))
    assert gate.check(**good_kwargs(final_move_mm=2.0)) == (True, OK)
    assert gate.check(**good_kwargs(final_move_mm=None)) == (True, OK)
    valid, reason = gate.check_content(GOOD_POSE, 0.99, 1.2, 5000, final_move_mm=3.48)
    assert not valid and "3.48 mm > max_final_move_mm 2.00 mm" in reason
    # a reversal ambiguity is named first
    valid, reason = gate.check_content(GOOD_POSE, 0.99, 1.2, 5000, reversal_margin=-0.03,
                                       final_move_mm=3.48)
    assert not valid and "reversal ambiguous" in reason
    assert SafetyGate(SafetyLimits(max_final_move_mm=0.0)).check(
        **good_kwargs(final_move_mm=50.0)) == (True, OK)


def test_unknown_now_skips_only_the_age_check():
    gate = SafetyGate()
    assert gate.check(**good_kwargs(now_ns=None)) == (True, OK)
    assert not gate.check(**good_kwargs(now_ns=None, confidence=0.1))[0]


def test_zero_max_age_disables_the_age_check():
    gate = SafetyGate(SafetyLimits(max_age_s=0.0))
    assert gate.check(**good_kwargs(now_ns=100 * S + 3600 * S))[0]


def test_stamp_older_than_last_processed_is_rejected_but_equal_or_newer_passes():
    gate = SafetyGate()
    assert gate.check(**good_kwargs(stamp_ns=100 * S, now_ns=100 * S))[0]
    valid, reason = gate.check(**good_kwargs(stamp_ns=99 * S, now_ns=100 * S))
    assert not valid and "backwards" in reason and "1.000 s" in reason
    assert gate.check(**good_kwargs(stamp_ns=100 * S, now_ns=100 * S))[0]
    assert gate.check(**good_kwargs(stamp_ns=101 * S, now_ns=101 * S))[0]
    # a rejected (gated) frame still counts as processed
    gate.check(**good_kwargs(stamp_ns=102 * S, now_ns=102 * S, confidence=0.0))
    assert not gate.check_stamp(101 * S)[0]
    gate.reset()
    assert gate.check_stamp(101 * S) == (True, OK)


def test_check_stamp_does_not_record_the_stamp():
    gate = SafetyGate()
    assert gate.check_stamp(5 * S)[0]
    assert gate.last_stamp_ns is None
    gate.mark_processed(5 * S)
    assert not gate.check_stamp(4 * S)[0]


@pytest.mark.parametrize(
    ("pose", "words"),
    [
        (np.full((4, 4), np.nan), "NaN"),
        (np.eye(3), "shape"),
        (make_pose(np.diag([1.0, 1.0, -1.0]), [0, 0, 300]), "reflection"),
        (make_pose(1.1 * np.eye(3), [0, 0, 300]), "orthonormal"),
        (make_pose(np.eye(3), [0, 0, 20]), "working range"),
        (make_pose(np.eye(3), [0, 0, 1500]), "working range"),
        (make_pose(np.eye(3), [0, 0, -300]), "working range"),
        (make_pose(np.eye(3), [600, 0, 300]), "optical axis"),
    ],
)
def test_implausible_poses_are_rejected(pose, words):
    valid, reason = check_pose(pose, SafetyLimits())
    assert not valid and words in reason
    gate_valid, gate_reason = SafetyGate().check(**good_kwargs(cam_from_spine=pose))
    assert not gate_valid and gate_reason == reason


def test_nominal_surgical_poses_pass_the_pose_check():
    rng = np.random.default_rng(3)
    for _ in range(50):
        rot = axis_angle_to_matrix(rng.normal(size=3), rng.uniform(0, np.pi))
        t = [rng.uniform(-100, 100), rng.uniform(-100, 100), rng.uniform(150, 600)]
        pose = make_pose(rot, t)
        assert check_pose(pose, SafetyLimits()) == (True, OK)
