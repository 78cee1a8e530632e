"""Metrics against closed-form cases: translation, rotation about a point, identity, thresholds."""

from __future__ import annotations

import numpy as np
import pytest

from end2reg_ros import metrics
from end2reg_ros.camera import CameraIntrinsics
from end2reg_ros.geometry import axis_angle_to_matrix, make_pose, random_rotation
from end2reg_ros.types import LEVELS, Frame, Specimen, Vertebra


def _specimen() -> Specimen:
    """Five cubes 32 mm apart along +y, two targets each."""
    rng = np.random.default_rng(0)
    vertebrae = []
    for i, level in enumerate(LEVELS):
        centre = np.array([0.0, 32.0 * (i - 2), 0.0])
        verts = centre + rng.uniform(-10, 10, size=(50, 3))
        verts -= verts.mean(axis=0) - centre
        targets = {"a": centre + [5.0, 0, 3.0], "b": centre + [-5.0, 0, 3.0]}
        vertebrae.append(Vertebra(level, verts, np.zeros((0, 3), int), targets))
    return Specimen("cubes", vertebrae)


def _frame(true: np.ndarray, vertebrae: dict | None = None) -> Frame:
    cam = CameraIntrinsics(4, 3, 1.0, 1.0, 1.5, 1.0)
    return Frame(
        color=np.zeros((3, 4, 3), np.uint8),
        depth_mm=np.zeros((3, 4), np.uint16),
        camera=cam,
        cam_from_spine=true,
        cam_from_vertebra=vertebrae,
    )


TRUE = make_pose(random_rotation(np.random.default_rng(1), 180.0), [10.0, -20.0, 300.0])


def test_identity_gives_zero_everywhere():
    spec = _specimen()
    m = metrics.frame_metrics(TRUE, _frame(TRUE), spec)
    assert np.allclose(m.tre_mm, 0.0, atol=1e-9)
    assert m.rmse_mm == pytest.approx(0.0, abs=1e-9)
    assert m.rre_deg == pytest.approx(0.0, abs=1e-5)
    assert m.rte_mm == pytest.approx(0.0, abs=1e-9)
    assert not m.wrong_level


@pytest.mark.parametrize("d", [0.5, 3.0, 12.0])
def test_pure_translation_gives_tre_rte_rmse_equal_d(d):
    spec = _specimen()
    direction = np.array([1.0, 2.0, -2.0]) / 3.0
    est = TRUE.copy()
    est[:3, 3] += d * direction  # translation in the camera frame
    m = metrics.frame_metrics(est, _frame(TRUE), spec)
    np.testing.assert_allclose(m.tre_mm, d, rtol=1e-9)
    assert m.rte_mm == pytest.approx(d)
    assert m.rmse_mm == pytest.approx(d)
    assert m.rre_deg == pytest.approx(0.0, abs=1e-5)


def test_rotation_about_a_point_gives_chord_length_per_target():
    spec = _specimen()
    pivot = np.array([3.0, 32.0, -5.0])  # near the centre of L4, spine frame
    angle = np.radians(10.0)
    axis = np.array([0.0, 0.0, 1.0])
    rot = axis_angle_to_matrix(axis, angle)
    perturb = make_pose(rot, pivot - rot @ pivot)  # rotation about the axis through pivot
    est = TRUE @ perturb
    targets, levels = spec.target_points()
    tre = metrics.tre_mm(est, TRUE, targets)
    # distance of each target from the rotation axis through the pivot, chord 2 r sin(a/2)
    radius = np.linalg.norm((targets - pivot)[:, :2], axis=1)
    np.testing.assert_allclose(tre, 2.0 * radius * np.sin(angle / 2.0), rtol=1e-9)
    assert metrics.rre_deg(est, TRUE) == pytest.approx(10.0)
    # the spine origin moves on a circle about the axis as well
    origin_chord = 2.0 * np.linalg.norm(pivot[:2]) * np.sin(angle / 2.0)
    assert metrics.rte_mm(est, TRUE) == pytest.approx(origin_chord)


