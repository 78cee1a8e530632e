"""Core data types shared by synthesis, evaluation, the network and the ROS node.

Units: millimetres. Poses: 4x4 ``a_from_b`` matrices (see package docstring).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from end2reg_ros.camera import CameraIntrinsics

#: Lumbar levels in cranial-to-caudal order. Label value of level i is i + 1.
LEVELS: tuple[str, ...] = ("L1", "L2", "L3", "L4", "L5")

#: Per-pixel label of pixels that are not vertebra.
LABEL_BACKGROUND = 0


@dataclass
class Vertebra:
    """One vertebra of the preoperative model, in the spine (CT) frame, millimetres.

    ``vertices`` (V, 3) float, ``faces`` (F, 3) int triangle mesh.
    ``targets``: name -> (3,) target point for TRE, e.g. ``pedicle_entry_left``,
    ``pedicle_entry_right``, ``body_centre``.
    """

    level: str
    vertices: np.ndarray
    faces: np.ndarray
    targets: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Specimen:
    """Preoperative model of one lumbar spine (spine frame ``spine``, millimetres).

    Spine frame (right-handed): y = cranial-to-caudal (L1 towards L5, along the chord of
    the vertebral body centres), z = posterior (towards the camera when the patient lies
    prone), x = y x z, which points to the patient's **left**; origin at the mean of the
    vertebral body centres. (Synthetic specimens written before this was corrected name the
    target at -x ``pedicle_entry_left``, mirrored with respect to a real patient; their
    vertebrae are left-right symmetric.) See :mod:`end2reg_ros.spine_frame`.

    ``user_from_spine`` (4x4, mm): maps spine-frame points into the frame the user gave
    the meshes in (e.g. the CT's LPS coordinates); identity when the meshes were already
    in the spine frame. Outputs for the user are expressed with it, e.g. the published
    ``cam_from_user = cam_from_spine @ inv(user_from_spine)``. ``user_units``: the
    length unit of the user's mesh files (``mm`` or ``m``); ``user_from_spine`` is in mm
    either way (metre files are scaled by 1000 when loaded).
    """

    name: str
    vertebrae: list[Vertebra]
    user_from_spine: np.ndarray = field(default_factory=lambda: np.eye(4))
    user_units: str = "mm"

    @property
    def levels(self) -> list[str]:
        return [v.level for v in self.vertebrae]

    def target_points(self) -> tuple[np.ndarray, list[str]]:
        """All target points (K, 3) in the spine frame and their vertebra levels (K,)."""
        points, levels = [], []
        for vertebra in self.vertebrae:
            for name in sorted(vertebra.targets):
                points.append(vertebra.targets[name])
                levels.append(vertebra.level)
        return np.asarray(points, dtype=float).reshape(-1, 3), levels


@dataclass
class Frame:
    """One synchronized RGB-D frame, optionally with ground truth.

    ``color``: (H, W, 3) uint8 RGB. ``depth_mm``: (H, W) depth along the optical axis in
    millimetres (uint16 from 16UC1, float32 from 32FC1 converted), 0 = no data.
    ``stamp_ns``: the input frame's stamp in nanoseconds. ``frame_id``: the optical frame.

    Ground truth (None on real data): ``cam_from_spine`` (4x4, mm) maps the preoperative
    spine frame into the optical frame; ``cam_from_vertebra`` maps each vertebra's CT
    pose (vertices as stored in ``Specimen``) to where that vertebra really is;
    ``labels`` (H, W) uint8, 0 background, i + 1 for ``LEVELS[i]``.
    """

    color: np.ndarray
    depth_mm: np.ndarray
    camera: CameraIntrinsics
    stamp_ns: int = 0
    frame_id: str = "camera_color_optical_frame"
    cam_from_spine: np.ndarray | None = None
    cam_from_vertebra: dict[str, np.ndarray] | None = None
    labels: np.ndarray | None = None


@dataclass
class RegistrationEstimate:
    """What a registration method returns for one frame.

    ``cam_from_spine``: estimated 4x4 pose (mm) mapping the spine frame into the optical
    frame. ``confidence`` in [0, 1]. ``residual_mm``: RMS distance of the used scene points
    to the registered model. ``num_points``: scene points used. ``stage_ms``: wall time per
    stage in milliseconds. ``points_cam`` (K, 3, mm) and ``point_weight`` (K,) in [0, 1]:
    the scene points the method looked at and how much it used each one (the learned
    segmentation for End2Reg), or None.
    """

    cam_from_spine: np.ndarray
    confidence: float
    residual_mm: float
    num_points: int
    stage_ms: dict[str, float] = field(default_factory=dict)
    points_cam: np.ndarray | None = None
    point_weight: np.ndarray | None = None
    cam_from_vertebra: dict[str, np.ndarray] | None = None

    @property
    def runtime_ms(self) -> float:
        return float(sum(self.stage_ms.values()))


class RegistrationMethod(ABC):
    """One interface for every method: classical baselines, End2Reg and its ablations.

    ``prepare`` is called once per specimen (preoperative model); ``register`` once per
    frame with a coarse initial pose ``init_cam_from_spine`` (4x4, mm).
    """

    name: str = "base"

    @abstractmethod
    def prepare(self, specimen: Specimen) -> None:
        """Load the preoperative model (build point clouds, features, ...)."""

    @abstractmethod
    def register(self, frame: Frame, init_cam_from_spine: np.ndarray) -> RegistrationEstimate:
        """Estimate ``cam_from_spine`` for one frame."""
