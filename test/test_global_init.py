"""Global initial poses: support plane, exposure trough, roll rotations, coarse depth
scoring of hypotheses, searches on a tilted support plane, and the pipeline's global
registration of a frame whose camera is rotated 180 deg about its optical axis (no
assumption on the camera placement)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

import end2reg_ros.pipeline as pipeline_module
from end2reg_ros.camera import CameraIntrinsics
from end2reg_ros.geometry import axis_angle_to_matrix, make_pose, rotation_angle_deg
from end2reg_ros.metrics import frame_metrics
from end2reg_ros.pipeline import PipelineConfig, RegistrationPipeline
from end2reg_ros.registration import make_method
from end2reg_ros.registration.global_init import (
    GlobalSearchConfig,
    Hypothesis,
    SupportPlane,
    candidate_anchors,
    climb_hypotheses,
    find_exposure,
    fine_scores,
    fit_support_plane,
    propose_initial_poses,
    refine_hypotheses,
    rotation_from_normal_roll,
    score_hypotheses,
    tilted_plane,
)
from end2reg_ros.synth.anatomy import generate_specimen
from end2reg_ros.synth.generate import SyntheticRenderer, ViewSampler

CAMERA = CameraIntrinsics.d405_640x480()
#: rotation of 180 deg about the optical axis (applied on the camera side of a pose)
OPTICAL_180 = np.diag([-1.0, -1.0, 1.0, 1.0])
#: rotation of 180 deg about the spine's posterior axis (applied on the spine side)
POSTERIOR_180 = np.diag([-1.0, -1.0, 1.0, 1.0])


def _angle_between_deg(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b),
                                              -1.0, 1.0))))


def _plane_depth(normal: np.ndarray, point: np.ndarray, camera: CameraIntrinsics) -> np.ndarray:
    """Depth image (mm) of the plane through ``point`` with ``normal`` (optical frame)."""
    u, v = np.meshgrid(np.arange(camera.width), np.arange(camera.height))
    rays = np.stack([(u - camera.cx) / camera.fx, (v - camera.cy) / camera.fy, np.ones(u.shape)],
                    -1)
    return ((normal @ point) / (rays @ normal)).astype(np.float32)  # ray z = 1: t is the depth


# ---------------------------------------------------------------------- support plane
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("normal", [[0.25, -0.15, -1.0], [0.0, 0.0, -1.0], [-0.5, 0.3, -1.0]])
def test_fit_support_plane_recovers_a_tilted_plane(seed, normal):
    """Tilted plane 350 mm away with noise, holes, a hand in front of it and a trough behind
    it: normal within 1 deg and oriented towards the camera (RANSAC draws either sign)."""
    rng = np.random.default_rng(seed)
    normal = np.asarray(normal) / np.linalg.norm(normal)
    point = np.array([0.0, 0.0, 350.0])
    depth = _plane_depth(normal, point, CAMERA)
    depth += rng.normal(0.0, 0.5, depth.shape).astype(np.float32)
    depth[300:420, 40:200] = 180.0  # a hand
    depth[180:300, 260:380] += 30.0  # the exposure
    depth[::7, ::5] = 0.0  # holes
    plane = fit_support_plane(depth, CAMERA, rng)
    assert _angle_between_deg(plane.normal, normal) < 1.0
    assert plane.normal @ (-point) > 0.0  # towards the camera (the optical centre)
    assert abs(plane.signed_height(point[None])[0]) < 1.5
    assert plane.inlier_fraction > 0.6
    # heights: the camera side is positive, the trough negative
    assert plane.signed_height(np.zeros((1, 3)))[0] > 300.0
    assert plane.signed_height((point + 30.0 * np.array([0.0, 0.0, 1.0]))[None])[0] < -20.0


def test_fit_support_plane_without_depth_raises():
    with pytest.raises(ValueError, match="valid depth points"):
        fit_support_plane(np.zeros((CAMERA.height, CAMERA.width), np.float32), CAMERA,
                          np.random.default_rng(0))


def test_find_exposure_locates_an_elongated_trough():
    """A 40 x 140 mm trough 25 mm deep, its long side along the image's x axis."""
    depth = np.full((CAMERA.height, CAMERA.width), 300.0, np.float32)
    # at 300 mm, 1 px = 300 / 385 mm: 140 mm ~ 180 px, 40 mm ~ 51 px; centre right of centre
    depth[214:265, 290:470] = 325.0
    plane = fit_support_plane(depth, CAMERA, np.random.default_rng(0))
    exposure = find_exposure(depth, CAMERA, plane)
    assert exposure.found and exposure.pixels >= GlobalSearchConfig().min_trough_pixels
    assert abs(exposure.axis[0]) > np.cos(np.radians(10.0))  # along x, either sign
    np.testing.assert_allclose(exposure.axis @ plane.normal, 0.0, atol=1e-6)
    np.testing.assert_allclose(exposure.cross @ plane.normal, 0.0, atol=1e-6)
    centre_x = (380 - CAMERA.cx) / CAMERA.fx * 325.0
    assert abs(exposure.centre[0] - centre_x) < 8.0
    assert abs(exposure.centre[1] - (239.5 - CAMERA.cy) / CAMERA.fy * 325.0) < 8.0
    assert abs(exposure.centre[2] - 325.0) < 3.0  # down in the trough


