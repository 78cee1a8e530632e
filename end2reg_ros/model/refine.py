"""Differentiable point-to-plane refinement: the fine alignment the mask is trained for.

At inference the registration ends with ICP restricted to the masked scene points; what
makes that ICP accurate is *which* points it uses (a point on tissue over bone, or on muscle
next to it, pulls the fine alignment off by millimetres, although the coarse matching barely
notices it). To let the registration loss teach the segmentation exactly that, training
appends ``refine_steps`` Gauss-Newton point-to-plane steps after the matching iterations:

* correspondences: each scene point's nearest preoperative point under the current estimate
  (indices and distances without gradient);
* weights: the scene point's mask weight (hard 0/1 forward, straight-through Gumbel gradient
  backward), zero for correspondences farther than ``max_dist`` -- no robust kernel, exactly
  like the ICP at inference: keeping a biased point out is the mask's job, not a kernel's
  (with a robust kernel in training the mask learned to keep every point);
* the 6-DoF update solves the weighted normal equations (damped) in closed form, so the
  refined pose, and the loss on it, are differentiable in every mask weight.

The input pose is detached: the refinement loss reaches only the segmentation (through the
weights), the matching stages keep their own losses.
"""

from __future__ import annotations

import torch

from end2reg_ros.model.registration import apply_pose


def _skew(v: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros_like(v[..., 0])
    return torch.stack(
        [
            torch.stack([zero, -v[..., 2], v[..., 1]], -1),
            torch.stack([v[..., 2], zero, -v[..., 0]], -1),
            torch.stack([-v[..., 1], v[..., 0], zero], -1),
        ],
        -2,
    )


def twist_to_pose(xi: torch.Tensor) -> torch.Tensor:
    """(B, 6) twist (rotation vector omega, translation v) -> (B, 4, 4), Rodrigues."""
    omega, v = xi[:, :3], xi[:, 3:]
    theta = omega.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    k = _skew(omega / theta)
    s = torch.sin(theta).unsqueeze(-1)
    c = (1.0 - torch.cos(theta)).unsqueeze(-1)
    eye = torch.eye(3, dtype=xi.dtype, device=xi.device).expand_as(k)
    rot = eye + s * k + c * (k @ k)
    pose = torch.eye(4, dtype=xi.dtype, device=xi.device).repeat(len(xi), 1, 1)
    pose[:, :3, :3] = rot
    pose[:, :3, 3] = v
    return pose


def point_to_plane_step(
    pose: torch.Tensor,
    scene_xyz: torch.Tensor,
    scene_weight: torch.Tensor,
    model_xyz: torch.Tensor,
    model_normals: torch.Tensor,
    max_dist: float,
    damping: float = 1e-6,
) -> torch.Tensor:
    """One weighted point-to-plane Gauss-Newton step.

    ``pose`` (B, 4, 4) maps model points into the scene's coordinates (same units as the
    points); scene (B, N, 3) with weights (B, N); model points/normals (B, M, 3).
    Returns the refined pose (B, 4, 4), differentiable in ``scene_weight``.
    """
    pose = pose.detach()
    moved = apply_pose(pose, model_xyz)
    moved_n = model_normals @ pose[:, :3, :3].transpose(1, 2)
    with torch.no_grad():
        dist, j = torch.cdist(scene_xyz, moved).min(dim=2)
    idx = j.unsqueeze(-1).expand(-1, -1, 3)
    q = torch.gather(moved, 1, idx)
    n = torch.gather(moved_n, 1, idx)
    r = ((scene_xyz - q) * n).sum(-1)  # signed point-to-plane distance (B, N)
    w = scene_weight.to(r.dtype) * (dist < max_dist).to(r.dtype)
    # moving the model by a small twist (omega, v): q' = q + omega x q + v, so the residual
    # becomes r - (q x n) . omega - n . v
    a = torch.cat([torch.cross(q, n, dim=-1), n], dim=-1)  # (B, N, 6)
    aw = a * w.unsqueeze(-1)
    h = aw.transpose(1, 2) @ a
    h = h + damping * torch.eye(6, dtype=h.dtype, device=h.device) * (1.0 + w.sum(1)).view(-1, 1, 1)
    g = aw.transpose(1, 2) @ r.unsqueeze(-1)
    xi = torch.linalg.solve(h.double(), g.double()).squeeze(-1).to(r.dtype)
    return twist_to_pose(xi) @ pose
