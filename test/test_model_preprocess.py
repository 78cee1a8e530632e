"""Preprocessing: the windowed crop equals the full back-projection + region of interest."""

from __future__ import annotations

import numpy as np

from end2reg_ros.camera import CameraIntrinsics, backproject
from end2reg_ros.model.preprocess import crop_scene, sample_mesh_surface
from end2reg_ros.registration.prior import (
    SurgicalSetupPrior,
    nominal_cam_from_spine,
    region_of_interest_mask,
)
from end2reg_ros.types import Frame


def test_windowed_crop_equals_full_backprojection_then_roi():
    rng = np.random.default_rng(0)
    camera = CameraIntrinsics.d405_640x480()
    depth = rng.uniform(250, 400, size=(480, 640)).astype(np.uint16)
    depth[rng.uniform(size=depth.shape) < 0.1] = 0
    color = rng.integers(0, 255, size=(480, 640, 3), dtype=np.uint8)
    labels = rng.integers(0, 6, size=(480, 640), dtype=np.uint8)
    frame = Frame(color, depth, camera, labels=labels)
    lo, hi = np.array([-40.0, -90.0, -20.0]), np.array([40.0, 95.0, 60.0])
    for k in range(3):
        pose = SurgicalSetupPrior().sample_initial(nominal_cam_from_spine(330.0 + 20 * k), rng)
        points, colors, labs = crop_scene(frame, pose, lo, hi, 25.0, with_labels=True)
        full, pixel = backproject(depth, camera)
        keep = region_of_interest_mask(full, pose, lo, hi, 25.0)
        assert 1000 < len(points) < len(full)
        order_a = np.lexsort(points.T)
        order_b = np.lexsort(full[keep].T)
        np.testing.assert_array_equal(points[order_a], full[keep][order_b])
        np.testing.assert_allclose(colors[order_a], color.reshape(-1, 3)[pixel[keep]][order_b] / 255)
        np.testing.assert_array_equal(labs[order_a], labels.reshape(-1)[pixel[keep]][order_b])


def test_mesh_sampling_is_on_the_surface_with_unit_normals():
    vertices = np.array([[0, 0, 0], [10, 0, 0], [0, 10, 0], [0, 0, 10]], dtype=float)
    faces = np.array([[0, 2, 1], [0, 1, 3]])  # z = 0 and y = 0 triangles
    points, normals = sample_mesh_surface(vertices, faces, 500, np.random.default_rng(1))
    assert np.all((np.abs(points[:, 2]) < 1e-5) | (np.abs(points[:, 1]) < 1e-5))
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-5)
    assert np.all(points.min(0) >= -1e-5) and np.all(points.sum(1) <= 10 + 1e-4)


def test_normals_estimated_for_the_sampled_points_match_those_of_the_whole_cloud():
    """The registration estimates normals only for the points it samples
    (``build_scene(normals=False)`` + ``SceneCloud.normals_at``): the same normals as
    open3d's estimate for the whole cloud, except where ties in the 30 nearest neighbours
    (a regular pixel grid at one depth) pick another neighbourhood."""
    from end2reg_ros.model.preprocess import downsample_with_normals, estimate_normals_at

    rng = np.random.default_rng(4)
    # a curved surface 300-400 mm in front of the camera, as a depth camera samples it
    u, v = np.meshgrid(np.linspace(-60, 60, 160), np.linspace(-40, 40, 110))
    z = 350.0 + 0.004 * u**2 - 0.006 * v**2 + 10.0 * np.sin(u / 15.0)
    points = np.column_stack([u.ravel(), v.ravel(), z.ravel()])
    points += rng.normal(0.0, 0.05, points.shape)
    colors = rng.uniform(0.0, 1.0, points.shape)
    whole = downsample_with_normals(points, colors, 2.0, 6.0)
    lazy = downsample_with_normals(points, colors, 2.0, 6.0, normals=False)
    assert lazy.normals is None
    np.testing.assert_array_equal(whole.points, lazy.points)
    index = rng.choice(len(whole.points), 512, replace=False)
    ours = lazy.normals_at(index)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    cosine = np.abs(np.sum(ours * whole.normals[index], axis=1))
    assert np.mean(cosine > np.cos(np.radians(0.1))) > 0.99
    # same side: towards the optical centre
    assert np.all(np.sum(ours * -whole.points[index], axis=1) > 0)
    np.testing.assert_array_equal(whole.normals_at(index), whole.normals[index])
    # an isolated point (fewer than 3 neighbours within the radius): (0, 0, -1), as open3d
    lonely = np.vstack([whole.points, [[500.0, 500.0, 900.0]]])
    np.testing.assert_allclose(estimate_normals_at(lonely, np.array([len(lonely) - 1]), 6.0),
                               [[0.0, 0.0, -1.0]])