def test_deep_anchors_sit_on_the_floor_of_a_trough_seen_mostly_as_wall():
    """A tilted view into the wound sees more of one muscle wall than of the floor: a trough
    whose floor (45 mm deep, 8 px wide) is an eighth of its sampled pixels, the rest a wall
    sloping from the floor up to 9 mm behind the plane. The deepest anchors the search of a
    weak registration uses (``weak_search_floor_percentiles``) follow the floor, where the
    spine's posterior surface lies; the first search's (75th percentile) sit on the wall,
    5 mm above it."""
    depth = np.full((CAMERA.height, CAMERA.width), 300.0, np.float32)
    depth[200:280, 248:256] = 345.0  # floor
    ramp = np.linspace(345.0, 309.0, 60, dtype=np.float32)  # wall, floor to near the skin
    depth[200:280, 256:316] = ramp[None, :]
    plane = fit_support_plane(depth, CAMERA, np.random.default_rng(0))
    deepest = max(pipeline_module.PipelineConfig().weak_search_floor_percentiles)
    deep = find_exposure(depth, CAMERA, plane, dataclasses.replace(
        GlobalSearchConfig(), trough_floor_percentile=deepest))
    assert deep.found
    assert abs(deep.centre[2] - 345.0) < 1.0
    first = find_exposure(depth, CAMERA, plane)
    assert GlobalSearchConfig().trough_floor_percentile == 75.0
    assert first.centre[2] < 342.0  # the wall pulled it up


def test_flat_frame_has_no_exposure():
    depth = np.full((CAMERA.height, CAMERA.width), 300.0, np.float32)
    plane = fit_support_plane(depth, CAMERA, np.random.default_rng(0))
    exposure = find_exposure(depth, CAMERA, plane)
    assert not exposure.found
    anchors = candidate_anchors(exposure, plane, CAMERA, GlobalSearchConfig())
    assert len(anchors) > 0


def test_fallback_anchors_lie_on_the_support_plane():
    depth = np.full((CAMERA.height, CAMERA.width), 300.0, np.float32)
    plane = fit_support_plane(depth, CAMERA, np.random.default_rng(0))
    exposure = find_exposure(depth, CAMERA, plane)
    anchors = candidate_anchors(exposure, plane, CAMERA, GlobalSearchConfig())
    np.testing.assert_allclose(anchors[:, 2], 300.0, atol=1.0)
    np.testing.assert_allclose(exposure.centre, [0.0, 0.0, 300.0], atol=1.0)
    # a 30 mm grid over 3/4 of the image at 300 mm: far more than a handful of positions
    assert len(anchors) > 50


# ---------------------------------------------------------------------- rotations
@pytest.mark.parametrize("normal", [
    [0.0, 0.0, -1.0], [0.3, -0.2, -0.9], [0.0, -0.95, -0.3], [-0.7, 0.1, -0.7]])