def test_tre_uses_the_true_pose_of_each_targets_own_vertebra():
    spec = _specimen()
    moved = {lv: TRUE for lv in LEVELS}
    moved["L4"] = TRUE @ make_pose(np.eye(3), [0.0, 0.0, 4.0])
    targets, levels = spec.target_points()
    tre = metrics.tre_mm(TRUE, moved, targets, levels)
    expected = np.where(np.asarray(levels) == "L4", 4.0, 0.0)
    np.testing.assert_allclose(tre, expected, atol=1e-9)
    per_target = np.stack([moved[lv] for lv in levels])
    np.testing.assert_allclose(metrics.tre_mm(TRUE, per_target, targets), expected, atol=1e-9)
    m = metrics.frame_metrics(TRUE, _frame(TRUE, moved), spec)
    np.testing.assert_allclose(m.tre_mm, expected, atol=1e-9)
    assert m.rmse_mm == pytest.approx(np.sqrt(16.0 / 5.0))  # 1 of 5 equal-size vertebrae
    with pytest.raises(ValueError):
        metrics.tre_mm(TRUE, moved, targets)


def test_level_offset_and_wrong_level_on_a_one_level_shift():
    spec = _specimen()
    offset = metrics.level_offset_mm(spec)
    np.testing.assert_allclose(offset, [0.0, 32.0, 0.0], atol=1e-9)
    for sign in (1.0, -1.0):
        shifted = TRUE @ make_pose(np.eye(3), sign * offset)
        m = metrics.frame_metrics(shifted, _frame(TRUE), spec)
        assert m.wrong_level
        np.testing.assert_allclose(m.tre_mm, 32.0)
    # just under half a level along the spine: not wrong-level; just over: wrong-level
    assert not metrics.frame_metrics(
        TRUE @ make_pose(np.eye(3), [0, 15.9, 0]), _frame(TRUE), spec
    ).wrong_level
    assert metrics.frame_metrics(
        TRUE @ make_pose(np.eye(3), [0, 16.1, 0]), _frame(TRUE), spec
    ).wrong_level
    # a large error across the spine is not a level shift
    assert not metrics.frame_metrics(
        TRUE @ make_pose(np.eye(3), [40.0, 0, 0]), _frame(TRUE), spec
    ).wrong_level


def test_success_rates_are_strict_at_the_threshold_on_the_frame_median():
    assert metrics.success_rate([1.999, 2.0, 2.001, 0.5], 2.0) == 0.5
    frames = []
    for median in (1.0, 2.0, 2.5, 3.0, 4.99, 5.0, 30.0, 30.0):
        tre = np.array([median - 1.0, median, median + 100.0])  # median of 3 = median
        frames.append(metrics.FrameMetrics(tre, 1.0, 0.5, 0.3, median > 20, runtime_ms=median))
    s = metrics.summarize(frames)
    assert s["success_2mm"] == pytest.approx(1 / 8)
    assert s["success_3mm"] == pytest.approx(3 / 8)
    assert s["success_5mm"] == pytest.approx(5 / 8)
    assert s["wrong_level_rate"] == pytest.approx(2 / 8)
    assert s["gross_failure_rate"] == pytest.approx(2 / 8)
    assert s["frames"] == 8
    pooled = np.concatenate([f.tre_mm for f in frames])
    assert s["tre_median_mm"] == pytest.approx(np.median(pooled))
    assert s["tre_mean_mm"] == pytest.approx(pooled.mean())
    assert s["tre_p95_mm"] == pytest.approx(np.percentile(pooled, 95))
    assert s["runtime_p50_ms"] == pytest.approx(np.median([f.runtime_ms for f in frames]))


def test_rre_is_symmetric_and_near_180_is_finite():
    a = make_pose(axis_angle_to_matrix([0, 1, 0], np.radians(179.999)), [0, 0, 0])
    assert metrics.rre_deg(a, np.eye(4)) == pytest.approx(179.999, abs=1e-3)
    assert metrics.rre_deg(np.eye(4), a) == pytest.approx(metrics.rre_deg(a, np.eye(4)))


def test_frame_without_ground_truth_is_rejected():
    with pytest.raises(ValueError, match="ground truth"):
        metrics.frame_metrics(TRUE, _frame(None), _specimen())
