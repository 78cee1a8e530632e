"""Depth consistency of a posed model with a depth image: agreement at the true pose,
free-space violations for a model placed in front of the observed surface, no evidence
(occluded) for one placed behind it, and the NaN cases of the residuals."""

from __future__ import annotations

import numpy as np
import open3d as o3d
import pytest

from end2reg_ros.camera import CameraIntrinsics
from end2reg_ros.geometry import make_pose
from end2reg_ros.model.preprocess import sample_mesh_surface
from end2reg_ros.registration.depth_check import (
    SurfaceSamples,
    depth_agreement,
    depth_residuals,
    fit_sd_mm,
    surface_samples,
    target_sd_mm,
)
from end2reg_ros.synth.anatomy import box_mesh, generate_specimen
from end2reg_ros.synth.generate import render_frames

CAMERA = CameraIntrinsics.d405_640x480()


def _shifted(pose: np.ndarray, dz_mm: float) -> np.ndarray:
    """``pose`` moved by ``dz_mm`` along the optical axis (negative: towards the camera)."""
    out = np.array(pose, dtype=float)
    out[2, 3] += dz_mm
    return out


def _raycast_depth(meshes, cam_from_model: np.ndarray, camera: CameraIntrinsics) -> np.ndarray:
    """Depth image (mm, 0 = no hit) of triangle meshes posed in the optical frame."""
    scene = o3d.t.geometry.RaycastingScene()
    rot, trans = cam_from_model[:3, :3], cam_from_model[:3, 3]
    for verts, faces in meshes:
        posed = (np.asarray(verts) @ rot.T + trans).astype(np.float32)
        scene.add_triangles(o3d.core.Tensor(posed), o3d.core.Tensor(faces.astype(np.uint32)))
    u, v = np.meshgrid(np.arange(camera.width), np.arange(camera.height))
    dirs = np.stack([(u - camera.cx) / camera.fx, (v - camera.cy) / camera.fy, np.ones(u.shape)],
                    -1).reshape(-1, 3)
    rays = np.concatenate([np.zeros_like(dirs), dirs], 1).astype(np.float32)
    t = scene.cast_rays(o3d.core.Tensor(rays))["t_hit"].numpy().reshape(camera.height, camera.width)
    return np.where(np.isfinite(t), t, 0.0).astype(np.float32)  # direction z = 1: t is depth


@pytest.fixture(scope="module")
def box_scene():
    """Two outward-wound boxes (two 'levels'), their surface samples, a pose and the depth
    image of exactly that model: the ideal case of the check."""
    boxes = [box_mesh(np.array([0.0, -15.0, 0.0]), np.array([20.0, 12.0, 10.0])),
             box_mesh(np.array([0.0, 15.0, 0.0]), np.array([20.0, 12.0, 10.0]))]
    rng = np.random.default_rng(0)
    pts, nrm, idx = [], [], []
    for i, (v, f) in enumerate(boxes):
        p, n = sample_mesh_surface(v, f, 1500, rng)
        pts.append(p)
        nrm.append(n)
        idx.append(np.full(len(p), i, np.int32))
    surface = SurfaceSamples(np.concatenate(pts), np.concatenate(nrm), np.concatenate(idx),
                             ("A", "B"))
    tilt = o3d.geometry.get_rotation_matrix_from_xyz([0.35, -0.25, 0.1])
    pose = make_pose(tilt, [10.0, -5.0, 300.0])
    return surface, pose, _raycast_depth(boxes, pose, CAMERA)


def test_model_rendered_by_itself_agrees_at_its_pose(box_scene):
    surface, pose, depth = box_scene
    check = depth_agreement(depth, CAMERA, pose, surface)
    assert check.checked > 500
    assert check.agree > 0.95
    assert check.violate == 0.0
    assert check.median_abs_agree_mm < 0.5
    assert set(check.vertebra_agree) == {"A", "B"}
    assert check.min_vertebra_agree == pytest.approx(min(check.vertebra_agree.values()))
    assert check.min_vertebra_agree > 0.9


def test_model_in_front_of_the_surface_violates_free_space(box_scene):
    """Model 20 mm nearer the camera than the surface it is compared with: the camera sees
    the surface 20 mm *behind* where the pose puts solid bone (r = z_obs - z_pred = +20)."""
    surface, pose, depth = box_scene
    check = depth_agreement(depth, CAMERA, _shifted(pose, -20.0), surface)
    assert check.violate > 0.9
    assert check.agree < 0.05