def test_rotation_from_normal_roll_is_proper_with_z_along_normal(normal):
    normal = np.asarray(normal, float) / np.linalg.norm(normal)
    rolls = np.radians(np.arange(0.0, 360.0, 30.0))
    rots = [rotation_from_normal_roll(normal, r) for r in rolls]
    for rot in rots:
        np.testing.assert_allclose(rot.T @ rot, np.eye(3), atol=1e-9)
        assert np.linalg.det(rot) == pytest.approx(1.0, abs=1e-9)
        np.testing.assert_allclose(rot[:, 2], normal, atol=1e-12)
    # the roll turns about the normal by exactly that angle
    for roll, rot in zip(rolls, rots):
        rel = rot @ rots[0].T
        np.testing.assert_allclose(rel @ normal, normal, atol=1e-9)
        expected = np.degrees(roll) if roll <= np.pi else 360.0 - np.degrees(roll)
        assert rotation_angle_deg(rel) == pytest.approx(expected, abs=1e-4)
    half = rotation_from_normal_roll(normal, np.pi)
    np.testing.assert_allclose(half[:, :2], -rots[0][:, :2], atol=1e-9)


@pytest.mark.parametrize("normal", [[0.0, 0.0, -1.0], [0.3, -0.2, -0.9], [0.0, -0.95, -0.3]])
def test_tilted_plane_leans_the_normal_by_the_angle_around_the_plane(normal):
    normal = np.asarray(normal, float) / np.linalg.norm(normal)
    plane = SupportPlane(normal, float(normal @ np.array([5.0, -3.0, 400.0])), 0.8)
    assert tilted_plane(plane, 0.0, 90.0) is plane
    leaned = [tilted_plane(plane, 12.0, 60.0 * k) for k in range(6)]
    nearest = plane.normal * plane.offset  # the plane's point nearest the optical centre
    for lean in leaned:
        assert np.linalg.norm(lean.normal) == pytest.approx(1.0)
        assert _angle_between_deg(lean.normal, normal) == pytest.approx(12.0, abs=1e-6)
        assert lean.signed_height(nearest[None])[0] == pytest.approx(0.0, abs=1e-9)
        assert lean.inlier_fraction == plane.inlier_fraction
    # six directions evenly around the normal: their leans 60 deg apart in the plane
    flat = [lean.normal - (lean.normal @ normal) * normal for lean in leaned]
    for a, b in zip(flat, flat[1:] + flat[:1]):
        assert _angle_between_deg(a, b) == pytest.approx(60.0, abs=1e-6)


# ---------------------------------------------------------------------- rendered frames
@pytest.fixture(scope="module")
def scene():
    """Specimen, its renderer and the search's posterior model points (shared by the tests)."""
    specimen = generate_specimen(5, "global_init")
    renderer = SyntheticRenderer(specimen, np.random.default_rng(5))
    method = make_method("end2reg", threads=1)
    pipeline = RegistrationPipeline(method, specimen, )  # bundled calibration, default gate
    return specimen, renderer, pipeline


def _render(renderer, pose, seed, stamp_ns=10**18):
    rng = np.random.default_rng(seed)
    frame, _ = renderer.render(pose, renderer.frame_motion(rng), 0.0, rng, stamp_ns=stamp_ns)
    return frame


def _surgical_pose(renderer, seed):
    views = ViewSampler()
    return views.cam_from_spine(views.parameters(1, np.random.default_rng(seed))[0],
                                renderer.scene.surface_height_mm)


@pytest.fixture(scope="module")
def surgical_frame(scene):
    _, renderer, _ = scene
    return _render(renderer, _surgical_pose(renderer, 11), 11)


@pytest.fixture(scope="module")
def flipped_frame(scene):
    """A surgical view whose camera is rotated 180 deg about its optical axis (L1 towards
    the image bottom): outside the surgical-setup prior."""
    _, renderer, _ = scene
    return _render(renderer, OPTICAL_180 @ _surgical_pose(renderer, 12), 12)


def test_score_prefers_the_true_pose_over_its_180_deg_turns(scene, surgical_frame):
    """Same anchor (the posterior surface point where the true pose puts it), three
    rotations: the truth, turned 180 deg about the optical axis, turned 180 deg about the
    spine's posterior axis (cranial and caudal swapped)."""
    _, _, pipeline = scene
    truth = surgical_frame.cam_from_spine
    anchor = truth[:3, :3] @ pipeline.surface_point + truth[:3, 3]
    rotations = np.stack([truth[:3, :3], (OPTICAL_180 @ truth)[:3, :3],
                          (truth @ POSTERIOR_180)[:3, :3]])
    scores, offsets = score_hypotheses(surgical_frame.depth_mm, surgical_frame.camera, rotations,
                                       anchor[None], pipeline.search_surface,
                                       pipeline.surface_point)
    assert scores.shape == offsets.shape == (3, 1)
    assert scores[0, 0] > 1.3 * max(scores[1, 0], scores[2, 0])
    assert abs(offsets[0, 0]) <= 6.0  # the true depth needs (almost) no slide


