"""Projective point-to-plane ICP (tracking's default): it brings a perturbed pose back onto
the rendered surface, skips back faces and occluders, and says when there is nothing to
align."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from end2reg_ros.camera import CameraIntrinsics
from end2reg_ros.geometry import axis_angle_to_matrix, make_pose, transform_points
from end2reg_ros.metrics import tre_mm
from end2reg_ros.registration.depth_check import posterior_visible, surface_samples
from end2reg_ros.registration.projective_icp import (
    DepthImage,
    projective_icp,
    twist_to_pose,
)
from end2reg_ros.synth.anatomy import generate_specimen
from end2reg_ros.synth.generate import ViewSampler, render_frames


@pytest.fixture(scope="module")
def specimen():
    return generate_specimen(5, "projective")


@pytest.fixture(scope="module")
def frame(specimen):
    return next(iter(render_frames(specimen, 1, np.random.default_rng(11), occlusion=(0.0, 0.0),
                                   views=ViewSampler(motion="smooth"))))


@pytest.fixture(scope="module")
def model(specimen):
    """Posterior-visible surface samples of the specimen, outward normals (spine frame)."""
    visible = posterior_visible(surface_samples(specimen, count=6000, seed=0), specimen)
    return visible.points.astype(float), visible.normals.astype(float)


def _tre(pose, frame, specimen) -> float:
    targets, levels = specimen.target_points()
    return float(np.median(tre_mm(pose, frame.cam_from_vertebra, targets, levels)))


def _perturbed(pose: np.ndarray, shift_mm, angle_deg: float, axis) -> np.ndarray:
    """``pose`` moved in the optical frame by ``shift_mm`` and turned by ``angle_deg`` about
    ``axis`` through the spine frame's origin as seen by the camera."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    turn = make_pose(axis_angle_to_matrix(axis, np.radians(angle_deg)), np.zeros(3))
    centre = pose[:3, 3].copy()
    about = make_pose(np.eye(3), centre) @ turn @ make_pose(np.eye(3), -centre)
    return make_pose(np.eye(3), np.asarray(shift_mm, float)) @ about @ pose


@pytest.mark.parametrize("shift, angle, axis", [
    ((3.0, -2.0, 1.0), 2.0, (0.0, 0.0, 1.0)),
    ((-2.0, 0.0, -2.5), 3.0, (1.0, 1.0, 0.0)),
    ((0.0, 4.0, 0.0), 0.0, (1.0, 0.0, 0.0)),
])
def test_a_perturbed_pose_comes_back_onto_the_surface(specimen, frame, model, shift, angle,
                                                      axis):
    truth = frame.cam_from_spine
    start = _perturbed(truth, shift, angle, axis)
    before = _tre(start, frame, specimen)
    assert before > 2.5
    fit = projective_icp(DepthImage(frame.depth_mm, frame.camera), *model, start, (6.0, 3.0), 8)
    assert fit is not None and fit.steps > 0
    after = _tre(fit.cam_from_spine, frame, specimen)
    assert after < 1.0, (before, after)
    # the paired scene points lie on the model at the registered pose, each pixel once
    assert len(fit.scene_points) > 200
    in_spine = transform_points(np.linalg.inv(fit.cam_from_spine), fit.scene_points)
    nearest, _ = cKDTree(model[0]).query(in_spine, k=1)
    assert np.median(nearest) < 1.5
    assert len(np.unique(fit.scene_points, axis=0)) == len(fit.scene_points)


def test_the_truth_stays_where_it_is(specimen, frame, model):
    truth = frame.cam_from_spine
    fit = projective_icp(DepthImage(frame.depth_mm, frame.camera), *model, truth, (6.0, 3.0), 8)
    assert _tre(fit.cam_from_spine, frame, specimen) < 0.6


def test_back_facing_normals_find_almost_nothing(frame, model):
    """Model normals turned inwards read as back faces: from the truth, the ICP pairs the
    far fewer points whose inward normals happen to face the camera, and with a
    ``min_pairs`` above that, there is nothing to align."""
    image = DepthImage(frame.depth_mm, frame.camera)
    outward = projective_icp(image, model[0], model[1], frame.cam_from_spine, (3.0,), 1)
    inward = projective_icp(image, model[0], -model[1], frame.cam_from_spine, (3.0,), 1,
                            min_pairs=1)
    assert inward is None or len(inward.scene_points) < 0.25 * len(outward.scene_points)


