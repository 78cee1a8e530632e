"""The documented prior of the surgical setup, coarse initial poses and the region of interest.

Setup (posterior approach, patient prone): the camera looks down at the exposed lumbar
spine from 200-500 mm, the spine's cranio-caudal axis roughly along the image's vertical
axis (L1 towards the top of the image), the spine roughly centred in the view.

Nominal orientation ``cam_from_spine``: spine x (towards the patient's left) -> camera -x,
spine y (cranial-to-caudal) -> camera +y (image down), spine z (posterior) -> camera -z
(towards the camera). That is a rotation of 180 degrees about the camera's y axis.

The prior: the true pose differs from a coarse initial pose by at most
``max_rotation_deg`` (any axis) and ``max_translation_mm``. Evaluation draws initial
poses as ``true pose * perturbation`` within these bounds; the node computes a coarse
initial pose from the depth image (:func:`coarse_initial_pose`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from end2reg_ros.camera import CameraIntrinsics
from end2reg_ros.geometry import invert, make_pose, random_rotation, transform_points

#: Nominal rotation camera-from-spine of the surgical setup (see module docstring).
NOMINAL_CAM_FROM_SPINE_ROTATION = np.diag([-1.0, 1.0, -1.0])


@dataclass(frozen=True)
class SurgicalSetupPrior:
    """Bounds of the coarse initial pose around the true pose (rotation deg, translation mm)."""

    max_rotation_deg: float = 15.0
    max_translation_mm: float = 20.0

    def sample_initial(self, true_cam_from_spine: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Draw a coarse initial pose within the prior around ``true_cam_from_spine``.

        The perturbation is applied in the spine frame about the spine origin
        (rotation angle uniform in [0, max], translation direction uniform, length uniform
        in [0, max]).
        """
        rot = random_rotation(rng, self.max_rotation_deg)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        trans = direction * rng.uniform(0.0, self.max_translation_mm)
        perturb = make_pose(rot, trans)
        return true_cam_from_spine @ perturb


def nominal_cam_from_spine(distance_mm: float) -> np.ndarray:
    """Nominal pose: spine origin on the optical axis ``distance_mm`` in front of the camera."""
    return make_pose(NOMINAL_CAM_FROM_SPINE_ROTATION, [0.0, 0.0, distance_mm])


def coarse_initial_pose(
    depth_mm: np.ndarray,
    camera: CameraIntrinsics,
    posterior_surface_height_mm: float,
    window_fraction: float = 0.3,
    percentile: float = 90.0,
) -> np.ndarray:
    """Coarse ``cam_from_spine`` from one depth image, without ground truth.

    The surgical set-up aims the camera at the exposed spine: the optical axis passes near
    the spine's midline at the height of the posterior surface. The estimate keeps the
    nominal orientation and puts the spine origin on the optical axis,
    ``posterior_surface_height_mm`` (the spine-frame z of the exposed posterior surface)
    behind the surface depth at the image centre. That depth is the ``percentile`` of the
    valid depths in the central ``window_fraction`` of the image: hands and instruments
    are nearer to the camera than the bone, so a high percentile ignores them.

    Calibration (training specimens only, seed 1, 0-60 % occlusion, 238 frames): with the
    defaults 100 % of the frames were within ``SurgicalSetupPrior()`` (median translation
    error 12 mm), against 23-64 % for the median over the window with the window's centroid
    as the lateral position. Raises ValueError when that window has no valid depth.
    """
    depth = np.asarray(depth_mm, dtype=np.float32)
    h, w = depth.shape
    hh, hw = max(1, int(h * window_fraction / 2)), max(1, int(w * window_fraction / 2))
    window = depth[h // 2 - hh : h // 2 + hh, w // 2 - hw : w // 2 + hw]
    valid = window[np.isfinite(window) & (window > 0)]
    if valid.size < 10:
        raise ValueError("no valid depth in the centre of the image: cannot initialise")
    surface_depth = float(np.percentile(valid, percentile))
    return make_pose(NOMINAL_CAM_FROM_SPINE_ROTATION,
                     [0.0, 0.0, surface_depth + posterior_surface_height_mm])


def region_of_interest_mask(
    points_cam_mm: np.ndarray,
    init_cam_from_spine: np.ndarray,
    bbox_min_mm: np.ndarray,
    bbox_max_mm: np.ndarray,
    margin_mm: float = 25.0,
) -> np.ndarray:
    """Boolean mask of scene points inside the spine's bounding box (spine frame, from the
    initial pose) grown by ``margin_mm``. All methods crop the scene with this."""
    in_spine = transform_points(invert(init_cam_from_spine), points_cam_mm)
    lo = np.asarray(bbox_min_mm) - margin_mm
    hi = np.asarray(bbox_max_mm) + margin_mm
    return np.all((in_spine >= lo) & (in_spine <= hi), axis=1)
