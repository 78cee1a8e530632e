"""Classical baselines (Open3D): icp-prior and oracle recover the pose on an easy frame."""

from __future__ import annotations

import numpy as np
import pytest

from end2reg_ros import metrics
from end2reg_ros.camera import CameraIntrinsics
from end2reg_ros.geometry import axis_angle_to_matrix, make_pose, transform_points
from end2reg_ros.registration import make_method
from end2reg_ros.registration.prior import SurgicalSetupPrior, nominal_cam_from_spine
from end2reg_ros.synth.anatomy import generate_specimen
from end2reg_ros.synth.generate import render_frames
from end2reg_ros.types import LEVELS, Frame, Specimen

TISSUE_Z_MM = 15.0  # spine-frame height of the soft-tissue floor of the simple scene


def _simple_frame(specimen: Specimen, cam_from_spine: np.ndarray, seed: int) -> Frame:
    """Raycast the vertebrae plus a flat tissue floor (spine z = 15 mm) with 0.3 mm noise."""
    import open3d as o3d

    camera = CameraIntrinsics(320, 240, 192.5, 192.5, 159.5, 119.5)
    scene = o3d.t.geometry.RaycastingScene()
    for v in specimen.vertebrae:
        scene.add_triangles(
            o3d.core.Tensor(transform_points(cam_from_spine, v.vertices).astype(np.float32)),
            o3d.core.Tensor(np.asarray(v.faces, dtype=np.uint32)),
        )
    s = 200.0
    floor = np.array(
        [[-s, -s, TISSUE_Z_MM], [s, -s, TISSUE_Z_MM], [s, s, TISSUE_Z_MM], [-s, s, TISSUE_Z_MM]]
    )
    scene.add_triangles(
        o3d.core.Tensor(transform_points(cam_from_spine, floor).astype(np.float32)),
        o3d.core.Tensor(np.array([[0, 1, 2], [0, 2, 3]], dtype=np.uint32)),
    )
    u, v = np.meshgrid(np.arange(camera.width), np.arange(camera.height))
    dirs = np.stack(
        [(u - camera.cx) / camera.fx, (v - camera.cy) / camera.fy, np.ones_like(u, float)], -1
    )
    rays = np.concatenate([np.zeros_like(dirs), dirs], -1).reshape(-1, 6).astype(np.float32)
    hit = scene.cast_rays(o3d.core.Tensor(rays))
    t = hit["t_hit"].numpy().reshape(camera.height, camera.width)  # z = t since dir z = 1
    geom = hit["geometry_ids"].numpy().reshape(camera.height, camera.width).astype(np.int64)
    rng = np.random.default_rng(seed)
    depth = np.where(np.isfinite(t), t + rng.normal(0.0, 0.3, t.shape), 0.0)
    labels = np.where(np.isfinite(t) & (geom < len(specimen.vertebrae)), geom + 1, 0)
    return Frame(
        color=np.zeros((camera.height, camera.width, 3), np.uint8),
        depth_mm=np.clip(np.rint(depth), 0, 65535).astype(np.uint16),
        camera=camera,
        stamp_ns=1,
        cam_from_spine=cam_from_spine,
        cam_from_vertebra={lv: cam_from_spine for lv in LEVELS},
        labels=labels.astype(np.uint8),
    )


EASY_CAMERA = CameraIntrinsics(320, 240, 192.5, 192.5, 159.5, 119.5)


@pytest.fixture(scope="module")
def easy():
    """Frame 1 of a synthetic recording without occluders or tissue remnants (320x240), and
    an initial pose 5 deg / 8 mm off (fixed seeds)."""
    specimen = generate_specimen(7, "S7")
    frames = list(
        render_frames(
            specimen, 2, np.random.default_rng(0), EASY_CAMERA, (0.0, 0.0), tissue_amount=0.0
        )
    )
    frame = frames[1]
    init = SurgicalSetupPrior(5.0, 8.0).sample_initial(
        frame.cam_from_spine, np.random.default_rng(1)
    )
    return specimen, frame, init


@pytest.fixture(scope="module")
def floor_scene():
    """Vertebrae on a flat tissue floor, rendered here (no vertebra motion)."""
    specimen = generate_specimen(7, "S7")
    true = nominal_cam_from_spine(330.0) @ make_pose(
        axis_angle_to_matrix([0.3, 1.0, 0.2], np.radians(6.0)), [4.0, -6.0, 3.0]
    )
    frame = _simple_frame(specimen, true, seed=0)
    init = true @ make_pose(
        axis_angle_to_matrix([1.0, -0.5, 0.3], np.radians(5.0)), [6.0, 5.0, -4.0]
    )
    return specimen, frame, init