def test_proposals_include_one_near_the_truth(scene, surgical_frame, flipped_frame):
    """Some hypothesis within the registration's basin (15 deg, 20 mm at the surface
    point), in a surgical view and in the same kind of view turned upside down."""
    _, _, pipeline = scene
    for frame in (surgical_frame, flipped_frame):
        hyps = propose_initial_poses(frame.depth_mm, frame.camera, pipeline.search_surface,
                                     pipeline.surface_point)
        assert 1 <= len(hyps) <= 6
        truth = frame.cam_from_spine
        at_surface = truth[:3, :3] @ pipeline.surface_point + truth[:3, 3]
        close = [
            h for h in hyps
            if rotation_angle_deg(h.cam_from_spine[:3, :3] @ truth[:3, :3].T) < 15.0
            and np.linalg.norm(h.cam_from_spine[:3, :3] @ pipeline.surface_point
                               + h.cam_from_spine[:3, 3] - at_surface) < 20.0
        ]
        assert close, [(h.roll_deg, h.score) for h in hyps]
        for h in hyps:  # proper rigid poses
            rot = h.cam_from_spine[:3, :3]
            np.testing.assert_allclose(rot.T @ rot, np.eye(3), atol=1e-9)
            assert np.linalg.det(rot) == pytest.approx(1.0)


@pytest.fixture
def leaning_plane(monkeypatch):
    """The support plane as fitted, then leaning 25 deg (towards 90 deg in its own basis):
    what occluders and the wound's walls do to the fit in some wide views."""
    import end2reg_ros.registration.global_init as global_init

    fit = global_init.fit_support_plane
    monkeypatch.setattr(global_init, "fit_support_plane",
                        lambda *args, **kwargs: tilted_plane(fit(*args, **kwargs), 25.0, 90.0))


def test_a_search_on_a_tilted_plane_undoes_a_leaning_fit(scene, surgical_frame, leaning_plane):
    """On a plane leaning 25 deg no proposal lies within 30 mm of the truth (the pool's ICP
    does not correct that much); the search that tilts it back (25 deg towards 270 deg,
    ``normal_tilt_deg``) ranks one within 2 mm first."""
    _, _, pipeline = scene
    truth = surgical_frame.cam_from_spine

    def distances(config):
        hyps = propose_initial_poses(surgical_frame.depth_mm, surgical_frame.camera,
                                     pipeline.search_surface, pipeline.surface_point, config)
        return [pipeline._target_distance(h.cam_from_spine, truth) for h in hyps]

    assert min(distances(GlobalSearchConfig())) > 30.0
    tilted = distances(GlobalSearchConfig(normal_tilt_deg=25.0, normal_tilt_direction_deg=270.0))
    assert tilted[0] < 2.0


@pytest.mark.parametrize(("directions", "max_violate"), [(0, 0.01), (4, 0.01), (4, -1.0)])
def test_a_weak_registration_searches_tilted_planes(scene, surgical_frame, leaning_plane,
                                                    directions, max_violate):
    """Through the pipeline, with the plane leaning 25 deg and no other search for weak
    registrations: the searches on the plane tilted by ``weak_tilt_deg`` (four directions,
    0, 90, 180 and 270 deg) find the truth; without them the result is far off (the
    rivals one level away do not reach it either). The method keeps the poses it is given
    (the network corrects a 25 deg lean on this clean surgical view by itself). A tilted
    search's result competes only with few free-space violations (``max_violate`` -1:
    none does), and does not count towards the support."""
    specimen, _, pipeline = scene
    from test_pipeline import _DriftingMethod  # shift 0: keeps the poses it is given

    pipe = RegistrationPipeline(_DriftingMethod(pipeline.method, 0.0), specimen, config=PipelineConfig(
        tracking=False, weak_extra_hypotheses=0, weak_search_pool=0, weak_climb_steps=(),
        weak_tilt_deg=25.0, weak_tilt_directions=directions, weak_tilt_max_violate=max_violate))
    result = pipe.process(surgical_frame)
    tre = frame_metrics(result.estimate.cam_from_spine, surgical_frame, specimen).tre_median_mm
    if directions and max_violate >= 0.0:
        assert tre < 2.0
        assert result.features["support"] == 0.0  # no untilted hypothesis came near it
    else:
        assert tre > 20.0


