"""Safety gate of the registration output (ROS-free, unit-testable).

The node publishes a registered pose on tf2 only when :meth:`SafetyGate.check` passes.
Every check returns ``(valid, reason)``; ``reason`` is ``"ok"`` when valid, else one short
human-readable sentence that names the failed check and the numbers involved (it goes into
``RegistrationResult.reason``, the diagnostics and the node's warnings).

Units: millimetres for distances, seconds for ages, nanoseconds for stamps. The pose is
``cam_from_spine`` (spine/CT frame -> camera optical frame, x right, y down, z forward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

OK = "ok"

#: how the reasons of :meth:`SafetyGate.check_evidence`'s refusals begin
EVIDENCE_REASONS = ("confidence ", "residual ", "level ambiguous", "reversal ambiguous",
                    "final ICP disagrees")


@dataclass(frozen=True)
class SafetyLimits:
    """Thresholds of the gate.

    ``min_confidence`` in [0, 1]; ``max_residual_mm``: largest accepted RMS residual of the
    used scene points; ``min_points``: fewest scene points a registration may use;
    ``max_age_s``: largest accepted ``now - stamp`` (<= 0 disables the check);
    ``min_depth_mm`` / ``max_depth_mm``: accepted range of the spine origin's optical-axis
    distance (z of the translation); ``max_lateral_mm``: largest accepted distance of the spine
    origin from the optical axis; ``max_future_s``: how far a stamp may lie in the future
    (clock skew between camera driver and node); ``min_level_margin``: smallest accepted
    level margin (verification score of the pose minus that of the same registration moved
    by one vertebra cranially or caudally and refined; a fraction of the model's checked
    points): below it the neighbouring level explains the image almost as well, the
    wrong-level ambiguity a confidence fitted on few such frames can miss;
    ``min_reversal_margin``: smallest accepted reversal margin (verification score of the pose
    minus that of the pose turned 180 deg about the spine's posterior axis and refined):
    below it the spine the other way round explains the image as well or better;
    ``max_final_move_mm``: largest accepted move (mm, at the target points) that the dense
    final ICP of a global registration wanted to make (``features["final_move_mm"]``; the
    pipeline does not take a move above its own ``final_icp_max_move_mm``, 2 mm, and
    keeps the unrefined pose): above it the scene's own dense fit disagrees with the pose;
    0 switches the check off.
    """

    min_confidence: float = 0.98
    max_residual_mm: float = 5.0
    min_points: int = 200
    max_age_s: float = 2.0
    min_depth_mm: float = 50.0
    max_depth_mm: float = 1000.0
    max_lateral_mm: float = 500.0
    max_future_s: float = 0.5
    orthonormal_tolerance: float = 1e-3
    min_level_margin: float = 0.02
    min_reversal_margin: float = 0.02
    max_final_move_mm: float = 2.0


def check_pose(pose: np.ndarray, limits: SafetyLimits) -> tuple[bool, str]:
    """Pose sanity: 4x4, finite, rotation orthonormal with det +1, translation in range (mm)."""
    pose = np.asarray(pose, dtype=float)
    if pose.shape != (4, 4):
        return False, f"pose has shape {pose.shape}, expected (4, 4)"
    if not np.all(np.isfinite(pose)):
        return False, "pose contains NaN or inf"
    if not np.allclose(pose[3], [0.0, 0.0, 0.0, 1.0], atol=1e-9):
        return False, "pose is not a rigid transform (last row is not 0 0 0 1)"
    rot = pose[:3, :3]
    err = float(np.abs(rot.T @ rot - np.eye(3)).max())
    if err > limits.orthonormal_tolerance:
        return False, f"rotation is not orthonormal (max |R^T R - I| = {err:.2e})"
    det = float(np.linalg.det(rot))
    if det < 0.0:
        return False, "rotation is a reflection (det < 0)"
    x, y, z = pose[:3, 3]
    if not limits.min_depth_mm <= z <= limits.max_depth_mm:
        return False, (
            f"translation z = {z:.1f} mm outside the working range "
            f"[{limits.min_depth_mm:.0f}, {limits.max_depth_mm:.0f}] mm"
        )
    lateral = math.hypot(x, y)
    if lateral > limits.max_lateral_mm:
        return False, (
            f"translation {lateral:.1f} mm off the optical axis > {limits.max_lateral_mm:.0f} mm"
        )
    return True, OK


class SafetyGate:
    """Decides whether a registration may be published; remembers the last processed stamp.

    Use :meth:`check_stamp` when a frame arrives (rejects stamps going backwards before
    spending time on inference) and :meth:`check` after registration. :meth:`mark_processed`
    records a stamp as processed (``check`` does it itself for every frame it sees).
    """

    def __init__(self, limits: SafetyLimits | None = None) -> None:
        self.limits = limits or SafetyLimits()
        self.last_stamp_ns: int | None = None

    def reset(self) -> None:
        """Forget the last processed stamp (e.g. after a replay restarts)."""
        self.last_stamp_ns = None

    def check_stamp(self, stamp_ns: int, now_ns: int | None = None) -> tuple[bool, str]:
        """Stamp checks only: not older than the last processed stamp, age within limits.

        ``now_ns`` None skips the age checks (e.g. before inference, where only ordering matters).
        """
        if stamp_ns <= 0:
            return False, "frame has no stamp (0)"
        if self.last_stamp_ns is not None and stamp_ns < self.last_stamp_ns:
            back = (self.last_stamp_ns - stamp_ns) * 1e-9
            return False, (
                f"stamp went backwards by {back:.3f} s (older than the last processed frame)"
            )
        if now_ns is not None and self.limits.max_age_s > 0.0:
            age = (now_ns - stamp_ns) * 1e-9
            if age > self.limits.max_age_s:
                return False, f"frame is {age:.3f} s old > max_age_s {self.limits.max_age_s:.3f} s"
            if -age > self.limits.max_future_s:
                return False, f"stamp is {-age:.3f} s in the future (clock mismatch?)"
        return True, OK

    def mark_processed(self, stamp_ns: int) -> None:
        """Record ``stamp_ns`` as the newest processed stamp."""
        if self.last_stamp_ns is None or stamp_ns > self.last_stamp_ns:
            self.last_stamp_ns = stamp_ns

    def check(
        self,
        cam_from_spine: np.ndarray,
        confidence: float,
        residual_mm: float,
        num_points: int,
        stamp_ns: int,
        now_ns: int | None,
        level_margin: float | None = None,
        reversal_margin: float | None = None,
        final_move_mm: float | None = None,
    ) -> tuple[bool, str]:
        """Full gate for one registered frame; records the stamp as processed.

        ``now_ns`` None skips the age check (ROS time not available yet: ``use_sim_time``
        before the first /clock message). ``level_margin`` None (a method without that
        verification) skips the level check; ``reversal_margin`` None (not computed: a
        tracked frame, or the check off) the reversal check; ``final_move_mm`` None (a
        tracked frame) the final ICP check.

        Order of checks: stamp (ordering, age), pose (finite, orthonormal, range), number of
        points, confidence, residual, level margin, reversal margin, final ICP move. The
        first failure is the reason.
        """
        valid, reason = self.check_stamp(stamp_ns, now_ns)
        if stamp_ns > 0:
            self.mark_processed(stamp_ns)
        if not valid:
            return False, reason
        return self.check_content(cam_from_spine, confidence, residual_mm, num_points,
                                  level_margin, reversal_margin, final_move_mm)

    def check_content(
        self, cam_from_spine: np.ndarray, confidence: float, residual_mm: float, num_points: int,
        level_margin: float | None = None, reversal_margin: float | None = None,
        final_move_mm: float | None = None,
    ) -> tuple[bool, str]:
        """The checks of :meth:`check` that concern the registration itself (pose, points,
        confidence, residual, level and reversal margins, final ICP move), not the frame's
        stamp or age; records nothing."""
        valid, reason = check_pose(cam_from_spine, self.limits)
        if not valid:
            return False, reason
        lim = self.limits
        if not num_points >= lim.min_points:
            return False, f"only {num_points} scene points used < min_points {lim.min_points}"
        return self.check_evidence(confidence, residual_mm, level_margin, reversal_margin,
                                   final_move_mm)

    def check_evidence(
        self, confidence: float, residual_mm: float, level_margin: float | None = None,
        reversal_margin: float | None = None, final_move_mm: float | None = None,
    ) -> tuple[bool, str]:
        """The checks of :meth:`check_content` that weigh the registration's evidence, after
        the pose and the number of points: confidence, residual, level margin, reversal
        margin, final ICP move (their reasons begin as :data:`EVIDENCE_REASONS`); records
        nothing."""
        lim = self.limits
        if not (math.isfinite(confidence) and confidence >= lim.min_confidence):
            return False, f"confidence {confidence:.3f} < min_confidence {lim.min_confidence:.3f}"
        if not (math.isfinite(residual_mm) and residual_mm <= lim.max_residual_mm):
            return False, (
                f"residual {residual_mm:.2f} mm > max_residual_mm {lim.max_residual_mm:.2f} mm"
            )
        if level_margin is not None and not (math.isfinite(level_margin)
                                             and level_margin >= lim.min_level_margin):
            return False, (
                f"level ambiguous: one vertebra up or down fits almost as well (level margin "
                f"{level_margin:.3f} < min_level_margin {lim.min_level_margin:.3f})"
            )
        if reversal_margin is not None and not (math.isfinite(reversal_margin)
                                                and reversal_margin >= lim.min_reversal_margin):
            return False, (
                f"reversal ambiguous: the spine turned 180 deg fits almost as well or better "
                f"(reversal margin {reversal_margin:.3f} < min_reversal_margin "
                f"{lim.min_reversal_margin:.3f})"
            )
        if final_move_mm is not None and lim.max_final_move_mm > 0.0 and not (
                math.isfinite(final_move_mm) and final_move_mm <= lim.max_final_move_mm):
            return False, (
                f"final ICP disagrees: the dense fit of the scene would move the pose "
                f"{final_move_mm:.2f} mm > max_final_move_mm {lim.max_final_move_mm:.2f} mm"
            )
        return True, OK
