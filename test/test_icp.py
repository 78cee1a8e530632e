"""The point-to-plane ICP on a prebuilt search tree (end2reg_ros.registration.icp)."""

import numpy as np
import pytest

from end2reg_ros.geometry import axis_angle_to_matrix, invert, make_pose, transform_points
from end2reg_ros.registration.icp import IcpTarget, point_to_plane_icp


def _surface(rng, count=4000):
    """A curved patch with a bump (not symmetric: ICP can pin all six motions), mm."""
    xy = rng.uniform(-30.0, 30.0, size=(count, 2))
    z = 0.01 * xy[:, 0] ** 2 - 0.02 * xy[:, 1] ** 2 + 6.0 * np.exp(
        -((xy[:, 0] - 8.0) ** 2 + (xy[:, 1] + 5.0) ** 2) / 60.0)
    points = np.column_stack([xy, z])
    # normals of z = f(x, y): (-f_x, -f_y, 1), normalised
    bump = 6.0 * np.exp(-((xy[:, 0] - 8.0) ** 2 + (xy[:, 1] + 5.0) ** 2) / 60.0)
    fx = 0.02 * xy[:, 0] - bump * 2.0 * (xy[:, 0] - 8.0) / 60.0
    fy = -0.04 * xy[:, 1] - bump * 2.0 * (xy[:, 1] + 5.0) / 60.0
    normals = np.column_stack([-fx, -fy, np.ones(count)])
    return points, normals / np.linalg.norm(normals, axis=1, keepdims=True)


def _scene(rng, points, count=800, noise_mm=0.2):
    """Source points in a 'camera' frame: a subset of the surface, moved by a known pose."""
    spine_from_cam = make_pose(axis_angle_to_matrix(np.array([0.3, -0.5, 1.0]), np.radians(6.0)),
                               np.array([1.5, -1.0, 0.8]))
    picked = points[rng.choice(len(points), count, replace=False)]
    picked = picked + rng.normal(0.0, noise_mm, picked.shape)
    return transform_points(invert(spine_from_cam), picked), spine_from_cam


def test_recovers_a_known_pose():
    rng = np.random.default_rng(3)
    points, normals = _surface(rng)
    source, truth = _scene(rng, points)
    target = IcpTarget.build(points, normals)
    pose = point_to_plane_icp(source, target, np.eye(4), (6.0, 3.0), 30)
    # the residual motion at the patch's corners (mm)
    corners = np.array([[-30.0, -30.0, 0.0], [30.0, 30.0, 0.0], [30.0, -30.0, 0.0]])
    error = transform_points(pose @ invert(truth), corners) - corners
    assert np.abs(error).max() < 0.2, error
    # from the identity the error was millimetres
    start = transform_points(invert(truth), corners) - corners
    assert np.abs(start).max() > 1.5


def test_matches_open3d_registration_icp():
    """Same algorithm as open3d's point-to-plane ICP: same poses to rounding."""
    o3d = pytest.importorskip("open3d", reason="open3d is the reference implementation")
    reg = o3d.pipelines.registration
    rng = np.random.default_rng(5)
    points, normals = _surface(rng)
    target = IcpTarget.build(points, normals)
    tgt = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points))
    tgt.normals = o3d.utility.Vector3dVector(normals)
    for count, distances, iterations in ((300, (3.0,), 20), (1500, (6.0, 3.0), 15),
                                         (800, (3.0, 1.5), 2), (800, (8.0,), 1)):
        source, truth = _scene(rng, points, count)
        init = make_pose(np.eye(3), np.array([0.5, 0.0, -0.3]))
        ours = point_to_plane_icp(source, target, init, distances, iterations)
        theirs = init
        src = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(source))
        for distance in distances:
            theirs = np.asarray(reg.registration_icp(
                src, tgt, distance, theirs, reg.TransformationEstimationPointToPlane(),
                reg.ICPConvergenceCriteria(max_iteration=iterations)).transformation)
        np.testing.assert_allclose(ours, theirs, atol=1e-9)
        assert not np.allclose(ours, init, atol=1e-3)  # it moved


def test_no_pairs_leaves_the_pose_and_bad_input_is_refused():
    rng = np.random.default_rng(1)
    points, normals = _surface(rng, 500)
    target = IcpTarget.build(points, normals)
    far = points[:50] + np.array([0.0, 0.0, 100.0])  # 100 mm above the surface
    init = make_pose(np.eye(3), np.array([0.0, 0.0, 0.0]))
    np.testing.assert_array_equal(point_to_plane_icp(far, target, init, (3.0,), 10), init)
    np.testing.assert_array_equal(point_to_plane_icp(np.zeros((0, 3)), target, init, (3.0,), 10),
                                  init)
    with pytest.raises(ValueError, match="must be \\(N, 3\\)"):
        IcpTarget.build(points, normals[:10])
    with pytest.raises(ValueError, match="tree holds"):
        IcpTarget.build(points, normals, IcpTarget.build(points[:10], normals[:10]).tree)
    with pytest.raises(ValueError, match="4x4"):
        point_to_plane_icp(points[:10], target, np.eye(3), (3.0,), 10)

