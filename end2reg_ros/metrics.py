"""Registration metrics, exactly as defined in the project's domain notes (millimetres, degrees).

Per frame (all poses ``cam_from_*`` 4x4 in mm; points in the spine/CT frame, mm):

* **TRE** per target point x of vertebra L: ``|T_est x - T_true[L] x|`` where ``T_est`` is the
  estimated ``cam_from_spine`` and ``T_true[L]`` the true ``cam_from_vertebra[L]`` of the
  vertebra the target belongs to (``cam_from_spine`` when per-vertebra truth is absent).
* **RMSE**: sqrt of the mean over the preoperative model points (vertices of all
  vertebrae) of ``|T_est p - T_true[L(p)] p|^2``.
* **RRE**: ``arccos((tr(R_gt^T R) - 1) / 2)`` in degrees; **RTE**: ``|t - t_gt|`` in mm, both
  against the true ``cam_from_spine``.
* **Wrong level**: see :func:`is_wrong_level`.

Over frames, :func:`summarize` gives TRE median/mean/p95 over all target points of all
frames, RMSE mean, RRE/RTE median, success rates and the wrong-level rate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from end2reg_ros.geometry import rotation_angle_deg, transform_points
from end2reg_ros.types import Frame, Specimen

#: Success thresholds on the per-frame median TRE (mm).
SUCCESS_THRESHOLDS_MM: tuple[float, ...] = (2.0, 3.0, 5.0)
#: A frame whose per-frame median TRE exceeds this is a gross failure (mm).
GROSS_FAILURE_MM = 20.0

TruePoses = np.ndarray | Mapping[str, np.ndarray]


def _true_points(
    true_poses: TruePoses, points: np.ndarray, levels: Sequence[str] | None
) -> np.ndarray:
    """Map spine-frame points by their true pose: one 4x4, (K, 4, 4) per point, or
    level -> 4x4 together with each point's level."""
    points = np.asarray(points, dtype=float).reshape(-1, 3)
    if isinstance(true_poses, Mapping):
        if levels is None:
            raise ValueError("per-vertebra true poses need the level of every point")
        out = np.empty_like(points)
        levels_arr = np.asarray(levels)
        for level in np.unique(levels_arr):
            sel = levels_arr == level
            out[sel] = transform_points(np.asarray(true_poses[str(level)]), points[sel])
        return out
    poses = np.asarray(true_poses, dtype=float)
    if poses.shape == (4, 4):
        return transform_points(poses, points)
    if poses.shape == (len(points), 4, 4):
        return np.einsum("kij,kj->ki", poses[:, :3, :3], points) + poses[:, :3, 3]
    raise ValueError(f"true poses must be (4, 4), (K, 4, 4) or a mapping, got {poses.shape}")


def tre_mm(
    est_cam_from_spine: np.ndarray,
    true_poses: TruePoses,
    targets: np.ndarray,
    target_levels: Sequence[str] | None = None,
) -> np.ndarray:
    """Per-target TRE (K,) in mm: targets (K, 3, spine frame) mapped by the estimate vs by
    the true pose of the vertebra each belongs to (``true_poses``: one 4x4, (K, 4, 4), or
    level -> ``cam_from_vertebra`` with ``target_levels``)."""
    est = transform_points(np.asarray(est_cam_from_spine, dtype=float), targets)
    return np.linalg.norm(est - _true_points(true_poses, targets, target_levels), axis=1)


def rmse_mm(
    est_cam_from_spine: np.ndarray,
    true_poses: TruePoses,
    model_points: np.ndarray,
    point_levels: Sequence[str] | None = None,
) -> float:
    """RMS distance (mm) over the preoperative model points between estimated and true pose."""
    est = transform_points(np.asarray(est_cam_from_spine, dtype=float), model_points)
    diff = est - _true_points(true_poses, model_points, point_levels)
    return float(np.sqrt(np.mean(np.sum(diff * diff, axis=1))))


