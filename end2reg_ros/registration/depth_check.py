"""Depth consistency of a posed preoperative model with one depth image (ROS-free, numpy).

The check the node's gate and the global search share: place the model's surface points
(spine frame, mm, with outward normals) in the optical frame under a pose, keep those whose
normal faces the camera and that project into the image onto a valid depth pixel, and
compare the predicted depth ``z_pred`` with the observed depth ``z_obs`` of that pixel::

    r = z_obs - z_pred          (mm, along the optical axis)

* ``|r| <= agree_mm``: the camera sees the model surface where the pose puts it (agreement);
* ``r > violate_mm``: the camera sees *through* where the bone should be (free-space
  violation, impossible for a correct pose: nothing can lie behind solid bone and be seen);
* ``r < -violate_mm``: something lies in front of the bone (hand, instrument, tissue,
  another part of the spine): no evidence either way.

Back-face culling approximates visibility; self-occlusion by the posterior elements makes
hidden points look "occluded", which counts as no evidence, never against the pose.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from end2reg_ros.camera import CameraIntrinsics


@dataclass
class SurfaceSamples:
    """Model surface points (P, 3) and unit outward normals (P, 3) in the spine frame (mm),
    and the index (P,) of the vertebra each point belongs to (into ``levels``)."""

    points: np.ndarray
    normals: np.ndarray
    vertebra: np.ndarray
    levels: tuple[str, ...]


def _outward(points: np.ndarray, normals: np.ndarray, vertices: np.ndarray,
             faces: np.ndarray) -> np.ndarray:
    """Normals flipped where they point into the solid: a ray from just off the surface
    along the normal that crosses the mesh an odd number of times started inside. Works
    whatever the winding of each part (the synthetic vertebrae mix inward-wound parts)."""
    import open3d as o3d

    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(np.asarray(vertices, dtype=np.float32)),
                        o3d.core.Tensor(np.asarray(faces, dtype=np.uint32)))
    rays = np.concatenate([points + 0.05 * normals, normals], axis=1).astype(np.float32)
    count = scene.count_intersections(o3d.core.Tensor(rays)).numpy()
    return np.where((count % 2 == 1)[:, None], -normals, normals)


def surface_samples(specimen, count: int = 6000, seed: int = 0) -> SurfaceSamples:
    """Area-uniform samples of every vertebra mesh of ``specimen`` (deterministic in seed),
    with outward normals whatever the meshes' winding (see :func:`_outward`)."""
    from end2reg_ros.model.preprocess import sample_mesh_surface

    rng = np.random.default_rng(seed)
    areas = []
    for v in specimen.vertebrae:
        tri = np.asarray(v.vertices, dtype=float)[np.asarray(v.faces, dtype=np.int64)]
        areas.append(np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]),
                                    axis=1).sum())
    areas = np.asarray(areas)
    counts = np.maximum(16, np.round(count * areas / areas.sum()).astype(int))
    points, normals, index = [], [], []
    for i, (v, n) in enumerate(zip(specimen.vertebrae, counts)):
        p, nrm = sample_mesh_surface(v.vertices, v.faces, int(n), rng)
        try:
            nrm = _outward(p, nrm, v.vertices, v.faces)
        except ImportError:  # no open3d: keep the meshes' own winding
            pass
        points.append(p)
        normals.append(nrm)
        index.append(np.full(len(p), i, dtype=np.int32))
    return SurfaceSamples(
        np.concatenate(points).astype(np.float32),
        np.concatenate(normals).astype(np.float32),
        np.concatenate(index),
        tuple(v.level for v in specimen.vertebrae),
    )


def posterior_visible(samples: SurfaceSamples, specimen) -> SurfaceSamples:
    """The samples a camera above a prone patient sees: outward normal towards +z (posterior)
    and nothing of the model above them (ray towards +z unobstructed)."""
    from end2reg_ros.model.preprocess import specimen_triangles, visible_from_posterior

    keep = visible_from_posterior(samples.points, samples.normals, *specimen_triangles(specimen))
    return SurfaceSamples(samples.points[keep], samples.normals[keep], samples.vertebra[keep],
                          samples.levels)