def _median_tre(estimate, frame, specimen) -> float:
    return metrics.frame_metrics(estimate.cam_from_spine, frame, specimen).tre_median_mm


def test_icp_prior_recovers_pose_on_an_easy_synthetic_frame(easy):
    specimen, frame, init = easy
    method = make_method("icp-prior")
    method.prepare(specimen)
    start = metrics.frame_metrics(init, frame, specimen).tre_median_mm
    est = method.register(frame, init)
    assert start > 3.0
    assert _median_tre(est, frame, specimen) < 2.0


def test_icp_prior_recovers_pose_from_coarse_initial_pose(floor_scene):
    specimen, frame, init = floor_scene
    method = make_method("icp-prior")
    method.prepare(specimen)
    start = metrics.frame_metrics(init, frame, specimen).tre_median_mm
    est = method.register(frame, init)
    assert start > 6.0
    assert _median_tre(est, frame, specimen) < 2.0
    assert 0.0 < est.confidence <= 1.0
    assert est.num_points == len(est.points_cam) == len(est.point_weight)
    assert set(np.unique(est.point_weight)) <= {0.0, 1.0}
    assert np.isfinite(est.residual_mm) and est.residual_mm < 3.0
    assert {"crop", "icp"} <= set(est.stage_ms)


def test_oracle_is_at_the_noise_floor_and_ignores_the_initial_pose(easy):
    specimen, frame, init = easy
    method = make_method("oracle")
    method.prepare(specimen)
    est = method.register(frame, init)
    # noise floor: the best rigid pose of vertebrae that moved a little relative to each other
    floor = metrics.frame_metrics(frame.cam_from_spine, frame, specimen).tre_median_mm
    assert _median_tre(est, frame, specimen) < floor + 0.5
    far = init @ make_pose(axis_angle_to_matrix([0, 0, 1], np.radians(10.0)), [10.0, 0, 0])
    np.testing.assert_allclose(method.register(frame, far).cam_from_spine, est.cam_from_spine)


def test_oracle_uses_bone_pixels_only(floor_scene):
    specimen, frame, init = floor_scene
    method = make_method("oracle")
    method.prepare(specimen)
    est = method.register(frame, init)
    assert _median_tre(est, frame, specimen) < 0.5
    # every used point lies on a vertebra surface; the full scene also has the tissue floor
    assert _distance_to_bone(specimen, frame.cam_from_spine, est.points_cam).max() < 2.0
    prior = make_method("icp-prior")
    prior.prepare(specimen)
    scene_points = prior.register(frame, init).points_cam
    assert _distance_to_bone(specimen, frame.cam_from_spine, scene_points).max() > 5.0


def _distance_to_bone(specimen, cam_from_spine, points_cam) -> np.ndarray:
    import open3d as o3d

    scene = o3d.t.geometry.RaycastingScene()
    for v in specimen.vertebrae:
        scene.add_triangles(
            o3d.core.Tensor(transform_points(cam_from_spine, v.vertices).astype(np.float32)),
            o3d.core.Tensor(np.asarray(v.faces, dtype=np.uint32)),
        )
    query = o3d.core.Tensor(np.asarray(points_cam, dtype=np.float32))
    return scene.compute_distance(query).numpy()


def test_oracle_refuses_frames_without_ground_truth(easy):
    specimen, frame, init = easy
    method = make_method("oracle")
    method.prepare(specimen)
    blind = Frame(frame.color, frame.depth_mm, frame.camera)
    with pytest.raises(ValueError, match="ground truth"):
        method.register(blind, init)


def test_fpfh_ransac_icp_returns_a_rigid_estimate_with_global_search(easy):
    specimen, frame, init = easy
    method = make_method("fpfh-ransac-icp", seed=0)
    method.prepare(specimen)
    est = method.register(frame, init)
    rot = est.cam_from_spine[:3, :3]
    np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-6)
    assert {"crop", "features", "ransac", "icp"} <= set(est.stage_ms)
    assert 0.0 <= est.confidence <= 1.0
    assert est.num_points > 100


def test_empty_crop_returns_initial_pose_with_zero_confidence(easy):
    specimen, frame, init = easy
    method = make_method("icp-prior")
    method.prepare(specimen)
    far = init @ make_pose(np.eye(3), [0.0, 0.0, 5000.0])
    est = method.register(frame, far)
    assert est.confidence == 0.0
    np.testing.assert_array_equal(est.cam_from_spine, far)


def test_unknown_method_name_is_rejected():
    with pytest.raises(ValueError):
        make_method("icp-magic")