def rre_deg(est_cam_from_spine: np.ndarray, true_cam_from_spine: np.ndarray) -> float:
    """Rotation error arccos((tr(R_gt^T R) - 1) / 2) in degrees."""
    r = np.asarray(est_cam_from_spine, dtype=float)[:3, :3]
    r_gt = np.asarray(true_cam_from_spine, dtype=float)[:3, :3]
    return rotation_angle_deg(r_gt.T @ r)


def rte_mm(est_cam_from_spine: np.ndarray, true_cam_from_spine: np.ndarray) -> float:
    """Translation error |t - t_gt| in mm."""
    diff = (
        np.asarray(est_cam_from_spine, dtype=float)[:3, 3] - np.asarray(true_cam_from_spine)[:3, 3]
    )
    return float(np.linalg.norm(diff))


def vertebra_centroids_mm(specimen: Specimen) -> dict[str, np.ndarray]:
    """Mean vertex of every vertebra (spine frame, mm)."""
    return {v.level: np.asarray(v.vertices, dtype=float).mean(axis=0) for v in specimen.vertebrae}


def level_offset_mm(specimen: Specimen) -> np.ndarray:
    """The specimen's level-to-level offset (3,), spine frame, mm: the mean difference of the
    centroids of consecutive vertebrae (cranial to caudal), ~30-35 mm along +y."""
    centroids = vertebra_centroids_mm(specimen)
    pts = np.array([centroids[level] for level in specimen.levels])
    if len(pts) < 2:
        raise ValueError("the level offset needs at least two vertebrae")
    return np.diff(pts, axis=0).mean(axis=0)


def is_wrong_level(
    est_cam_from_spine: np.ndarray,
    true_poses: TruePoses,
    targets: np.ndarray,
    target_levels: Sequence[str] | None,
    level_offset: np.ndarray,
) -> bool:
    """True if the estimate is nearer to a one-level shift than to the truth.

    With d the specimen's level offset (:func:`level_offset_mm`), the two shifted truths map
    a target x to where the true pose puts ``x + d`` or ``x - d`` (the neighbouring vertebra,
    caudal or cranial). The frame is wrong-level iff, for s = +1 or s = -1,
    mean_k |T_est x_k - T_true(x_k + s d)| < mean_k |T_est x_k - T_true(x_k)|.
    (Errors beyond one level that are not shifts are counted by the gross-failure rate.)
    """
    targets = np.asarray(targets, dtype=float)
    est = transform_points(np.asarray(est_cam_from_spine, dtype=float), targets)
    to_truth = np.linalg.norm(est - _true_points(true_poses, targets, target_levels), axis=1).mean()
    for sign in (1.0, -1.0):
        shifted = _true_points(true_poses, targets + sign * np.asarray(level_offset), target_levels)
        if np.linalg.norm(est - shifted, axis=1).mean() < to_truth:
            return True
    return False


@dataclass
class FrameMetrics:
    """Metrics of one frame for one method (mm, degrees, milliseconds)."""

    tre_mm: np.ndarray
    rmse_mm: float
    rre_deg: float
    rte_mm: float
    wrong_level: bool
    runtime_ms: float = float("nan")
    failed: bool = False
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def tre_median_mm(self) -> float:
        return float(np.median(self.tre_mm))


def model_points_and_levels(specimen: Specimen) -> tuple[np.ndarray, list[str]]:
    """All preoperative model vertices (N, 3, spine frame, mm) and the level of each."""
    points = [np.asarray(v.vertices, dtype=float).reshape(-1, 3) for v in specimen.vertebrae]
    levels = [
        lv for v, p in zip(specimen.vertebrae, points, strict=True) for lv in [v.level] * len(p)
    ]
    return np.concatenate(points, axis=0), levels