def pixel_lookup(
    camera: CameraIntrinsics, points_cam: np.ndarray, stride: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest pixel of optical-frame points (..., 3) in mm, in an image subsampled by
    ``stride``, as a flat index into the raveled image, ``row * columns + column``, and
    whether the point lies in it: ``(flat, inside)``; ``flat`` is 0 where ``inside`` is False
    (the point is behind the camera or projects outside the image). One projection serves
    several images of the same size (depth and bone probability), each read by one gather."""
    z = points_cam[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.rint((camera.fx * points_cam[..., 0] / z + camera.cx) / stride)
        v = np.rint((camera.fy * points_cam[..., 1] / z + camera.cy) / stride)
    cols = -(-camera.width // stride)
    rows = -(-camera.height // stride)
    inside = (z > 1.0) & (u >= 0) & (u < cols) & (v >= 0) & (v < rows)
    with np.errstate(invalid="ignore"):  # NaN / inf outside: set to 0 below
        v *= cols
        v += u
    v[~inside] = 0
    return v.astype(np.intp), inside


def residuals_at(depth_mm: np.ndarray, points_cam: np.ndarray, flat: np.ndarray,
                 inside: np.ndarray) -> np.ndarray:
    """:func:`depth_residuals` from a :func:`pixel_lookup` of ``points_cam``."""
    obs = np.asarray(depth_mm, dtype=np.float32).reshape(-1)[flat]
    valid = inside & np.isfinite(obs) & (obs > 0)
    return np.where(valid, obs - points_cam[..., 2], np.nan)


def depth_residuals(
    depth_mm: np.ndarray, camera: CameraIntrinsics, points_cam: np.ndarray
) -> np.ndarray:
    """``z_obs - z_pred`` (..., P) for optical-frame points (..., P, 3) in mm; NaN where the
    point is behind the camera, projects outside the image or lands on a pixel without depth.
    Raises ValueError when the image is not the camera's size."""
    if np.shape(depth_mm) != (camera.height, camera.width):
        raise ValueError(f"depth image is {np.shape(depth_mm)[::-1]} (W, H) but the camera "
                         f"says {camera.width}x{camera.height}")
    flat, inside = pixel_lookup(camera, points_cam)
    return residuals_at(depth_mm, points_cam, flat, inside)


@dataclass
class DepthAgreement:
    """Depth evidence for one pose. Fractions are of the checked points (in the image, facing
    the camera, on a valid depth pixel); ``checked`` their number. ``vertebra_agree``: per
    level, the agreement fraction of that vertebra's checked points (NaN when it has fewer
    than ``min_vertebra_points``); ``min_vertebra_agree`` the smallest of the finite ones
    (NaN if none)."""

    agree: float
    violate: float
    occluded: float
    checked: int
    vertebra_agree: dict[str, float]
    min_vertebra_agree: float
    median_abs_agree_mm: float
    #: how well the agreeing points pin the pose down at the target points: median over the
    #: targets of the predicted standard deviation (mm) of their displacement, from the
    #: point-to-plane information of the agreeing points (:func:`target_sd_mm`); NaN when no
    #: targets were given, inf when the agreeing points leave a motion unconstrained
    target_sd_mm: float = float("nan")


def depth_agreement(
    depth_mm: np.ndarray,
    camera: CameraIntrinsics,
    cam_from_spine: np.ndarray,
    surface: SurfaceSamples,
    agree_mm: float = 2.5,
    violate_mm: float = 6.0,
    min_vertebra_points: int = 30,
    targets: np.ndarray | None = None,
) -> DepthAgreement:
    """Depth consistency of ``surface`` posed by ``cam_from_spine`` (mm) in one depth image;
    with ``targets`` (T, 3, spine frame, mm) also ``target_sd_mm`` of the agreeing points."""
    pose = np.asarray(cam_from_spine, dtype=np.float64)
    rot, trans = pose[:3, :3], pose[:3, 3]
    pts = surface.points @ rot.T + trans
    nrm = surface.normals @ rot.T
    facing = np.einsum("ij,ij->i", nrm, -pts) > 0.0
    res = depth_residuals(depth_mm, camera, pts)
    checked = facing & np.isfinite(res)
    r = res[checked]
    n = int(checked.sum())
    if n == 0:
        nan = float("nan")
        return DepthAgreement(0.0, 0.0, 0.0, 0, {lv: nan for lv in surface.levels}, nan, nan)
    agree_mask = np.abs(r) <= agree_mm
    per_level: dict[str, float] = {}
    vert = surface.vertebra[checked]
    for i, level in enumerate(surface.levels):
        sel = vert == i
        per_level[level] = (
            float(agree_mask[sel].mean()) if sel.sum() >= min_vertebra_points else float("nan")
        )
    finite = [v for v in per_level.values() if np.isfinite(v)]
    sd = float("nan")
    if targets is not None and len(targets):
        sd = target_sd_mm(pts[checked][agree_mask], nrm[checked][agree_mask],
                          np.asarray(targets, dtype=np.float64) @ rot.T + trans)
    return DepthAgreement(
        agree=float(agree_mask.mean()),
        violate=float((r > violate_mm).mean()),
        occluded=float((r < -violate_mm).mean()),
        checked=n,
        vertebra_agree=per_level,
        min_vertebra_agree=float(min(finite)) if finite else float("nan"),
        median_abs_agree_mm=float(np.median(np.abs(r[agree_mask]))) if agree_mask.any() else float("nan"),
        target_sd_mm=sd,
    )


def target_sd_mm(points: np.ndarray, normals: np.ndarray, targets: np.ndarray,
                 noise_mm: float = 1.0) -> float:
    """How well surface points constrain a rigid pose at the target points (all optical
    frame, mm): the median over ``targets`` of ``sqrt(trace(cov))`` of the target's
    displacement, the pose's covariance being that of a point-to-plane fit of ``points``
    with unit ``normals`` and independent noise ``noise_mm`` along each normal
    (``cov = noise^2 (sum J_i J_i^T)^-1``, ``J_i = [(p_i - c) x n_i, n_i]``, rotation about
    the points' centroid ``c``). Independent of whether the pose is right: it says how much
    the seen surface can pin down, e.g. large when only one vertebra is seen and the targets
    on the others sit at the end of a lever arm, or when the seen surface is flat; inf when
    some motion is unconstrained (fewer than 6 points, degenerate geometry)."""
    fit = _point_to_plane_information(points, normals)
    if fit is None:
        return float("inf")
    centre, _, info_inv = fit
    return _median_target_sd(info_inv * noise_mm**2, targets, centre)


def _point_to_plane_information(points: np.ndarray, normals: np.ndarray):
    """``(c, J, H^-1)`` of a point-to-plane fit of ``points`` with unit ``normals``: the
    points' centroid ``c``, the rows ``J_i = [(p_i - c) x n_i, n_i]`` (N, 6) and the inverse
    of ``H = sum_i J_i^T J_i``; None when fewer than 6 points are given or some motion is
    unconstrained."""
    p = np.asarray(points, dtype=np.float64)
    n = np.asarray(normals, dtype=np.float64)
    if len(p) < 6:
        return None
    c = p.mean(axis=0)
    jac = np.concatenate([np.cross(p - c, n), n], axis=1)
    try:
        w, v = np.linalg.eigh(jac.T @ jac)
    except np.linalg.LinAlgError:
        return None
    if w[0] <= 1e-9 * max(w[-1], 1e-12):
        return None
    return c, jac, (v / w) @ v.T


def _median_target_sd(cov: np.ndarray, targets: np.ndarray, centre: np.ndarray) -> float:
    """Median over ``targets`` of ``sqrt(trace)`` of the covariance of their displacement
    under a small motion about ``centre`` with covariance ``cov`` (6, 6)."""
    a = _target_jacobians(np.asarray(targets, dtype=np.float64) - centre)  # (T, 3, 6)
    var = np.einsum("tij,jk,tik->t", a, cov, a)
    return float(np.median(np.sqrt(np.maximum(var, 0.0))))


def _target_jacobians(targets: np.ndarray) -> np.ndarray:
    """(T, 3, 6): the displacement of each target point ``t`` (relative to the rotation
    centre) under a small motion ``(omega, v)`` is ``omega x t + v = [-[t]x, I] (omega, v)``."""
    t = np.asarray(targets, dtype=np.float64)
    skew = np.zeros((len(t), 3, 3))
    skew[:, 0, 1], skew[:, 0, 2] = -t[:, 2], t[:, 1]
    skew[:, 1, 0], skew[:, 1, 2] = t[:, 2], -t[:, 0]
    skew[:, 2, 0], skew[:, 2, 1] = -t[:, 1], t[:, 0]
    return np.concatenate([-skew, np.broadcast_to(np.eye(3), skew.shape)], axis=2)


def fit_sd_mm(points: np.ndarray, normals: np.ndarray, residuals: np.ndarray,
              targets: np.ndarray, block_mm: float = 10.0, min_points: int = 30) -> float:
    """How far the fitted surface's own residuals leave the target points uncertain (mm):
    the median over ``targets`` of ``sqrt(trace(cov))`` of the target's displacement, with
    ``cov`` the cluster-robust ("sandwich") covariance of a point-to-plane fit of
    ``points`` (unit ``normals`` of the model at their correspondences, signed
    ``residuals`` along them; all in one frame, mm) at its optimum:
    ``H^-1 (sum_b g_b g_b^T) H^-1``, ``H = sum_i J_i^T J_i``, ``g_b = sum_{i in b} J_i r_i``
    over blocks ``b`` of ``block_mm`` cubes, ``J_i = [(p_i - c) x n_i, n_i]`` about the
    points' centroid ``c``.

    Unlike :func:`target_sd_mm` (independent 1 mm noise), this takes the size of the
    residuals from the fit and lets those of neighbouring points pull the same way: a
    tissue remnant over part of the seen bone, a smooth depth error or a vertebra that
    moved since the CT tilts a small patch as a whole, and a pose pinned by a small patch
    at one end of the spine swings the far targets. inf when fewer than ``min_points``
    points are given or some motion is unconstrained."""
    p = np.asarray(points, dtype=np.float64)
    fit = _point_to_plane_information(p, normals) if len(p) >= int(min_points) else None
    if fit is None:
        return float("inf")
    centre, jac, info_inv = fit
    _, block = np.unique(np.floor(p / float(block_mm)).astype(np.int64), axis=0,
                         return_inverse=True)
    scores = np.zeros((int(block.max()) + 1, 6))
    np.add.at(scores, block.reshape(-1), jac * np.asarray(residuals, np.float64)[:, None])
    return _median_target_sd(info_inv @ (scores.T @ scores) @ info_inv, targets, centre)
