"""The node's coarse initial pose lands within the surgical-setup prior, also when hands and
instruments hide much of the exposed bone (they are nearer to the camera than the bone)."""

from __future__ import annotations

import numpy as np
import pytest

from end2reg_ros.geometry import invert, rotation_angle_deg
from end2reg_ros.registration.prior import SurgicalSetupPrior, coarse_initial_pose
from end2reg_ros.synth.anatomy import generate_specimen, posterior_surface_height_mm
from end2reg_ros.synth.generate import render_frames

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("occlusion", [(0.0, 0.2), (0.4, 0.6)])
def test_coarse_initial_pose_is_within_the_prior(occlusion):
    specimen = generate_specimen(seed=31, name="init_check")
    height = posterior_surface_height_mm(specimen)
    prior = SurgicalSetupPrior()
    within = 0
    frames = list(render_frames(specimen, 8, np.random.default_rng(5), occlusion=occlusion))
    for frame in frames:
        init = coarse_initial_pose(frame.depth_mm, frame.camera, height)
        delta = invert(frame.cam_from_spine) @ init
        within += (rotation_angle_deg(delta[:3, :3]) <= prior.max_rotation_deg
                   and np.linalg.norm(delta[:3, 3]) <= prior.max_translation_mm)
    assert within >= 7, f"only {within}/8 frames within the prior"