def frame_metrics(
    est_cam_from_spine: np.ndarray,
    frame: Frame,
    specimen: Specimen,
    runtime_ms: float = float("nan"),
    failed: bool = False,
    _cache: dict | None = None,
) -> FrameMetrics:
    """All per-frame metrics of an estimate against the frame's ground truth.

    Uses ``frame.cam_from_vertebra`` for TRE/RMSE/wrong level when present (else
    ``frame.cam_from_spine`` for every point) and ``frame.cam_from_spine`` for RRE/RTE.
    Raises ValueError on a frame without ground truth. ``_cache``: optional dict reused
    across frames of the same specimen (model points, targets, level offset).
    """
    if frame.cam_from_spine is None:
        raise ValueError("metrics need a frame with ground truth (cam_from_spine is None)")
    cache = _cache if _cache is not None else {}
    if cache.get("specimen") is not specimen:
        cache.clear()
        cache["specimen"] = specimen
        cache["targets"] = specimen.target_points()
        cache["model"] = model_points_and_levels(specimen)
        cache["offset"] = level_offset_mm(specimen)
    targets, target_levels = cache["targets"]
    model, model_levels = cache["model"]
    truth: TruePoses = frame.cam_from_vertebra or frame.cam_from_spine
    return FrameMetrics(
        tre_mm=tre_mm(est_cam_from_spine, truth, targets, target_levels),
        rmse_mm=rmse_mm(est_cam_from_spine, truth, model, model_levels),
        rre_deg=rre_deg(est_cam_from_spine, frame.cam_from_spine),
        rte_mm=rte_mm(est_cam_from_spine, frame.cam_from_spine),
        wrong_level=is_wrong_level(
            est_cam_from_spine, truth, targets, target_levels, cache["offset"]
        ),
        runtime_ms=float(runtime_ms),
        failed=bool(failed),
    )


def success_rate(frame_median_tre_mm: Sequence[float], threshold_mm: float) -> float:
    """Fraction of frames whose per-frame median TRE is strictly below ``threshold_mm``."""
    values = np.asarray(frame_median_tre_mm, dtype=float)
    return float(np.mean(values < threshold_mm)) if len(values) else float("nan")


def summarize(frames: Sequence[FrameMetrics]) -> dict[str, float]:
    """Summary over frames.

    * ``tre_median_mm``, ``tre_mean_mm``, ``tre_p95_mm``: over all target points of all frames
      pooled (every target of every frame counts once);
    * ``rmse_mean_mm``: mean of the per-frame RMSE; ``rre_median_deg``, ``rte_median_mm``:
      median over frames;
    * ``success_2mm``/``_3mm``/``_5mm``: fraction of frames whose **per-frame median TRE**
      (median over that frame's targets) is **strictly below** 2 / 3 / 5 mm;
    * ``wrong_level_rate``: fraction of frames with :func:`is_wrong_level`;
      ``gross_failure_rate``: fraction with per-frame median TRE > 20 mm;
    * ``runtime_p50_ms``: median runtime per frame; ``failures``: frames where the method
      raised; ``frames``: number of frames.
    """
    n = len(frames)
    if n == 0:
        raise ValueError("no frames to summarize")
    all_tre = np.concatenate([np.asarray(f.tre_mm, dtype=float) for f in frames])
    medians = [f.tre_median_mm for f in frames]
    runtimes = np.array([f.runtime_ms for f in frames], dtype=float)
    out = {
        "tre_median_mm": float(np.median(all_tre)),
        "tre_mean_mm": float(np.mean(all_tre)),
        "tre_p95_mm": float(np.percentile(all_tre, 95)),
        "rmse_mean_mm": float(np.mean([f.rmse_mm for f in frames])),
        "rre_median_deg": float(np.median([f.rre_deg for f in frames])),
        "rte_median_mm": float(np.median([f.rte_mm for f in frames])),
    }
    for threshold in SUCCESS_THRESHOLDS_MM:
        out[f"success_{threshold:g}mm"] = success_rate(medians, threshold)
    out["wrong_level_rate"] = float(np.mean([f.wrong_level for f in frames]))
    out["gross_failure_rate"] = float(np.mean(np.asarray(medians) > GROSS_FAILURE_MM))
    finite = runtimes[np.isfinite(runtimes)]
    out["runtime_p50_ms"] = float(np.median(finite)) if len(finite) else float("nan")
    out["failures"] = int(sum(f.failed for f in frames))
    out["frames"] = n
    return out