def test_an_occluder_in_front_is_not_paired(specimen, frame, model):
    """A flat occluder 20 mm in front of the scene over the image's columns left of 280 (a
    quarter of the spine's pixels): its pixels are farther than the correspondence distance
    from the model and drop out; the pose still comes back."""
    edge = 280
    occluded = frame.depth_mm.astype(np.float32).copy()
    hide = (occluded > 0) & (np.arange(occluded.shape[1]) < edge)[None, :]
    occluded[hide] -= 20.0
    start = _perturbed(frame.cam_from_spine, (2.0, 1.0, 0.0), 1.0, (0.0, 1.0, 0.0))
    clear = projective_icp(DepthImage(frame.depth_mm, frame.camera), *model, start, (6.0, 3.0),
                           8)
    fit = projective_icp(DepthImage(occluded, frame.camera), *model, start, (6.0, 3.0), 8)
    assert fit is not None and clear is not None
    assert _tre(start, frame, specimen) > 1.5
    assert _tre(fit.cam_from_spine, frame, specimen) < 0.8
    assert 0.5 * len(clear.scene_points) < len(fit.scene_points) < 0.9 * len(clear.scene_points)
    # (almost) only the unoccluded part paired: the occluder is the scene shifted 20 mm
    # towards the camera, which can bring a few pixels beside the spine's silhouette
    # (tissue behind it) within the correspondence distance
    u = frame.camera.fx * fit.scene_points[:, 0] / fit.scene_points[:, 2] + frame.camera.cx
    assert np.mean(u < edge - 0.5) < 0.02


def test_no_depth_is_nothing_to_align(frame, model):
    blank = np.zeros_like(frame.depth_mm)
    assert projective_icp(DepthImage(blank, frame.camera), *model, frame.cam_from_spine,
                          (6.0, 3.0), 8) is None
    nan = np.full(frame.depth_mm.shape, np.nan, np.float32)
    assert projective_icp(DepthImage(nan, frame.camera), *model, frame.cam_from_spine,
                          (6.0, 3.0), 8) is None


def test_bad_input_is_a_clear_error(frame, model):
    with pytest.raises(ValueError, match="depth image is 10x10"):
        DepthImage(np.zeros((10, 10)), frame.camera)
    image = DepthImage(frame.depth_mm, frame.camera)
    with pytest.raises(ValueError, match="4x4"):
        projective_icp(image, *model, np.eye(3), (3.0,), 5)
    with pytest.raises(ValueError, match="at least one"):
        projective_icp(image, *model, frame.cam_from_spine, (), 5)
    with pytest.raises(ValueError, match="differ"):
        projective_icp(image, model[0], model[1][:10], frame.cam_from_spine, (3.0,), 5)


def test_twist_is_a_rigid_motion():
    pose = twist_to_pose(np.array([0.1, -0.2, 0.3, 1.0, 2.0, 3.0]))
    np.testing.assert_allclose(pose[:3, :3] @ pose[:3, :3].T, np.eye(3), atol=1e-12)
    assert np.isclose(np.linalg.det(pose[:3, :3]), 1.0)
    np.testing.assert_allclose(pose[:3, 3], [1.0, 2.0, 3.0])
    np.testing.assert_allclose(twist_to_pose(np.zeros(6)), np.eye(4))
    # small angles: the linearised rotation I + [w]x
    w = np.array([1e-4, -2e-4, 3e-4])
    skew = np.array([[0, -w[2], w[1]], [w[2], 0, -w[0]], [-w[1], w[0], 0]])
    np.testing.assert_allclose(twist_to_pose(np.r_[w, 0, 0, 0])[:3, :3], np.eye(3) + skew,
                               atol=1e-7)


def test_camera_with_an_other_size(frame):
    """The lookup follows the camera: a 1280x720 image of zeros is nothing to align."""
    cam = CameraIntrinsics.d405_1280x720()
    image = DepthImage(np.zeros((cam.height, cam.width), np.uint16), cam)
    points = np.array([[0.0, 0.0, 300.0], [1e4, 0.0, 300.0], [0.0, 0.0, -5.0]])
    _, flat, valid = image.scene_at(points)
    assert not valid.any() and flat[0] == 360 * 1280 + 640