def test_pipeline_picks_the_true_pose_among_it_and_its_180_deg_turn(
        scene, surgical_frame, monkeypatch):
    """Global mode given exactly two hypotheses, the 180-deg-about-the-optical-axis turn of
    the truth first: the depth check of the refined poses picks the true one."""
    specimen, _, pipeline = scene
    truth = surgical_frame.cam_from_spine
    anchor = truth[:3, :3] @ pipeline.surface_point + truth[:3, 3]
    turned = OPTICAL_180 @ truth
    turned[:3, 3] = anchor - turned[:3, :3] @ pipeline.surface_point  # about the spine point
    hyps = [Hypothesis(turned, 1.0, 180.0, anchor), Hypothesis(truth.copy(), 1.0, 0.0, anchor)]
    monkeypatch.setattr(pipeline_module, "propose_initial_poses", lambda *a, **k: hyps)
    pipeline.reset()
    result = pipeline.process(surgical_frame)
    assert result.mode == "global" and result.hypotheses == 2
    assert result.estimate is not None
    assert frame_metrics(result.estimate.cam_from_spine, surgical_frame,
                         specimen).tre_median_mm < 2.0
    assert result.features["margin"] > 0.0
    assert result.features["support"] == pytest.approx(0.5)


def test_pipeline_registers_a_view_rotated_180_deg_about_the_optical_axis(scene, flipped_frame):
    specimen, _, pipeline = scene
    pipeline.reset()
    result = pipeline.process(flipped_frame)
    assert result.mode == "global"
    assert result.hypotheses >= 2
    assert result.estimate is not None
    tre = frame_metrics(result.estimate.cam_from_spine, flipped_frame, specimen).tre_median_mm
    assert tre < 2.0, (tre, result.reason)
    assert result.valid, result.reason
    for stage in ("search", "registration", "verify"):
        assert result.stage_ms[stage] > 0.0


def test_gate_refuses_a_frame_without_depth(scene, surgical_frame):
    _, _, pipeline = scene
    pipeline.reset()
    blank = dataclasses.replace(surgical_frame, depth_mm=np.zeros_like(surgical_frame.depth_mm))
    result = pipeline.process(blank)  # must not raise
    assert not result.valid
    assert result.estimate is None
    assert result.mode == "global"
    assert "depth" in result.reason
    assert pipeline.mode == "global"


def _pose_error(pose, truth, surface_point):
    """(deg, mm at the posterior surface point) between two ``cam_from_spine`` poses."""
    at = lambda p: p[:3, :3] @ surface_point + p[:3, 3]  # noqa: E731
    return (rotation_angle_deg(pose[:3, :3] @ truth[:3, :3].T),
            float(np.linalg.norm(at(pose) - at(truth))))


def test_refinement_pulls_perturbed_poses_onto_the_truth_and_ranks_them_first(
        scene, surgical_frame):
    """Projective ICP from poses 5-7 deg and 8-10 mm off the truth (about the surface
    point; the coarse grid's spacing is 10 deg / 15 mm) ends within 2 deg / 2 mm; after it, the fine score ranks those above a pose one
    vertebra (35 mm) cranial and the 180-deg turn, whatever their order before."""
    _, _, pipeline = scene
    truth = surgical_frame.cam_from_spine
    surf = pipeline.search_surface
    rng = np.random.default_rng(3)
    starts = []
    for angle, shift in ((6.0, 8.0), (5.0, 10.0), (7.0, 10.0)):
        axis = rng.normal(size=3)
        direction = rng.normal(size=3)
        turn = make_pose(axis_angle_to_matrix(axis / np.linalg.norm(axis), np.radians(angle)),
                         np.zeros(3))
        anchor = truth[:3, :3] @ pipeline.surface_point + truth[:3, 3]
        moved = make_pose(np.eye(3), anchor + direction / np.linalg.norm(direction) * shift)
        starts.append(moved @ turn @ make_pose(np.eye(3), -anchor) @ truth)
    level_off = truth @ make_pose(np.eye(3), np.array([0.0, -35.0, 0.0]))
    turned = OPTICAL_180 @ truth
    poses = np.stack([level_off, turned, *starts])
    before = [_pose_error(p, truth, pipeline.surface_point) for p in starts]
    assert min(mm for _, mm in before) > 7.0
    refined = refine_hypotheses(surgical_frame.depth_mm, surgical_frame.camera, poses,
                                surf.points[::6], surf.normals[::6])
    for pose in refined[2:]:
        deg, mm = _pose_error(pose, truth, pipeline.surface_point)
        assert deg < 2.0 and mm < 2.0, (deg, mm)
        np.testing.assert_allclose(pose[:3, :3].T @ pose[:3, :3], np.eye(3), atol=1e-9)
    scores = fine_scores(surgical_frame.depth_mm, surgical_frame.camera, refined,
                         surf.points[::6], surf.normals[::6])
    assert min(scores[2:]) > 1.2 * max(scores[:2])


