"""Global initial poses from one RGB-D frame, with no assumption on the camera placement.

Used for the first registration of a recording and after the spine was lost. The camera may
look from either side of the table, tilted up to ~45 deg, at any rotation about its optical
axis, 150-600 mm away, with the spine anywhere in the central part of the image.

What it does assume, and why (posterior approach, patient prone):

1. **A support surface** dominates the depth image: drapes and the patient's back around the
   incision form a roughly planar surface whose normal is the spine's posterior axis to within
   a few degrees. :func:`fit_support_plane` finds it (RANSAC on the depth points).
2. **The exposure is a trough** in that surface: the bone lies in the wound, deeper than the
   skin and drapes around it. Pixels more than ``trough_depth_mm`` behind the plane locate the
   exposure (:func:`find_exposure`); hands and instruments lie in front of the plane and are
   ignored. Where no trough is found, positions on a grid over the central image are used.

Then every rotation about the plane normal (``roll_step_deg``, 0-360 deg) and a few positions
in the exposure are scored by :func:`score_hypotheses`: the posed model surface is compared with
the depth image (agreement within ``agree_mm`` counts for, free-space violations count
against); each hypothesis first slides along the optical axis to its best depth offset. With
the colour image, agreement counts more on pixels that look like bone
(:mod:`end2reg_ros.registration.bone_colour`): exposed bone is pale where drapes, muscle and
metal are not. The best distinct hypotheses go on to the registration network, which corrects up to ~15 deg and
~20 mm; the depth check of the refined poses then picks one (see
:mod:`end2reg_ros.pipeline`).

Frames: poses are ``cam_from_spine`` (spine frame -> optical frame, mm).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from end2reg_ros.camera import CameraIntrinsics, backproject
from end2reg_ros.geometry import (
    axis_angle_to_matrix,
    make_pose,
    rotation_angle_deg,
    transform_points,
)
from end2reg_ros.parallel import parallel_batches, parallel_map
from end2reg_ros.registration.depth_check import (
    SurfaceSamples,
    depth_residuals,
    pixel_lookup,
    residuals_at,
)


@dataclass(frozen=True)
class GlobalSearchConfig:
    """Parameters of the global search (mm, degrees, pixels)."""

    roll_step_deg: float = 10.0
    #: positions along / across the exposure's main axis, as offsets from its centre (mm)
    along_offsets_mm: tuple[float, ...] = (-60.0, -45.0, -30.0, -15.0, 0.0, 15.0, 30.0, 45.0, 60.0)
    across_offsets_mm: tuple[float, ...] = (-36.0, -24.0, -12.0, 0.0, 12.0, 24.0, 36.0)
    #: a pixel is in the exposure when it lies this far behind the support plane
    trough_depth_mm: float = 8.0
    #: the anchors' depth: this percentile of the trough pixels' depth behind the plane
    trough_floor_percentile: float = 75.0
    #: fewest exposure pixels (at stride ``stride``) for the trough to be used
    min_trough_pixels: int = 150
    #: fallback grid over the central part of the image (fraction of the half size; mm step)
    fallback_image_fraction: float = 0.75
    fallback_step_mm: float = 30.0
    plane_inlier_mm: float = 6.0
    plane_iterations: int = 96
    stride: int = 4
    #: model points scored per hypothesis
    score_points: int = 700
    agree_mm: float = 6.0
    violate_mm: float = 10.0
    violate_weight: float = 2.0
    #: depth offsets searched per hypothesis: histogram of residuals in this range (mm)
    offset_range_mm: float = 80.0
    offset_bin_mm: float = 2.0
    #: hypotheses handed to the registration (distinct by roll or position): the full sweep
    #: keeps ``top_k``; :func:`propose_initial_poses` takes ``axis_top_k`` along the exposure
    #: axis and ``sweep_top_k`` more from the sweep
    top_k: int = 4
    #: positions of the exposure-axis hypotheses, from the exposure's centre (mm)
    axis_along_mm: tuple[float, ...] = (-40.0, -20.0, 0.0, 20.0, 40.0)
    axis_across_mm: tuple[float, ...] = (-20.0, 0.0, 20.0)
    axis_top_k: int = 4
    sweep_top_k: int = 2
    distinct_roll_deg: float = 25.0
    distinct_position_mm: float = 15.0
    #: local refinement of the coarse pool (:func:`refine_hypotheses`): the ``pool_size`` best
    #: of the sweep distinct by ``pool_distinct_roll_deg`` / ``pool_distinct_position_mm``,
    #: plus every exposure-axis hypothesis, each refined by projective point-to-plane ICP
    #: (``icp_schedule``: (correspondence distance mm, iterations) coarse to fine) on
    #: ``icp_points`` model points, then ranked again by depth agreement within
    #: ``fine_agree_mm`` (violations beyond ``fine_violate_mm`` count against);
    #: ``refined_top_k`` distinct ones go on (0: no refinement, the coarse proposal)
    pool_size: int = 40
    pool_distinct_roll_deg: float = 15.0
    pool_distinct_position_mm: float = 12.0
    icp_points: int = 500
    icp_schedule: tuple[tuple[float, int], ...] = ((15.0, 3), (8.0, 3), (4.0, 4))
    icp_stride: int = 2
    #: a pose with fewer correspondences than this in an ICP iteration stays where it is.
    #: Tried: 15 pairs on all (~1300) posterior points put the best-ranked hypothesis within
    #: 8 mm of the truth in 14 of 31 wide validation failures showing bone (4 with 30 pairs
    #: on 500 points). Through the pipeline (15 pairs, 1200 points, 480 validation frames):
    #: 12 frames more below 2 mm and 5 fewer, all 12 on views showing < 1 % bone that the
    #: gate refused; the refitted confidence separated worse (Brier 0.0085 -> 0.0149) and
    #: the 0.95 gate accepted 81.2 % instead of 83.3 %, one of them a wrong-level pose 32 mm
    #: off. Not adopted.
    icp_min_pairs: int = 30
    fine_agree_mm: float = 3.0
    fine_violate_mm: float = 6.0
    refined_top_k: int = 3
    refined_distinct_mm: float = 8.0
    refined_distinct_deg: float = 10.0
    #: with a bone probability map (:mod:`end2reg_ros.registration.bone_colour`), a model
    #: point agreeing with the depth counts ``colour_base + p(bone)`` of its pixel instead
    #: of 1, and a violation ``colour_base + 0.5``
    colour_base: float = 0.25
    #: the support plane's normal tilted by this angle (deg) towards
    #: ``normal_tilt_direction_deg`` (in the plane, from its first basis vector) before the
    #: search uses it (0: as fitted). The plane fitted to the whole image can lean 10-26 deg
    #: from the spine's posterior axis when occluders, the wound's walls or a curved back
    #: fill the view, more than the pool's ICP corrects; the pipeline searches tilted planes
    #: for weak registrations only
    normal_tilt_deg: float = 0.0
    normal_tilt_direction_deg: float = 0.0
    #: a local search of the refined pool on the fine score itself
    #: (:func:`climb_hypotheses`): (step mm, step deg) per stage, coarse to fine; empty: none
    #: (the default search; the pipeline climbs for weak registrations only)
    climb_steps: tuple[tuple[float, float], ...] = ()
    #: most moves per pose and stage (a stage ends earlier when no move improves any pose)
    climb_iterations: int = 6
    #: poses still climbing after the first two stages: the best ``climb_keep``
    climb_keep: int = 16
    #: threads the search's rotations and pose batches are spread over
    #: (:func:`~end2reg_ros.parallel.parallel_map`; 1: the calling thread only). The same
    #: results either way; the pipeline spreads its hypotheses over as many
    workers: int = 2


@dataclass
class SupportPlane:
    """Plane ``normal . p = offset`` (optical frame, mm); ``normal`` points towards the camera;
    ``inlier_fraction`` of the sampled depth points within the inlier distance."""

    normal: np.ndarray
    offset: float
    inlier_fraction: float

    def signed_height(self, points: np.ndarray) -> np.ndarray:
        """Height of points above the plane, towards the camera (mm); negative = behind it."""
        return points @ self.normal - self.offset


def fit_support_plane(
    depth_mm: np.ndarray,
    camera: CameraIntrinsics,
    rng: np.random.Generator,
    config: GlobalSearchConfig = GlobalSearchConfig(),
) -> SupportPlane:
    """RANSAC plane through the dominant surface of the depth image (see module docstring).

    Raises ValueError when the image has too few valid depth pixels.
    """
    points, _ = backproject(depth_mm, camera, stride=config.stride)
    if len(points) < 50:
        raise ValueError(f"only {len(points)} valid depth points: cannot find the support plane")
    pts = points.astype(np.float64)
    if len(pts) > 4000:
        pts = pts[rng.choice(len(pts), 4000, replace=False)]
    tri = pts[rng.integers(0, len(pts), size=(config.plane_iterations, 3))]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    norm = np.linalg.norm(normals, axis=1)
    ok = norm > 1e-6
    normals = normals[ok] / norm[ok, None]
    offsets = np.einsum("ij,ij->i", normals, tri[ok, 0])
    dist = np.abs(pts @ normals.T - offsets)
    counts = (dist < config.plane_inlier_mm).sum(axis=0)
    best = int(np.argmax(counts))
    inliers = pts[dist[:, best] < config.plane_inlier_mm]
    centroid = inliers.mean(axis=0)
    _, _, vh = np.linalg.svd(inliers - centroid, full_matrices=False)
    normal = vh[2]
    if normal @ (-centroid) < 0:  # towards the camera (the optical centre is the origin)
        normal = -normal
    offset = float(normal @ centroid)
    inlier_fraction = float((np.abs(pts @ normal - offset) < config.plane_inlier_mm).mean())
    return SupportPlane(normal, offset, inlier_fraction)


@dataclass
class Exposure:
    """Where the exposure lies: centre (optical frame, mm, at the trough's median depth), main axis
    and cross axis (unit vectors in the plane), and whether a trough was found at all."""

    centre: np.ndarray
    axis: np.ndarray
    cross: np.ndarray
    found: bool
    pixels: int


def _plane_basis(normal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors spanning the plane with ``normal`` (deterministic)."""
    ref = np.array([0.0, 1.0, 0.0]) if abs(normal[1]) < 0.9 else np.array([1.0, 0.0, 0.0])
    e1 = ref - (ref @ normal) * normal
    e1 /= np.linalg.norm(e1)
    return e1, np.cross(normal, e1)


def find_exposure(
    depth_mm: np.ndarray,
    camera: CameraIntrinsics,
    plane: SupportPlane,
    config: GlobalSearchConfig = GlobalSearchConfig(),
) -> Exposure:
    """Centre and main axis of the trough behind the support plane (see module docstring)."""
    points, pixel = backproject(depth_mm, camera, stride=config.stride)
    height = plane.signed_height(points.astype(np.float64))
    u = pixel % camera.width
    v = pixel // camera.width
    half_w, half_h = camera.width / 2.0, camera.height / 2.0
    central = (np.abs(u - camera.cx) <= half_w * 0.9) & (np.abs(v - camera.cy) <= half_h * 0.9)
    trough = points[(height < -config.trough_depth_mm) & central].astype(np.float64)
    e1, e2 = _plane_basis(plane.normal)
    if len(trough) >= config.min_trough_pixels:
        # project onto the plane, robust centre, principal axis in the plane
        heights = plane.signed_height(trough)
        flat = trough - np.outer(heights, plane.normal)
        centre = np.median(flat, axis=0)
        coords = np.stack([(flat - centre) @ e1, (flat - centre) @ e2], axis=1)  # in-plane
        cov = np.cov(coords.T)
        w, vecs = np.linalg.eigh(cov)
        main = vecs[:, 1]
        axis = main[0] * e1 + main[1] * e2
        axis /= np.linalg.norm(axis)
        # down into the trough: the bone lies near its floor, deeper than most trough pixels
        centre = centre + float(np.percentile(heights, 100.0 - config.trough_floor_percentile)) * plane.normal
        return Exposure(centre, axis, np.cross(plane.normal, axis), True, len(trough))
    # no trough: the point of the plane on the optical axis
    ray = np.array([0.0, 0.0, 1.0])
    t = plane.offset / min(float(plane.normal @ ray), -1e-3)  # normal faces the camera
    return Exposure(ray * t, e1, e2, False, len(trough))


def tilted_plane(plane: SupportPlane, tilt_deg: float, direction_deg: float) -> SupportPlane:
    """``plane`` with its normal tilted by ``tilt_deg`` towards ``direction_deg`` (in the
    plane, from the first vector of :func:`_plane_basis`), through the point of ``plane``
    nearest the optical centre; ``plane`` itself when ``tilt_deg`` is 0."""
    if tilt_deg == 0.0:
        return plane
    e1, e2 = _plane_basis(plane.normal)
    phi = np.radians(direction_deg)
    axis = np.cos(phi) * e1 + np.sin(phi) * e2
    normal = axis_angle_to_matrix(axis, np.radians(tilt_deg)) @ plane.normal
    return SupportPlane(normal, float(normal @ (plane.normal * plane.offset)),
                        plane.inlier_fraction)


def rotation_from_normal_roll(normal: np.ndarray, roll_rad: float) -> np.ndarray:
    """``cam_from_spine`` rotation with spine +z (posterior) along ``normal`` and spine +y
    (cranial-to-caudal) at angle ``roll_rad`` in the plane (right-handed: x = y cross z)."""
    e1, e2 = _plane_basis(normal)
    y = np.cos(roll_rad) * e1 + np.sin(roll_rad) * e2
    x = np.cross(y, normal)
    return np.stack([x, y, normal], axis=1)


@dataclass
class Hypothesis:
    """One scored initial pose (``cam_from_spine``, mm), its roll (deg) and anchor position."""

    cam_from_spine: np.ndarray
    score: float
    roll_deg: float
    anchor: np.ndarray


def candidate_anchors(
    exposure: Exposure, plane: SupportPlane, camera: CameraIntrinsics, config: GlobalSearchConfig
) -> np.ndarray:
    """(A, 3) positions (optical frame, mm) for the spine's posterior surface point."""
    if exposure.found:
        along = np.asarray(config.along_offsets_mm)
        across = np.asarray(config.across_offsets_mm)
        a, c = np.meshgrid(along, across, indexing="ij")
        return exposure.centre + a.reshape(-1, 1) * exposure.axis + c.reshape(-1, 1) * exposure.cross
    # a grid of rays through the central image, intersected with the plane
    depth = max(plane.offset / min(float(plane.normal[2]), -1e-3), 50.0)
    half_u = config.fallback_image_fraction * camera.width / 2.0
    half_v = config.fallback_image_fraction * camera.height / 2.0
    step_px = max(4.0, config.fallback_step_mm * camera.fx / depth)
    us = np.arange(camera.cx - half_u, camera.cx + half_u + 1e-6, step_px)
    vs = np.arange(camera.cy - half_v, camera.cy + half_v + 1e-6, step_px)
    uu, vv = np.meshgrid(us, vs)
    rays = np.stack([(uu.ravel() - camera.cx) / camera.fx, (vv.ravel() - camera.cy) / camera.fy,
                     np.ones(uu.size)], axis=1)
    t = plane.offset / np.minimum(rays @ plane.normal, -1e-3)
    return rays[t > 0] * t[t > 0, None]


def score_hypotheses(
    depth_mm: np.ndarray,
    camera: CameraIntrinsics,
    rotations: np.ndarray,
    anchors: np.ndarray,
    surface: SurfaceSamples,
    surface_point: np.ndarray,
    config: GlobalSearchConfig = GlobalSearchConfig(),
    rng: np.random.Generator | None = None,
    agree_depth_mm: np.ndarray | None = None,
    bone_probability: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Score every (rotation, anchor) pair: returns ``scores`` (R, A) and the best depth
    offsets (R, A) in mm along the optical axis.

    Pose of pair (r, a): ``cam_from_spine`` with rotation ``rotations[r]`` that puts
    ``surface_point`` (spine frame) at ``anchors[a]``, then shifted along the optical axis by
    the offset where most of the model's depth residuals fall (histogram mode). Score:
    ``#agree - violate_weight * #violate`` over points facing the camera. With
    ``bone_probability`` (H, W), each agreeing point counts ``colour_base + p`` of its pixel
    and each violation ``colour_base + 0.5`` (see :class:`GlobalSearchConfig`). The rotations
    are scored on ``config.workers`` threads.
    """
    rng = rng or np.random.default_rng(0)
    n = min(config.score_points, len(surface.points))
    pick = rng.choice(len(surface.points), n, replace=False)
    pts = surface.points[pick].astype(np.float64) - surface_point
    nrm = surface.normals[pick].astype(np.float64)
    bins = np.arange(-config.offset_range_mm, config.offset_range_mm + 1e-6, config.offset_bin_mm)
    n_bins = len(bins) - 1
    half_agree = int(round(config.agree_mm / config.offset_bin_mm))
    violate_bins = int(round(config.violate_mm / config.offset_bin_mm))
    scores = np.full((len(rotations), len(anchors)), -np.inf)
    offsets = np.zeros((len(rotations), len(anchors)))
    view = -anchors / np.linalg.norm(anchors, axis=1, keepdims=True)  # (A, 3) towards camera

    def score_rotation(rot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = pts @ rot.T  # (P, 3)
        facing = (nrm @ rot.T) @ view.T > 0.0  # (P, A)
        cam = anchors[:, None, :] + q[None, :, :]  # (A, P, 3)
        flat, inside = pixel_lookup(camera, cam)  # shared by the depth and colour lookups
        res = residuals_at(depth_mm, cam, flat, inside)  # (A, P)
        res = np.where(facing.T, res, np.nan)
        # depth offset: the slide along the optical axis that scores best, from a histogram
        # of the residuals (bins of offset_bin_mm; residuals beyond the range fall into the
        # first / last bin, where they still count as violations or occlusions)
        res_bins = _offset_bins(res, config, n_bins)
        cum = _cumulative_histogram(res_bins, len(res), n_bins)
        agree_bins = res_bins if agree_depth_mm is None else _offset_bins(np.where(
            facing.T, depth_residuals(agree_depth_mm, camera, cam), np.nan), config, n_bins)
        weights = None if bone_probability is None else (
            config.colour_base + _values_at(bone_probability, flat, inside))
        cum_agree = cum if agree_depth_mm is None and weights is None else (
            _cumulative_histogram(agree_bins, len(res), n_bins, weights))
        centres = np.arange(n_bins)
        lo = np.clip(centres - half_agree, 0, n_bins)
        hi = np.clip(centres + half_agree + 1, 0, n_bins)
        agree = cum_agree[:, hi] - cum_agree[:, lo]  # (A, n_bins): agreeing with offset = bin
        beyond = np.clip(centres + violate_bins + 1, 0, n_bins)
        violate = cum[:, -1:] - cum[:, beyond]
        if weights is not None:
            violate = violate * (config.colour_base + 0.5)
        total = agree - config.violate_weight * violate
        best = np.argmax(total, axis=1)
        shift = bins[best] + config.offset_bin_mm / 2.0
        agree = agree[np.arange(len(anchors)), best]
        violate = violate[np.arange(len(anchors)), best]
        return agree - config.violate_weight * violate, shift

    for r, (score, shift) in enumerate(parallel_map(score_rotation, rotations, config.workers)):
        scores[r] = score
        offsets[r] = shift
    return scores, offsets


def _offset_bins(res: np.ndarray, config: GlobalSearchConfig,
                 n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """The offset bin of every finite residual of (A, P) ``res``, as a flat index
    ``row * n_bins + bin`` (residuals beyond the range in the first / last bin), and where
    the residuals are finite (A, P): ``(flat, finite)``, row-major like ``res[finite]``."""
    finite = np.isfinite(res)
    rows = np.nonzero(finite)[0]
    idx = np.floor((res[finite] + config.offset_range_mm) / config.offset_bin_mm)
    np.clip(idx, 0, n_bins - 1, out=idx)
    return idx.astype(np.int64) + rows * n_bins, finite


def _cumulative_histogram(bins: tuple[np.ndarray, np.ndarray], rows: int, n_bins: int,
                          weights: np.ndarray | None = None) -> np.ndarray:
    """(rows, n_bins + 1) cumulative counts (or sums of ``weights`` (rows, P)) per offset
    bin of :func:`_offset_bins` ``bins`` (non-finite residuals left out)."""
    flat, finite = bins
    hist = np.bincount(flat, weights=None if weights is None else weights[finite],
                       minlength=rows * n_bins).reshape(rows, n_bins)
    return np.concatenate([np.zeros((rows, 1)), np.cumsum(hist, axis=1)], axis=1)


def _values_at(image: np.ndarray, flat: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Values of a per-pixel ``image`` (H, W) at the pixels of a :func:`pixel_lookup`; 0
    where a point is behind the camera or outside the image."""
    return np.where(inside, np.asarray(image).reshape(-1)[flat], 0.0)


def global_hypotheses(
    depth_mm: np.ndarray,
    camera: CameraIntrinsics,
    surface: SurfaceSamples,
    surface_point: np.ndarray,
    config: GlobalSearchConfig = GlobalSearchConfig(),
    seed: int = 0,
    bone_probability: np.ndarray | None = None,
) -> tuple[list[Hypothesis], SupportPlane, Exposure]:
    """The ``top_k`` best distinct initial poses of one frame (best first), the support plane
    and the exposure found. ``surface_point``: spine-frame point of the exposed posterior
    surface above the spine origin (mm), placed at the candidate anchors.

    ``bone_probability``: optional (H, W) map that weights the agreement
    (:func:`score_hypotheses`).

    Raises ValueError when the depth image cannot be used (see :func:`fit_support_plane`).
    """
    rng = np.random.default_rng(seed)
    depth = np.asarray(depth_mm, dtype=np.float32)
    plane = tilted_plane(fit_support_plane(depth, camera, rng, config),
                         config.normal_tilt_deg, config.normal_tilt_direction_deg)
    exposure = find_exposure(depth, camera, plane, config)
    anchors = candidate_anchors(exposure, plane, camera, config)
    rolls = np.arange(0.0, 360.0, config.roll_step_deg)
    rotations = np.stack([rotation_from_normal_roll(plane.normal, np.radians(r)) for r in rolls])
    scores, offsets = score_hypotheses(
        depth, camera, rotations, anchors, surface, np.asarray(surface_point, float), config, rng,
        bone_probability=bone_probability,
    )
    order = np.argsort(scores, axis=None)[::-1]
    chosen: list[Hypothesis] = []
    for flat in order:
        r, a = np.unravel_index(flat, scores.shape)
        if not np.isfinite(scores[r, a]):
            break
        anchor = anchors[a] + np.array([0.0, 0.0, offsets[r, a]])
        if not _distinct(rolls[r], anchor, chosen, config):
            continue
        pose = _pose_at(rotations[r], anchor, surface_point)
        chosen.append(Hypothesis(pose, float(scores[r, a]), float(rolls[r]), anchor))
        if len(chosen) >= config.top_k:
            break
    return chosen, plane, exposure


def _pose_at(rotation: np.ndarray, anchor: np.ndarray, surface_point: np.ndarray) -> np.ndarray:
    """``cam_from_spine`` with ``rotation`` that puts ``surface_point`` (spine frame) at
    ``anchor`` (optical frame), mm."""
    pose = np.eye(4)
    pose[:3, :3] = rotation
    pose[:3, 3] = anchor - rotation @ np.asarray(surface_point, float)
    return pose


def _roll_distance(a_deg: float, b_deg: float) -> float:
    d = abs(a_deg - b_deg) % 360.0
    return min(d, 360.0 - d)


def axis_hypotheses(
    depth_mm: np.ndarray,
    camera: CameraIntrinsics,
    plane: SupportPlane,
    exposure: Exposure,
    surface: SurfaceSamples,
    surface_point: np.ndarray,
    along_mm: tuple[float, ...] | None = None,
    across_mm: tuple[float, ...] | None = None,
    roll_offsets_deg: tuple[float, ...] = (0.0, 180.0),
    config: GlobalSearchConfig = GlobalSearchConfig(),
    bone_probability: np.ndarray | None = None,
) -> list[Hypothesis]:
    """Initial poses with the spine's cranio-caudal axis along the exposure's main axis
    (both directions: the exposure does not tell L1 from L5), at positions around its centre,
    each slid along the optical axis to its best depth (:func:`score_hypotheses`); positions
    ``along_mm`` x ``across_mm`` (default: the config's ``axis_along_mm`` / ``axis_across_mm``)."""
    along_mm = config.axis_along_mm if along_mm is None else along_mm
    across_mm = config.axis_across_mm if across_mm is None else across_mm
    e1, e2 = _plane_basis(plane.normal)
    base = np.degrees(np.arctan2(exposure.axis @ e2, exposure.axis @ e1))
    rolls = np.array([base + r for r in roll_offsets_deg])
    rotations = np.stack([rotation_from_normal_roll(plane.normal, np.radians(r)) for r in rolls])
    a, c = np.meshgrid(np.asarray(along_mm), np.asarray(across_mm), indexing="ij")
    anchors = (exposure.centre + a.reshape(-1, 1) * exposure.axis
               + c.reshape(-1, 1) * exposure.cross)
    scores, offsets = score_hypotheses(depth_mm, camera, rotations, anchors, surface,
                                       np.asarray(surface_point, float), config,
                                       bone_probability=bone_probability)
    out = []
    for r, rot in enumerate(rotations):
        for k, anchor in enumerate(anchors):
            moved = anchor + np.array([0.0, 0.0, offsets[r, k]])
            out.append(Hypothesis(_pose_at(rot, moved, surface_point), float(scores[r, k]),
                                  float(rolls[r] % 360.0), moved))
    return out


def scene_maps(depth_mm: np.ndarray, camera: CameraIntrinsics, stride: int = 2):
    """Organised optical-frame points (H', W', 3) of every ``stride``-th pixel (NaN without
    depth), their normals towards the camera (from central differences) and where those
    normals can be trusted (no depth jump above ``8 * stride`` mm between the neighbours used)."""
    d = np.asarray(depth_mm, dtype=np.float32)[::stride, ::stride]
    vs = np.arange(0, camera.height, stride, dtype=np.float32)[:, None]
    us = np.arange(0, camera.width, stride, dtype=np.float32)[None, :]
    z = np.where(np.isfinite(d) & (d > 0), d, np.nan)
    points = np.stack([(us - camera.cx) / camera.fx * z, (vs - camera.cy) / camera.fy * z, z], -1)
    dx = np.full_like(points, np.nan)
    dy = np.full_like(points, np.nan)
    dx[:, 1:-1] = points[:, 2:] - points[:, :-2]
    dy[1:-1] = points[2:] - points[:-2]
    with np.errstate(invalid="ignore", divide="ignore"):
        normals = np.cross(dx, dy)
        normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
        normals = np.where(normals[..., 2:3] > 0, -normals, normals)
        ok = (np.isfinite(normals).all(-1) & (np.abs(dx[..., 2]) < 8.0 * stride)
              & (np.abs(dy[..., 2]) < 8.0 * stride))
    return points, normals, ok


def _posed(poses: np.ndarray, points: np.ndarray, normals: np.ndarray):
    """Model points and normals (P, 3) under every pose (H, 4, 4): ``(points (H, P, 3),
    normals (H, P, 3), facing the camera (H, P))`` in the optical frame."""
    rot_t = np.transpose(poses[:, :3, :3], (0, 2, 1))
    q = np.matmul(points, rot_t) + poses[:, None, :3, 3]  # matmul: BLAS, unlike einsum
    qn = np.matmul(normals, rot_t)
    return q, qn, (qn * q).sum(axis=-1) < 0.0


def refine_hypotheses(
    depth_mm: np.ndarray,
    camera: CameraIntrinsics,
    poses: np.ndarray,
    points: np.ndarray,
    normals: np.ndarray,
    config: GlobalSearchConfig = GlobalSearchConfig(),
) -> np.ndarray:
    """Projective point-to-plane ICP of model ``points`` / outward ``normals`` (spine frame,
    mm) onto the depth image, from every pose in ``poses`` (H, 4, 4) ``cam_from_spine`` at
    once: each model point facing the camera is paired with the scene point on its pixel
    when they are closer than the schedule's distance and their normals agree. Returns the
    refined poses (H, 4, 4); a pose with fewer than ``icp_min_pairs`` pairs in an iteration
    stays where it is in that iteration. The poses are refined in ``config.workers`` batches
    side by side."""
    stride = config.icp_stride
    scene, scene_n, trusted = scene_maps(depth_mm, camera, stride)
    scene_flat, scene_n_flat = scene.reshape(-1, 3), scene_n.reshape(-1, 3)
    trusted_flat = trusted.reshape(-1)
    pts = np.asarray(points, dtype=np.float64)
    nrm = np.asarray(normals, dtype=np.float64)

    def refine(batch: np.ndarray) -> np.ndarray:  # every pose of the batch independently
        poses = np.array(batch, dtype=np.float64, copy=True)
        for max_dist, iterations in config.icp_schedule:
            for _ in range(iterations):
                q, qn, facing = _posed(poses, pts, nrm)
                flat, inside = pixel_lookup(camera, q, stride)
                s, n = scene_flat[flat], scene_n_flat[flat]
                with np.errstate(invalid="ignore"):
                    diff = q - s
                    r = (n * diff).sum(axis=-1)
                    pair = (inside & trusted_flat[flat] & facing
                            & ((diff * diff).sum(axis=-1) < max_dist * max_dist)
                            & ((n * qn).sum(axis=-1) > 0.3) & np.isfinite(r))
                m = pair[..., None]
                n0 = np.where(m, n, 0.0)
                jac = np.concatenate([np.cross(np.where(m, q, 0.0), n0), n0], axis=-1)  # (H, P, 6)
                lhs = np.matmul(np.transpose(jac, (0, 2, 1)), jac) + 1e-3 * np.eye(6)
                rhs = -np.matmul(np.transpose(jac, (0, 2, 1)),
                                 np.where(pair, r, 0.0)[..., None])[..., 0]
                step = np.linalg.solve(lhs, rhs[..., None])[..., 0]
                for k in np.flatnonzero(pair.sum(axis=1) >= config.icp_min_pairs):
                    w = step[k, :3]
                    rotation = axis_angle_to_matrix(w, float(np.linalg.norm(w)))
                    poses[k] = make_pose(rotation, step[k, 3:]) @ poses[k]
        return poses

    return parallel_batches(refine, np.asarray(poses, dtype=np.float64).reshape(-1, 4, 4),
                            config.workers)


def fine_scores(
    depth_mm: np.ndarray,
    camera: CameraIntrinsics,
    poses: np.ndarray,
    points: np.ndarray,
    normals: np.ndarray,
    config: GlobalSearchConfig = GlobalSearchConfig(),
    bone_probability: np.ndarray | None = None,
) -> np.ndarray:
    """(H,) ``#agree - violate_weight * #violate`` of the posed model points facing the
    camera, agreement within ``fine_agree_mm``, violation (seen through) beyond
    ``fine_violate_mm``; weighted by ``bone_probability`` as in :func:`score_hypotheses`.
    The poses are scored in ``config.workers`` batches side by side."""

    def score(batch: np.ndarray) -> np.ndarray:
        q, _, facing = _posed(batch, points, normals)
        flat, inside = pixel_lookup(camera, q)
        res = np.where(facing, residuals_at(depth_mm, q, flat, inside), np.nan)
        with np.errstate(invalid="ignore"):
            agreeing = np.abs(res) < config.fine_agree_mm
            violate = (res > config.fine_violate_mm).sum(axis=1)
        if bone_probability is None:
            return agreeing.sum(axis=1) - config.violate_weight * violate
        weights = config.colour_base + _values_at(bone_probability, flat, inside)
        return (np.where(agreeing, weights, 0.0).sum(axis=1)
                - config.violate_weight * violate * (config.colour_base + 0.5))

    return parallel_batches(score, np.asarray(poses, dtype=np.float64).reshape(-1, 4, 4),
                            config.workers)


def _climb_moves(step_mm: float, step_deg: float) -> np.ndarray:
    """(12, 4, 4) moves: +-``step_mm`` along and +-``step_deg`` about each optical-frame axis."""
    moves = []
    for k in range(3):
        unit = np.eye(3)[k]
        for sign in (-1.0, 1.0):
            moves.append(make_pose(np.eye(3), sign * step_mm * unit))
            moves.append(make_pose(axis_angle_to_matrix(unit, sign * np.radians(step_deg)),
                                   np.zeros(3)))
    return np.stack(moves)


def climb_hypotheses(
    depth_mm: np.ndarray,
    camera: CameraIntrinsics,
    poses: np.ndarray,
    points: np.ndarray,
    normals: np.ndarray,
    surface_point: np.ndarray,
    config: GlobalSearchConfig = GlobalSearchConfig(),
    bone_probability: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local search of :func:`fine_scores` around every pose (H, 4, 4) ``cam_from_spine``:
    per stage of ``config.climb_steps`` (mm, deg), each pose takes its best of 12 moves
    (translations along, rotations about the optical-frame axes through the pose's
    ``surface_point``) while that raises its score, at most ``climb_iterations`` times;
    after the first two stages only the ``climb_keep`` best poses go on. Returns
    ``(poses, scores, index)``: the climbed poses, their fine scores and the index of each
    in the input.

    Why: on views that show little bone the ICP of :func:`refine_hypotheses` finds too few
    pairs to move (it needs ``icp_min_pairs``), and a pool pose 5-15 mm / 10 deg from the
    truth stays there, scoring far below the true pose (on 24 traced wide validation
    failures the true pose out-scored the best-ranked proposal in 15). Climbing the score
    itself brings such poses in: see :class:`~end2reg_ros.pipeline.PipelineConfig`
    ``weak_climb_steps``.
    """
    poses = np.array(poses, dtype=np.float64, copy=True)
    index = np.arange(len(poses))
    spt = np.asarray(surface_point, dtype=np.float64)
    score = fine_scores(depth_mm, camera, poses, points, normals, config, bone_probability)
    for stage, (step_mm, step_deg) in enumerate(config.climb_steps):
        if stage == 2 and len(poses) > config.climb_keep:
            keep = np.argsort(-score, kind="stable")[: config.climb_keep]
            poses, score, index = poses[keep], score[keep], index[keep]
        moves = _climb_moves(step_mm, step_deg)
        for _ in range(config.climb_iterations):
            centre = poses[:, :3, :3] @ spt + poses[:, :3, 3]  # (H, 3) the surface point
            cand = np.repeat(poses[:, None], len(moves), axis=1)  # (H, 12, 4, 4)
            rot = moves[:, :3, :3]
            cand[:, :, :3, :3] = np.matmul(rot[None], poses[:, None, :3, :3])
            cand[:, :, :3, 3] = (np.einsum("mij,hj->hmi", rot, poses[:, :3, 3] - centre)
                                 + centre[:, None] + moves[None, :, :3, 3])
            s = fine_scores(depth_mm, camera, cand.reshape(-1, 4, 4), points, normals, config,
                            bone_probability).reshape(len(poses), len(moves))
            best = s.argmax(axis=1)
            top = s[np.arange(len(poses)), best]
            better = np.flatnonzero(top > score)
            if not len(better):
                break
            poses[better] = cand[better, best[better]]
            score[better] = top[better]
    return poses, score, index


def _refined_pool(
    depth_mm: np.ndarray,
    camera: CameraIntrinsics,
    surface: SurfaceSamples,
    surface_point: np.ndarray,
    config: GlobalSearchConfig,
    seed: int,
    bone_probability: np.ndarray | None,
) -> tuple[list[Hypothesis], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The coarse pool of :func:`propose_initial_poses` refined by ICP: ``(pool, points,
    normals, refined poses, fine scores)`` (empty pool: the arrays empty too)."""
    pool_cfg = replace(config, top_k=config.pool_size,
                       distinct_roll_deg=config.pool_distinct_roll_deg,
                       distinct_position_mm=config.pool_distinct_position_mm)
    pool, plane, exposure = global_hypotheses(depth_mm, camera, surface, surface_point,
                                              pool_cfg, seed, bone_probability)
    if exposure.found:
        pool += axis_hypotheses(depth_mm, camera, plane, exposure, surface, surface_point,
                                config=pool_cfg, bone_probability=bone_probability)
    if not pool:
        empty = np.zeros((0, 3))
        return pool, empty, empty, np.zeros((0, 4, 4)), np.zeros(0)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(surface.points), min(config.icp_points, len(surface.points)),
                      replace=False)
    pts = surface.points[pick].astype(np.float64)
    nrm = surface.normals[pick].astype(np.float64)
    refined = refine_hypotheses(depth_mm, camera, np.stack([h.cam_from_spine for h in pool]),
                                pts, nrm, config)
    scores = fine_scores(depth_mm, camera, refined, pts, nrm, config, bone_probability)
    return pool, pts, nrm, refined, scores


def propose_initial_poses(
    depth_mm: np.ndarray,
    camera: CameraIntrinsics,
    surface: SurfaceSamples,
    surface_point: np.ndarray,
    config: GlobalSearchConfig = GlobalSearchConfig(),
    seed: int = 0,
    bone_probability: np.ndarray | None = None,
    pool_cache: dict | None = None,
) -> list[Hypothesis]:
    """The initial poses the registration refines, best first.

    A coarse pool (the ``pool_size`` best distinct poses of the roll sweep and every
    exposure-axis hypothesis), each refined by ICP (:func:`refine_hypotheses`) and ranked
    again by fine depth agreement (:func:`fine_scores`); the ``refined_top_k`` best distinct
    ones are returned. The coarse score alone often prefers wrong poses (the model's flat
    posterior surface agrees with drapes and skin within its 6 mm); after the refinement the
    right pose agrees within 3 mm and the wrong ones do not. Measured on development frames
    (seed 4260, wide views, never used for a reported figure): some proposal within
    15 deg / 20 mm of the truth in 79 % of the frames with 3 proposals (coarse proposal
    alone: 55 % with 6); the best-ranked one in 74 %.
    ``refined_top_k = 0`` gives the coarse proposal (:func:`coarse_initial_poses`).

    ``bone_probability`` (H, W), from the colour image
    (:class:`~end2reg_ros.registration.bone_colour.BoneColourModel`), weights the agreement
    of both scores: agreement on pixels that look like bone counts more than on drapes or
    muscle. On the same development frames: best-ranked proposal right in 80 % of the frames
    (75 % on depth alone), some proposal in 81 % (79 %). A larger pool raised that further
    on these frames (``pool_size`` 80: 85 % / 86 %) but not the registrations of the
    validation sets (479 frames: 2 more below 2 mm on wide views, 2 fewer on surgical ones,
    and a worse gate), so it stays at 40.

    ``pool_cache``: a dict kept by the caller for several searches of *one* frame (the same
    depth, surface and bone map): the refined pool of a configuration that differs only in
    ``refined_top_k`` or ``climb_steps`` from one already searched is taken from it instead
    of being built and refined again.
    """
    if config.refined_top_k <= 0:
        return coarse_initial_poses(depth_mm, camera, surface, surface_point, config, seed)
    key = (replace(config, refined_top_k=0, climb_steps=()), seed)
    cached = pool_cache.get(key) if pool_cache is not None else None
    if cached is None:
        cached = _refined_pool(depth_mm, camera, surface, surface_point, config, seed,
                               bone_probability)
        if pool_cache is not None:
            pool_cache[key] = cached
    pool, pts, nrm, refined, scores = cached
    if not pool:
        return []
    index = np.arange(len(pool))
    if config.climb_steps:
        refined, scores, index = climb_hypotheses(depth_mm, camera, refined, pts, nrm,
                                                  surface_point, config, bone_probability)
    chosen: list[Hypothesis] = []
    for k in np.argsort(-scores, kind="stable"):
        pose = refined[k]
        if all(np.linalg.norm(pose[:3, 3] - h.cam_from_spine[:3, 3]) > config.refined_distinct_mm
               or rotation_angle_deg(pose[:3, :3].T @ h.cam_from_spine[:3, :3])
               > config.refined_distinct_deg for h in chosen):
            chosen.append(Hypothesis(pose, float(scores[k]), pool[index[k]].roll_deg,
                                     transform_points(pose, np.asarray(surface_point, float)[None])[0]))
        if len(chosen) >= config.refined_top_k:
            break
    return chosen


def coarse_initial_poses(
    depth_mm: np.ndarray,
    camera: CameraIntrinsics,
    surface: SurfaceSamples,
    surface_point: np.ndarray,
    config: GlobalSearchConfig = GlobalSearchConfig(),
    seed: int = 0,
) -> list[Hypothesis]:
    """The coarse proposal, best first: the ``axis_top_k`` best exposure-axis hypotheses
    (:func:`axis_hypotheses`, both directions) and the ``sweep_top_k`` best of the full roll
    sweep (:func:`global_hypotheses`) that differ from them (no local refinement)."""
    sweep, plane, exposure = global_hypotheses(depth_mm, camera, surface, surface_point,
                                               config, seed)
    chosen: list[Hypothesis] = []
    if exposure.found:
        axis = axis_hypotheses(depth_mm, camera, plane, exposure, surface, surface_point,
                               config=config)
        axis.sort(key=lambda h: -h.score)
        for hyp in axis:
            if _distinct(hyp.roll_deg, hyp.anchor, chosen, config):
                chosen.append(hyp)
            if len(chosen) >= config.axis_top_k:
                break
    added = 0
    for hyp in sweep:
        if added >= config.sweep_top_k:
            break
        if _distinct(hyp.roll_deg, hyp.anchor, chosen, config):
            chosen.append(hyp)
            added += 1
    return chosen


def _distinct(roll_deg: float, anchor: np.ndarray, chosen: list[Hypothesis],
              config: GlobalSearchConfig) -> bool:
    """A hypothesis at ``roll_deg`` / ``anchor`` differs from every chosen one in roll or
    in position."""
    return all(
        _roll_distance(roll_deg, h.roll_deg) > config.distinct_roll_deg
        or np.linalg.norm(anchor - h.anchor) > config.distinct_position_mm
        for h in chosen
    )