def test_model_behind_the_surface_is_occluded_not_violating(box_scene):
    """Model 20 mm farther away: something nearer hides it, which is no evidence against."""
    surface, pose, depth = box_scene
    check = depth_agreement(depth, CAMERA, _shifted(pose, 20.0), surface)
    assert check.occluded > 0.9
    assert check.violate == 0.0
    assert check.agree < 0.05


def test_empty_depth_gives_no_checked_points(box_scene):
    surface, pose, depth = box_scene
    check = depth_agreement(np.zeros_like(depth), CAMERA, pose, surface)
    assert check.checked == 0
    assert (check.agree, check.violate, check.occluded) == (0.0, 0.0, 0.0)
    assert np.isnan(check.min_vertebra_agree)
    assert all(np.isnan(v) for v in check.vertebra_agree.values())


def test_level_with_too_few_points_is_nan(box_scene):
    surface, pose, depth = box_scene
    check = depth_agreement(depth, CAMERA, pose, surface, min_vertebra_points=10**6)
    assert all(np.isnan(v) for v in check.vertebra_agree.values())
    assert np.isnan(check.min_vertebra_agree)
    assert check.agree > 0.95  # the overall fraction does not depend on it


@pytest.fixture(scope="module")
def specimen_frame():
    specimen = generate_specimen(3, "depth_check")
    frame = next(render_frames(specimen, 1, np.random.default_rng(3), occlusion=(0.0, 0.0)))
    return specimen, surface_samples(specimen, count=6000, seed=0), frame


def test_rendered_surgical_frame_true_pose_versus_shifted(specimen_frame):
    """On a full synthetic frame (tissue, drapes, retractors, sensor noise): almost no
    free-space violation at the true pose, many once the spine is moved 20 mm towards the
    camera, none (all occluded) once it is moved 20 mm away."""
    _, surface, frame = specimen_frame
    true = depth_agreement(frame.depth_mm, frame.camera, frame.cam_from_spine, surface)
    near = depth_agreement(frame.depth_mm, frame.camera, _shifted(frame.cam_from_spine, -20.0),
                           surface)
    far = depth_agreement(frame.depth_mm, frame.camera, _shifted(frame.cam_from_spine, 20.0),
                          surface)
    assert true.checked > 1000
    assert true.violate < 0.02
    assert near.violate > 0.3
    assert near.violate > 20 * true.violate
    assert far.violate < 0.01 and far.occluded > 0.9
    assert true.agree > 5 * far.agree
    assert true.median_abs_agree_mm < 1.5


def test_surface_samples_deterministic_and_cover_every_level(specimen_frame):
    specimen, surface, _ = specimen_frame
    again = surface_samples(specimen, count=6000, seed=0)
    np.testing.assert_array_equal(surface.points, again.points)
    np.testing.assert_array_equal(surface.normals, again.normals)
    assert surface.levels == tuple(v.level for v in specimen.vertebrae)
    assert set(np.unique(surface.vertebra)) == set(range(len(specimen.vertebrae)))
    assert abs(len(surface.points) - 6000) < 50
    np.testing.assert_allclose(np.linalg.norm(surface.normals, axis=1), 1.0, atol=1e-4)
    other = surface_samples(specimen, count=6000, seed=1)
    assert not np.array_equal(surface.points, other.points)


def test_visible_points_of_the_synthetic_model_face_the_camera(specimen_frame):
    """depth_agreement assumes outward normals (CT import guarantees them): the model
    points on the depth surface of a model-only rendering should mostly face the camera."""
    specimen, surface, frame = specimen_frame
    pose = frame.cam_from_spine
    depth = _raycast_depth([(v.vertices, v.faces) for v in specimen.vertebrae], pose, CAMERA)
    pts = surface.points @ pose[:3, :3].T + pose[:3, 3]
    nrm = surface.normals @ pose[:3, :3].T
    on_surface = np.abs(depth_residuals(depth, CAMERA, pts)) < 0.5
    facing = np.einsum("ij,ij->i", nrm, -pts) > 0.0
    assert on_surface.sum() > 300
    assert facing[on_surface].mean() > 0.8


