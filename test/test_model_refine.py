"""The differentiable point-to-plane refinement converges on a known offset and passes the
registration loss's gradient into the per-point mask weights."""

from __future__ import annotations

import numpy as np
import torch

from end2reg_ros.geometry import axis_angle_to_matrix, make_pose
from end2reg_ros.model.refine import point_to_plane_step, twist_to_pose
from end2reg_ros.model.registration import apply_pose


def _sphere(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    normals = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    radii = torch.tensor([1.0, 0.7, 0.5])  # an ellipsoid: no rotational symmetry
    return normals * radii, normals  # point normals of a sphere are close enough here


def test_twist_of_a_rotation_vector_is_rodrigues():
    xi = torch.tensor([[0.0, 0.0, np.pi / 2, 1.0, 2.0, 3.0]], dtype=torch.float64)
    expected = make_pose(axis_angle_to_matrix([0, 0, 1], np.pi / 2), [1, 2, 3])
    np.testing.assert_allclose(twist_to_pose(xi)[0].numpy(), expected, atol=1e-12)


def test_refinement_steps_shrink_a_small_offset():
    model, normals = _sphere(2000, 0)
    truth = torch.from_numpy(make_pose(axis_angle_to_matrix([1, 2, 0], 0.03), [0.02, -0.01, 0.015]))
    scene = apply_pose(truth[None].float(), model[None])
    pose = torch.eye(4)[None]
    weight = torch.ones(1, 2000)
    err0 = (apply_pose(pose, model[None]) - scene).norm(dim=-1).mean()
    for _ in range(5):
        pose = point_to_plane_step(pose, scene, weight, model[None], normals[None], max_dist=0.5)
    err = (apply_pose(pose, model[None]) - scene).norm(dim=-1).mean()
    assert err < 0.1 * err0


def test_loss_after_refinement_has_gradient_in_mask_weights():
    model, normals = _sphere(500, 1)
    scene = model[None] + 0.01  # offset
    scene[:, :50] += 0.2  # 50 biased points (tissue on bone)
    weight = torch.ones(1, 500, requires_grad=True)
    pose = point_to_plane_step(torch.eye(4)[None], scene, weight, model[None], normals[None], 0.5)
    truth = torch.eye(4)[None].clone()
    truth[:, :3, 3] = 0.01
    loss = (apply_pose(pose, model[None]) - apply_pose(truth, model[None])).norm(dim=-1).mean()
    loss.backward()
    grad = weight.grad[0]
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # the biased points push the loss up: lowering their weight lowers the loss
    assert grad[:50].mean() > grad[50:].mean()