def test_refinement_moves_a_pose_that_few_model_points_pair_with(scene, surgical_frame):
    """Wide views often show little bone: only some tens of the model points facing the
    camera find a scene point within the ICP's distance. With ``icp_min_pairs`` 15, a pose
    that about 20 of them pair with is refined onto the truth; with the default 30 the same
    start stays where it was (the threshold is what moves it, nothing else)."""
    _, _, pipeline = scene
    truth = surgical_frame.cam_from_spine
    surf = pipeline.search_surface
    points, normals = surf.points[::20], surf.normals[::20]  # 67 points, about 20 pair
    anchor = truth[:3, :3] @ pipeline.surface_point + truth[:3, 3]
    turn = make_pose(axis_angle_to_matrix(np.array([0.6, 0.8, 0.0]), np.radians(4.0)),
                     np.zeros(3))
    start = (make_pose(np.eye(3), anchor + np.array([5.0, -3.0, 2.0])) @ turn
             @ make_pose(np.eye(3), -anchor) @ truth)
    deg0, mm0 = _pose_error(start, truth, pipeline.surface_point)
    assert mm0 > 5.0 and deg0 > 3.0
    default = GlobalSearchConfig()
    assert default.icp_min_pairs == 30
    moved = refine_hypotheses(surgical_frame.depth_mm, surgical_frame.camera, start[None],
                              points, normals, dataclasses.replace(default, icp_min_pairs=15))[0]
    deg, mm = _pose_error(moved, truth, pipeline.surface_point)
    assert deg < 2.0 and mm < 2.0, (deg, mm)
    stuck = refine_hypotheses(surgical_frame.depth_mm, surgical_frame.camera, start[None],
                              points, normals, default)[0]
    np.testing.assert_allclose(stuck, start)


def test_climb_brings_poses_in_on_the_fine_score(scene, surgical_frame):
    """The local search of the fine score (:func:`climb_hypotheses`, the pipeline's stages,
    on about as many model points as the search scores) brings poses 6-11 mm / 0-4 deg off
    the truth within 2 deg / 2 mm, never lowers a pose's score, and leaves a pose turned by
    180 deg far from the truth (it is local). Only the ``climb_keep`` best poses go on after
    the first two stages, and the index maps each back to its input."""
    _, _, pipeline = scene
    truth = surgical_frame.cam_from_spine
    surf = pipeline.search_surface
    points, normals = surf.points[::3], surf.normals[::3]
    assert 400 <= len(points) <= 600
    anchor = truth[:3, :3] @ pipeline.surface_point + truth[:3, 3]
    turn = make_pose(axis_angle_to_matrix(np.array([0.6, 0.8, 0.0]), np.radians(4.0)),
                     np.zeros(3))
    start = (make_pose(np.eye(3), anchor + np.array([5.0, -3.0, 2.0])) @ turn
             @ make_pose(np.eye(3), -anchor) @ truth)
    far = make_pose(np.eye(3), anchor + np.array([9.0, 6.0, 0.0])) @ make_pose(
        np.eye(3), -anchor) @ truth
    turned = OPTICAL_180 @ truth
    starts = np.stack([turned, start, far])
    for pose in starts[1:]:
        assert _pose_error(pose, truth, pipeline.surface_point)[1] > 6.0
    config = dataclasses.replace(GlobalSearchConfig(),
                                 climb_steps=PipelineConfig().weak_climb_steps, climb_keep=2)
    depth, camera = surgical_frame.depth_mm, surgical_frame.camera
    before = fine_scores(depth, camera, starts, points, normals, config)
    poses, scores, index = climb_hypotheses(depth, camera, starts, points, normals,
                                            pipeline.surface_point, config)
    assert sorted(index.tolist()) == [1, 2]  # the turned pose scored worst: dropped
    np.testing.assert_allclose(scores, fine_scores(depth, camera, poses, points, normals,
                                                   config))
    assert np.all(scores >= before[index])
    for pose in poses:
        deg, mm = _pose_error(pose, truth, pipeline.surface_point)
        assert deg < 2.0 and mm < 2.0, (deg, mm)
        np.testing.assert_allclose(pose[:3, :3].T @ pose[:3, :3], np.eye(3), atol=1e-9)
    config_all = dataclasses.replace(config, climb_keep=16)
    poses, _, index = climb_hypotheses(depth, camera, starts, points, normals,
                                       pipeline.surface_point, config_all)
    assert index.tolist() == [0, 1, 2]
    deg, mm = _pose_error(poses[0], truth, pipeline.surface_point)
    assert deg > 90.0, (deg, mm)