def test_depth_residuals_nan_cases():
    depth = np.full((CAMERA.height, CAMERA.width), 300.0, np.float32)
    depth[:, :100] = 0.0  # no data on the left
    depth[:10, :] = np.nan  # invalid on the top rows
    f, cx, cy = CAMERA.fx, CAMERA.cx, CAMERA.cy

    def at(u, v, z):  # optical-frame point projecting to pixel (u, v) at depth z
        return [(u - cx) / f * z, (v - cy) / f * z, z]

    points = np.array([
        at(320, 240, 290.0),  # valid: observed 300, predicted 290 -> +10
        at(320, 240, 310.0),  # valid: -10
        [0.0, 0.0, -200.0],  # behind the camera
        [0.0, 0.0, 0.5],  # (almost) in the optical centre
        [0.0, 0.0, 0.0],  # exactly in it: no division warning, NaN
        at(700, 240, 300.0),  # right of the image
        at(-5, 240, 300.0),  # left of the image
        at(320, 500, 300.0),  # below the image
        at(50, 240, 300.0),  # on a zero-depth pixel
        at(320, 5, 300.0),  # on a NaN-depth pixel
    ])
    with np.errstate(all="raise"):
        res = depth_residuals(depth, CAMERA, points)
    assert res.shape == (len(points),)
    np.testing.assert_allclose(res[:2], [10.0, -10.0], atol=1e-3)
    assert np.all(np.isnan(res[2:]))


def test_depth_residuals_batched_shape():
    depth = np.full((CAMERA.height, CAMERA.width), 400, np.uint16)  # 16UC1 works as well
    pts = np.zeros((3, 5, 3))
    pts[..., 2] = np.arange(1, 6) * 50.0
    res = depth_residuals(depth, CAMERA, pts)
    assert res.shape == (3, 5)
    np.testing.assert_allclose(res[0], 400.0 - np.arange(1, 6) * 50.0)


def _plane_points(rng, centre, normal, n=200, half=10.0):
    """``n`` points on a square patch (half size ``half`` mm) of the plane through ``centre``
    with unit ``normal``, and their normals."""
    normal = np.asarray(normal, float) / np.linalg.norm(normal)
    a = np.cross(normal, [1.0, 0.0, 0.0] if abs(normal[0]) < 0.9 else [0.0, 1.0, 0.0])
    a /= np.linalg.norm(a)
    b = np.cross(normal, a)
    uv = rng.uniform(-half, half, (n, 2))
    return np.asarray(centre, float) + uv[:, :1] * a + uv[:, 1:] * b, np.tile(normal, (n, 1))


