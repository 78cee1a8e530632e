"""Registration module: learned features, Sinkhorn soft matching with slack, weighted
Procrustes, iterated (RPM-Net style). Coordinates are unitless (mm / coord scale) inside.
"""

from __future__ import annotations

import torch
from torch import nn

from end2reg_ros.model.layers import PointEncoder

#: Geometry channels of both clouds: xyz (scaled) and unit normal.
GEOMETRY_CHANNELS = 6


#: exp() of float32 arguments below about -88 underflows, and torch's CPU kernel takes a slow
#: path for them (on the development CPU, 131k such entries took 11.6 ms against 0.04 ms at
#: -50). Sinkhorn's log affinities reach -1e4: arguments are clamped at this value first.
#: exp(-80) is 1.8e-35, below float32's resolution next to the largest entry of a sum (1).
EXP_FLOOR = -80.0


def _logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.logsumexp(dim)`` without exp() of very negative arguments (:data:`EXP_FLOOR`);
    the same values in float32, the same gradient up to entries below exp(-80)."""
    top = x.detach().amax(dim=dim, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return (x - top).clamp(min=EXP_FLOOR).exp().sum(dim=dim).log() + top.squeeze(dim)


def sinkhorn_with_slack(
    log_affinity: torch.Tensor, slack_logit: torch.Tensor | float, iterations: int
) -> torch.Tensor:
    """Soft assignment (B, N, M) from log affinities with one slack row and column.

    Every real row (scene point) and real column (model point) is normalised to mass 1
    *including* its slack entry, so a point unlike all others sends its mass to the slack;
    the slack row/column themselves are unconstrained. Returns the real block exp(log P).
    """
    b, n, m = log_affinity.shape
    slack = torch.as_tensor(slack_logit, dtype=log_affinity.dtype, device=log_affinity.device)
    log_p = log_affinity
    slack_col = slack.expand(b, n)  # the slack entry of each real row
    slack_row = slack.expand(b, m)  # the slack entry of each real column
    for _ in range(iterations):
        row_norm = torch.logaddexp(_logsumexp(log_p, 2), slack_col)
        log_p = log_p - row_norm.unsqueeze(2)
        slack_col = slack_col - row_norm
        col_norm = torch.logaddexp(_logsumexp(log_p, 1), slack_row)
        log_p = log_p - col_norm.unsqueeze(1)
        slack_row = slack_row - col_norm
    # entries below EXP_FLOOR are 0 (they were at most 1.2e-38 before)
    return log_p.clamp(min=EXP_FLOOR).exp().masked_fill(log_p < EXP_FLOOR, 0.0)


def weighted_procrustes_torch(
    source: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """Differentiable ``target_from_source`` (B, 4, 4) minimising sum w |R s + t - t'|^2.

    source/target (B, N, 3), weights (B, N) >= 0. The 3x3 SVD runs in float64.
    """
    w = weights / (weights.sum(dim=1, keepdim=True) + eps)
    mu_s = (w.unsqueeze(-1) * source).sum(dim=1)
    mu_t = (w.unsqueeze(-1) * target).sum(dim=1)
    cov = ((source - mu_s.unsqueeze(1)) * w.unsqueeze(-1)).transpose(1, 2) @ (
        target - mu_t.unsqueeze(1)
    )
    u, _, vh = torch.linalg.svd(cov.double())
    v = vh.transpose(1, 2)
    d = torch.sign(torch.linalg.det(v @ u.transpose(1, 2)))
    diag = torch.ones_like(cov[:, 0, :], dtype=torch.float64)
    diag = torch.cat([diag[:, :2], d.unsqueeze(-1)], dim=1)
    rot = (v @ torch.diag_embed(diag) @ u.transpose(1, 2)).to(source.dtype)
    trans = mu_t - (rot @ mu_s.unsqueeze(-1)).squeeze(-1)
    pose = torch.eye(4, dtype=source.dtype, device=source.device).repeat(len(source), 1, 1)
    pose[:, :3, :3] = rot
    pose[:, :3, 3] = trans
    return pose


def apply_pose(pose: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """(B, 4, 4) applied to (B, N, 3)."""
    return points @ pose[:, :3, :3].transpose(1, 2) + pose[:, :3, 3].unsqueeze(1)


class RegistrationModule(nn.Module):
    """Estimates ``init_from_spine`` (B, 4, 4; scaled units) from weighted scene points.

    Per iteration k: move the model by the current estimate, encode it, affinity
    ``-beta_k |f_s - f_m|^2 - gamma_k |x_s - x_m|^2``, Sinkhorn with slack ``alpha_k``,
    correspondence weight = scene weight x matched mass, weighted Procrustes.
    """

    def __init__(self, width: int, feature_dim: int, iterations: int, sinkhorn_iters: int):
        super().__init__()
        self.encoder = PointEncoder(GEOMETRY_CHANNELS, width, feature_dim)
        self.iterations = iterations
        self.sinkhorn_iters = sinkhorn_iters
        self.log_beta = nn.Parameter(torch.zeros(iterations))
        self.log_gamma = nn.Parameter(torch.full((iterations,), 5.0))
        self.alpha = nn.Parameter(torch.zeros(iterations))

    def forward(
        self,
        scene_xyz: torch.Tensor,
        scene_normals: torch.Tensor,
        scene_idx: torch.Tensor,
        scene_weight: torch.Tensor,
        model_xyz: torch.Tensor,
        model_normals: torch.Tensor,
        model_idx: torch.Tensor,
        iterations: int | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        """Returns the pose after each iteration, the last matched mass (B, N) and the soft
        assignment (B, N, M) of each iteration."""
        f_scene = self.encoder(torch.cat([scene_xyz, scene_normals], dim=-1), scene_idx)
        pose = torch.eye(4, dtype=scene_xyz.dtype, device=scene_xyz.device)
        pose = pose.repeat(len(scene_xyz), 1, 1)
        poses, matches = [], []
        mass = scene_weight
        for k in range(iterations or self.iterations):
            kk = min(k, self.iterations - 1)
            moved = apply_pose(pose, model_xyz)
            moved_n = model_normals @ pose[:, :3, :3].transpose(1, 2)
            f_model = self.encoder(torch.cat([moved, moved_n], dim=-1), model_idx)
            with torch.autocast(scene_xyz.device.type, enabled=False):  # matching in fp32
                feat_d = torch.cdist(f_scene.float(), f_model.float()).square()
                space_d = torch.cdist(scene_xyz.float(), moved.float()).square()
                log_aff = -self.log_beta[kk].exp() * feat_d - self.log_gamma[kk].exp() * space_d
                match = sinkhorn_with_slack(log_aff, self.alpha[kk], self.sinkhorn_iters)
                mass = match.sum(dim=2)
                matched = (match @ model_xyz.float()) / (mass.unsqueeze(-1) + 1e-8)
                weight = scene_weight.float() * mass + 1e-6
                new_pose = weighted_procrustes_torch(matched, scene_xyz.float(), weight)
            poses.append(new_pose)
            matches.append(match)
            pose = new_pose.detach()
        return poses, mass, matches