def test_searches_of_one_frame_share_their_refined_pool(scene, surgical_frame, monkeypatch):
    """With a ``pool_cache``, a search whose configuration differs from one already run only
    in ``refined_top_k`` / ``climb_steps`` takes that refined pool instead of refining it
    again, and proposes exactly what it would have without the cache; another pool size is
    refined anew."""
    import end2reg_ros.registration.global_init as global_init

    _, _, pipeline = scene
    calls = []
    refine = global_init.refine_hypotheses

    def counted(*args, **kwargs):
        calls.append(len(args[2]))
        return refine(*args, **kwargs)

    monkeypatch.setattr(global_init, "refine_hypotheses", counted)
    args = (surgical_frame.depth_mm, surgical_frame.camera, pipeline.search_surface,
            pipeline.surface_point)
    base = GlobalSearchConfig()
    climbing = dataclasses.replace(base, refined_top_k=5,
                                   climb_steps=PipelineConfig().weak_climb_steps)
    alone = [propose_initial_poses(*args, config) for config in (base, climbing)]
    assert len(calls) == 2
    cache: dict = {}
    shared = [propose_initial_poses(*args, config, pool_cache=cache)
              for config in (base, climbing)]
    assert len(calls) == 3 and len(cache) == 1
    for a, b in zip(alone, shared):
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x.cam_from_spine, y.cam_from_spine)
            assert x.score == y.score and x.roll_deg == y.roll_deg
    propose_initial_poses(*args, dataclasses.replace(base, pool_size=80), pool_cache=cache)
    assert len(calls) == 4 and len(cache) == 2


def test_the_search_finds_the_same_poses_on_any_number_of_threads(scene, surgical_frame):
    """Rotations scored, candidate poses refined and fine-scored side by side
    (``GlobalSearchConfig.workers``): exactly the proposals of one thread, with and without
    the climbing search."""
    _, _, pipeline = scene
    args = (surgical_frame.depth_mm, surgical_frame.camera, pipeline.search_surface,
            pipeline.surface_point)
    for base in (GlobalSearchConfig(), dataclasses.replace(
            GlobalSearchConfig(), refined_top_k=5, climb_steps=PipelineConfig().weak_climb_steps)):
        runs = [propose_initial_poses(*args, dataclasses.replace(base, workers=workers))
                for workers in (1, 2, 3)]
        assert len(runs[0]) > 0
        for other in runs[1:]:
            assert len(other) == len(runs[0])
            for x, y in zip(runs[0], other):
                np.testing.assert_array_equal(x.cam_from_spine, y.cam_from_spine)
                assert x.score == y.score and x.roll_deg == y.roll_deg


