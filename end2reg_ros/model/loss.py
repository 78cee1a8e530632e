"""End2Reg training loss: registration only (no segmentation labels), plus a mask-size hinge.

``registration_loss`` = sum_k w_k * mean_j |T_k q_j - T_gt q_j| over the preoperative model
points q_j (mm), T_k the estimate after iteration k. ``mask_size_penalty`` =
``weight * max(0, min_fraction - mean_i sigmoid(logit_i))``: zero while at least
``min_fraction`` of the scene points are (softly) selected, it stops the mask from collapsing
to nothing (an empty mask makes every registration degenerate, but early in training the
cheapest way to cut a bad correspondence is to drop the point).

``matching_loss`` (weight ``match_loss_weight``) supervises the registration module's soft
assignment from the **true pose** (not from labels): for every scene point that lies within
``match_inlier_mm`` of a preoperative point mapped by the true pose, the assignment mass on
the preoperative points within ``match_radius_mm`` of its true position should be 1
(``-log`` of that mass). It reaches only the matching features and Sinkhorn parameters: the
soft assignment does not depend on the segmentation, whose only training signal stays the
pose loss through the straight-through estimator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from end2reg_ros.model.registration import apply_pose


def model_point_distance(
    pose: torch.Tensor, gt: torch.Tensor, model_xyz_mm: torch.Tensor
) -> torch.Tensor:
    """Mean distance (B,) in mm of model points under the estimated and the true pose."""
    return (apply_pose(pose, model_xyz_mm) - apply_pose(gt, model_xyz_mm)).norm(dim=-1).mean(1)


def registration_loss(
    poses: Sequence[torch.Tensor],
    gt: torch.Tensor,
    model_xyz_mm: torch.Tensor,
    iteration_weights: Sequence[float],
) -> torch.Tensor:
    """Weighted sum over iterations of the batch-mean model point distance (mm)."""
    total = poses[0].new_zeros(())
    for pose, w in zip(poses, iteration_weights):
        total = total + w * model_point_distance(pose, gt, model_xyz_mm).mean()
    return total


def mask_size_penalty(
    logits: torch.Tensor | None, min_fraction: float, weight: float, l1_weight: float = 0.0
):
    """Hinge on the mean mask probability (see module docstring), plus ``l1_weight`` times
    the mean probability itself (a small price per selected point, so that points which do
    not help the registration are dropped rather than kept by default); 0 without a mask."""
    if logits is None or (weight <= 0 and l1_weight <= 0):
        return torch.zeros(())
    fraction = torch.sigmoid(logits).mean(dim=1)
    return weight * torch.relu(min_fraction - fraction).mean() + l1_weight * fraction.mean()


def matching_loss(
    matches: Sequence[torch.Tensor],
    scene_xyz: torch.Tensor,
    model_xyz: torch.Tensor,
    gt_scaled: torch.Tensor,
    inlier: float,
    radius: float,
) -> torch.Tensor:
    """Mean over iterations and true-pose inliers of ``-log(mass near the true match)``.

    ``scene_xyz``/``model_xyz`` (B, N/M, 3) and ``gt_scaled`` (B, 4, 4) in the network's
    scaled units, like ``inlier`` and ``radius``.
    """
    with torch.no_grad():
        dist = torch.cdist(scene_xyz, apply_pose(gt_scaled, model_xyz))
        near = (dist < radius).float()
        positive = dist.amin(dim=2) < inlier
    if not positive.any():
        return scene_xyz.new_zeros(())
    total = scene_xyz.new_zeros(())
    for match in matches:
        mass = (match * near).sum(dim=2)
        total = total + (-torch.log(mass[positive] + 1e-6)).mean()
    return total / len(matches)
