"""Rigid-body geometry, back-projection and the surgical-setup prior on closed-form cases."""

from __future__ import annotations

import numpy as np
import pytest

from end2reg_ros.camera import CameraIntrinsics, backproject
from end2reg_ros.geometry import (
    axis_angle_to_matrix,
    invert,
    make_pose,
    matrix_to_quaternion,
    quaternion_to_matrix,
    random_rotation,
    rotation_angle_deg,
    transform_points,
    weighted_procrustes,
)
from end2reg_ros.registration.prior import (
    SurgicalSetupPrior,
    coarse_initial_pose,
    nominal_cam_from_spine,
    region_of_interest_mask,
)


def test_invert_composes_to_identity():
    rng = np.random.default_rng(0)
    pose = make_pose(random_rotation(rng, 170), rng.normal(size=3) * 100)
    np.testing.assert_allclose(pose @ invert(pose), np.eye(4), atol=1e-12)


def test_quaternion_round_trip_and_known_value():
    rot = axis_angle_to_matrix([0, 0, 1], np.pi / 2)
    np.testing.assert_allclose(matrix_to_quaternion(rot), [0, 0, np.sqrt(0.5), np.sqrt(0.5)], atol=1e-12)
    rng = np.random.default_rng(1)
    for _ in range(50):
        r = random_rotation(rng, 180)
        np.testing.assert_allclose(quaternion_to_matrix(matrix_to_quaternion(r)), r, atol=1e-10)


def test_rotation_angle_of_known_rotation():
    assert rotation_angle_deg(axis_angle_to_matrix([1, 2, 3], np.radians(37.0))) == pytest.approx(37.0)


def test_weighted_procrustes_recovers_pose_and_ignores_zero_weight_outliers():
    rng = np.random.default_rng(2)
    source = rng.normal(size=(100, 3)) * 50
    truth = make_pose(random_rotation(rng, 90), [10.0, -20.0, 300.0])
    target = transform_points(truth, source)
    np.testing.assert_allclose(weighted_procrustes(source, target), truth, atol=1e-9)
    target[:30] += rng.normal(size=(30, 3)) * 100  # outliers
    weights = np.r_[np.zeros(30), np.ones(70)]
    np.testing.assert_allclose(weighted_procrustes(source, target, weights), truth, atol=1e-9)


def test_backproject_inverts_projection():
    cam = CameraIntrinsics.d405_640x480()
    depth = np.zeros((480, 640), dtype=np.uint16)
    depth[100, 200] = 300
    depth[400, 600] = 450
    points, index = backproject(depth, cam)
    assert sorted(index.tolist()) == [100 * 640 + 200, 400 * 640 + 600]
    uv = cam.project(points.astype(float))
    np.testing.assert_allclose(np.sort(uv[:, 0]), [200, 600], atol=1e-3)
    with pytest.raises(ValueError, match="camera_info"):
        backproject(np.zeros((10, 10)), cam)


def test_prior_samples_stay_within_bounds():
    prior = SurgicalSetupPrior()
    rng = np.random.default_rng(3)
    truth = nominal_cam_from_spine(350.0)
    for _ in range(200):
        init = prior.sample_initial(truth, rng)
        delta = invert(truth) @ init
        assert rotation_angle_deg(delta[:3, :3]) <= prior.max_rotation_deg + 1e-9
        assert np.linalg.norm(delta[:3, 3]) <= prior.max_translation_mm + 1e-9


def test_coarse_initial_pose_from_a_flat_surface():
    cam = CameraIntrinsics.d405_640x480()
    depth = np.full((480, 640), 300, dtype=np.uint16)
    pose = coarse_initial_pose(depth, cam, posterior_surface_height_mm=60.0)
    np.testing.assert_allclose(pose[:3, 3], [0.0, 0.0, 360.0], atol=1.0)
    with pytest.raises(ValueError):
        coarse_initial_pose(np.zeros_like(depth), cam, 60.0)


def test_region_of_interest_keeps_points_inside_the_grown_box():
    pose = nominal_cam_from_spine(300.0)
    inside = transform_points(pose, np.array([[0.0, 0.0, 0.0], [40.0, 90.0, 70.0]]))
    outside = transform_points(pose, np.array([[200.0, 0.0, 0.0]]))
    mask = region_of_interest_mask(np.vstack([inside, outside]), pose, [-50, -100, -30], [50, 100, 80])
    assert mask.tolist() == [True, True, False]