def test_the_pipeline_registers_the_same_on_one_and_two_threads(scene, flipped_frame,
                                                                 monkeypatch):
    """The method runs from the hypotheses (and the level rivals, the polish) side by side
    on ``global_search.workers`` threads: the pose, confidence and features of one thread
    (open3d's ICP sums over its own threads, so runs agree to ~1e-13 mm, not bit for bit)."""
    import threading

    specimen, _, pipeline = scene
    threads = {1: set(), 2: set()}
    results = {}
    rival_calls = []
    for workers in (1, 2):
        register = pipeline.method.register

        def recorded(*args, _seen=threads[workers], _register=register, **kwargs):
            _seen.add(threading.get_ident())
            return _register(*args, **kwargs)

        monkeypatch.setattr(pipeline.method, "register", recorded)
        pipe = RegistrationPipeline(pipeline.method, specimen, config=PipelineConfig(
            tracking=False,
            global_search=dataclasses.replace(GlobalSearchConfig(), workers=workers)))
        monkeypatch.setattr(pipe, "_rivals",
                            lambda *a, _workers=workers, _rivals=pipe._rivals, **k:
                            rival_calls.append(_workers) or _rivals(*a, **k))
        # the third run of the first pass starts 1 s late, so that the guess in the idle
        # slot sees the first two finished whatever the machine's load (which runs have
        # finished when the guess starts decides whether it can hold, not the results)
        third: list = []

        def recorded_first_pass(frame, starts, stages, _first_pass=pipe._first_pass,
                                _third=third):
            _third[:] = starts[2:3]
            return _first_pass(frame, starts, stages)

        def late_third(frame, start, stages, _refine=pipe._refine_hypothesis, _third=third):
            if _third and np.array_equal(start, _third[0]):
                time.sleep(1.0)
            return _refine(frame, start, stages)

        monkeypatch.setattr(pipe, "_first_pass", recorded_first_pass)
        monkeypatch.setattr(pipe, "_refine_hypothesis", late_third)
        results[workers] = pipe.process(flipped_frame)
        monkeypatch.undo()
    assert len(threads[1]) == 1 and len(threads[2]) == 2
    # one thread: the rivals after the first pass; two: guessed in the first pass's idle
    # slot (3 runs on 2 threads) from the two runs finished, and the guess held
    assert rival_calls == [1]
    one, two = results[1], results[2]
    assert one.valid == two.valid and one.hypotheses == two.hypotheses
    np.testing.assert_allclose(two.estimate.cam_from_spine, one.estimate.cam_from_spine,
                               atol=1e-6)
    assert two.confidence == pytest.approx(one.confidence, abs=1e-9)
    assert set(one.features) == set(two.features)
    for key, value in one.features.items():
        assert two.features[key] == pytest.approx(value, abs=1e-6), key


def test_a_guess_of_the_first_pass_that_did_not_come_true_is_not_used(scene, flipped_frame,
                                                                      monkeypatch):
    """The first pass's idle slot runs the next steps for the best run finished so far;
    when the pose (or score) chosen in the end is another, those results are thrown away
    and the steps run again: a guess with a pose 1 mm off, or another score, whose results
    are nonsense, changes nothing."""
    specimen, _, pipeline = scene
    config = PipelineConfig(tracking=False,
                            global_search=dataclasses.replace(GlobalSearchConfig(), workers=2))
    reference = RegistrationPipeline(pipeline.method, specimen, config=config)
    expected = reference.process(flipped_frame)
    for spoil in ("pose", "score"):
        pipe = RegistrationPipeline(pipeline.method, specimen, config=config)
        first_pass = pipe._first_pass

        def spoiled(*args, _first_pass=first_pass, _spoil=spoil):
            refined, guess = _first_pass(*args)
            # 3 runs on 2 threads: a guess was made unless the best run finished when it
            # started was weak (which runs finish first depends on the machine's load)
            best = max(refined, key=lambda r: r[0])
            pose = (guess["pose"] if guess else best[1].cam_from_spine).copy()
            score = guess["score"] if guess else best[0]
            if _spoil == "pose":
                pose[:3, 3] += 1.0
            nonsense = pose.copy()
            nonsense[:3, 3] += 50.0  # a final ICP result 50 mm away, a rival far ahead
            return refined, {"pose": pose,
                             "score": score + (0.05 if _spoil == "score" else 0.0),
                             "polish": (None, (pose, nonsense)),
                             "rivals": {"cranial": (9.0, None, None)}}

        monkeypatch.setattr(pipe, "_first_pass", spoiled)
        got = pipe.process(flipped_frame)
        monkeypatch.undo()
        np.testing.assert_allclose(got.estimate.cam_from_spine,
                                   expected.estimate.cam_from_spine, atol=1e-6)
        assert got.confidence == pytest.approx(expected.confidence, abs=1e-9)
        assert got.features["level_margin"] == pytest.approx(
            expected.features["level_margin"], abs=1e-6)