def test_target_sd_grows_with_the_lever_arm_and_is_infinite_for_a_flat_patch():
    rng = np.random.default_rng(0)
    # three perpendicular patches around the origin: every motion is constrained
    parts = [_plane_points(rng, c, c) for c in ([20.0, 0, 0], [0, 20.0, 0], [0, 0, 20.0])]
    points = np.concatenate([p for p, _ in parts])
    normals = np.concatenate([n for _, n in parts])
    near = np.array([[0.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    far = near + np.array([150.0, 0.0, 0.0])  # the same targets 150 mm away (other vertebrae)
    sd_near = target_sd_mm(points, normals, near)
    sd_far = target_sd_mm(points, normals, far)
    assert 0.0 < sd_near < 0.5
    assert sd_far > 3.0 * sd_near  # rotation uncertainty times the lever arm
    # twice the noise: twice the standard deviation
    assert target_sd_mm(points, normals, near, noise_mm=2.0) == pytest.approx(2.0 * sd_near)
    # four times the points: half the standard deviation (independent noise)
    more = [_plane_points(rng, c, c, n=800) for c in ([20.0, 0, 0], [0, 20.0, 0], [0, 0, 20.0])]
    sd_more = target_sd_mm(np.concatenate([p for p, _ in more]),
                           np.concatenate([n for _, n in more]), near)
    assert sd_more == pytest.approx(0.5 * sd_near, rel=0.15)
    # one flat patch: sliding within it is unconstrained
    flat, flat_n = _plane_points(rng, [0.0, 0.0, 300.0], [0.0, 0.0, -1.0])
    assert target_sd_mm(flat, flat_n, near) == float("inf")
    assert target_sd_mm(points[:5], normals[:5], near) == float("inf")


def test_target_sd_of_a_rendered_frame_is_small_at_the_true_pose(specimen_frame):
    specimen, surface, frame = specimen_frame
    pose = frame.cam_from_spine
    targets, _ = specimen.target_points()
    check = depth_agreement(frame.depth_mm, frame.camera, pose, surface, targets=targets)
    assert 0.0 < check.target_sd_mm < 0.5
    assert np.isnan(depth_agreement(frame.depth_mm, frame.camera, pose, surface).target_sd_mm)


def test_flat_pixel_lookup_is_the_nearest_pixel():
    """The flat index of :func:`pixel_lookup` addresses the nearest pixel (row, column) of
    each point, computed point by point here, with ``inside`` False behind the camera,
    outside the image and for NaN points, at full and subsampled resolution; a depth image
    of another size is refused."""
    from end2reg_ros.registration.depth_check import pixel_lookup

    rng = np.random.default_rng(2)
    points = np.stack([rng.uniform(-400, 400, (5, 300)), rng.uniform(-300, 300, (5, 300)),
                       rng.uniform(-50, 600, (5, 300))], axis=-1)
    points[0, :10, 2] = 0.0  # on the optical centre's plane
    points[1, :10] = np.nan
    for stride in (1, 2, 4):
        flat, inside = pixel_lookup(CAMERA, points, stride)
        width = -(-CAMERA.width // stride)
        height = -(-CAMERA.height // stride)
        for index in np.ndindex(points.shape[:2]):
            x, y, z = points[index]
            expected_inside = False
            if np.isfinite(z) and z > 1.0:
                col = round((CAMERA.fx * x / z + CAMERA.cx) / stride)
                row = round((CAMERA.fy * y / z + CAMERA.cy) / stride)
                expected_inside = 0 <= col < width and 0 <= row < height
            assert inside[index] == expected_inside, index
            assert flat[index] == (row * width + col if expected_inside else 0), index
        assert inside.any() and not inside.all()
    with pytest.raises(ValueError, match="camera says"):
        depth_residuals(np.zeros((240, 320), np.float32), CAMERA, points)


def _three_patches(rng, n=400):
    parts = [_plane_points(rng, c, c, n=n) for c in ([20.0, 0, 0], [0, 20.0, 0], [0, 0, 20.0])]
    return np.concatenate([p for p, _ in parts]), np.concatenate([n for _, n in parts])


def test_fit_sd_matches_the_independent_noise_model_for_independent_residuals():
    rng = np.random.default_rng(1)
    points, normals = _three_patches(rng)
    targets = np.array([[0.0, 0.0, 0.0], [150.0, 0.0, 0.0]])
    residuals = rng.normal(0.0, 0.5, len(points))
    # each point its own block: the classic estimate with the residuals' own spread
    alone = fit_sd_mm(points, normals, residuals, targets, block_mm=1e-3)
    assert alone == pytest.approx(target_sd_mm(points, normals, targets, noise_mm=0.5), rel=0.15)
    # blocks of independent residuals change little
    assert fit_sd_mm(points, normals, residuals, targets, block_mm=5.0) == pytest.approx(
        alone, rel=0.35)
    # larger residuals, a larger uncertainty
    assert fit_sd_mm(points, normals, 3.0 * residuals, targets, block_mm=1e-3) == \
        pytest.approx(3.0 * alone)


def test_fit_sd_grows_when_neighbouring_residuals_pull_together():
    """A 1 mm layer over one corner of a patch (a tissue remnant over part of the seen bone)
    tilts the fit as a whole: the independent-noise estimate barely sees it, the blocks do."""
    rng = np.random.default_rng(2)
    points, normals = _three_patches(rng)
    targets = np.array([[0.0, 0.0, 0.0], [150.0, 0.0, 0.0]])
    noise = rng.normal(0.0, 0.3, len(points))
    layer = noise + np.where((points[:, 2] > 19.0) & (points[:, 0] > 3.0)
                             & (points[:, 1] > 3.0), 1.0, 0.0)
    clean = fit_sd_mm(points, normals, noise, targets, block_mm=10.0)
    biased = fit_sd_mm(points, normals, layer, targets, block_mm=10.0)
    pointwise = fit_sd_mm(points, normals, layer, targets, block_mm=1e-3)
    assert biased > 2.0 * clean
    assert biased > 2.0 * pointwise


def test_fit_sd_is_infinite_when_the_points_cannot_pin_the_pose():
    rng = np.random.default_rng(3)
    targets = np.zeros((1, 3))
    flat, flat_n = _plane_points(rng, [0.0, 0.0, 300.0], [0.0, 0.0, -1.0])
    assert fit_sd_mm(flat, flat_n, rng.normal(0, 0.3, len(flat)), targets) == float("inf")
    points, normals = _three_patches(rng, n=5)  # 15 points: below min_points
    assert fit_sd_mm(points, normals, np.zeros(len(points)), targets) == float("inf")
    assert np.isfinite(fit_sd_mm(points, normals, np.zeros(len(points)), targets,
                                 min_points=10))
